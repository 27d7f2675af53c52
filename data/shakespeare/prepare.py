"""Tiny-shakespeare in GPT-2 BPE tokens (nanoGPT's shakespeare): writes train.bin, val.bin (uint16) and meta.pkl.

Run from the repo root:
    python data/shakespeare/prepare.py                      # downloads input.txt next to this script
    python data/shakespeare/prepare.py --input input.txt    # offline (or set SHAKESPEARE_INPUT=input.txt);
                                                            # also set TIKTOKEN_CACHE_DIR to a cache holding gpt2
    python -m data.shakespeare.prepare --input input.txt --out-dir /tmp/shakespeare
"""
import argparse
import os
import sys

# repo root on sys.path so `from data.common import ...` also works when run as `python data/<name>/prepare.py`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import tiktoken

from data.common import add_common_args, read_shakespeare, write_meta, write_tokens

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    """Parse `argv`, split the text 90/10 by characters and write each part's GPT-2 tokens."""
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), HERE)
    args = parser.parse_args(argv)
    data = read_shakespeare(args.input, HERE)
    n = len(data)
    train_data = data[: int(n * 0.9)]
    val_data = data[int(n * 0.9):]

    enc = tiktoken.get_encoding("gpt2")
    train_ids = enc.encode_ordinary(train_data)
    val_ids = enc.encode_ordinary(val_data)
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    write_tokens(os.path.join(args.out_dir, "train.bin"), train_ids)
    write_tokens(os.path.join(args.out_dir, "val.bin"), val_ids)
    write_meta(os.path.join(args.out_dir, "meta.pkl"), {"vocab_size": enc.n_vocab, "tiktoken_encoding": "gpt2"})


if __name__ == "__main__":
    main()
