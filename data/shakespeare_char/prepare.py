"""Character-level tiny-shakespeare (nanoGPT's shakespeare_char): writes train.bin, val.bin (uint16) and meta.pkl.

Run from the repo root:
    python data/shakespeare_char/prepare.py                      # downloads input.txt next to this script
    python data/shakespeare_char/prepare.py --input input.txt    # offline (or set SHAKESPEARE_INPUT=input.txt)
    python -m data.shakespeare_char.prepare --input input.txt --out-dir /tmp/shakespeare_char
"""
import argparse
import os
import sys

# repo root on sys.path so `from data.common import ...` also works when run as `python data/<name>/prepare.py`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.common import add_common_args, read_shakespeare, write_meta, write_tokens

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    """Parse `argv`, build the character vocabulary and write the 90/10 train/val split."""
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), HERE)
    args = parser.parse_args(argv)
    data = read_shakespeare(args.input, HERE)
    print(f"length of dataset in characters: {len(data):,}")

    chars = sorted(set(data))
    vocab_size = len(chars)
    print("all the unique characters:", "".join(chars))
    print(f"vocab size: {vocab_size:,}")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}

    n = len(data)
    train_ids = [stoi[c] for c in data[: int(n * 0.9)]]
    val_ids = [stoi[c] for c in data[int(n * 0.9):]]
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    write_tokens(os.path.join(args.out_dir, "train.bin"), train_ids)
    write_tokens(os.path.join(args.out_dir, "val.bin"), val_ids)
    write_meta(os.path.join(args.out_dir, "meta.pkl"), {"vocab_size": vocab_size, "itos": itos, "stoi": stoi})


if __name__ == "__main__":
    main()
