"""OpenWebText in GPT-2 BPE tokens (nanoGPT's openwebtext): writes train.bin, val.bin (uint16) and meta.pkl.

Each document is encoded with encode_ordinary and followed by the end-of-text token (50256).
Run from the repo root:
    python data/openwebtext/prepare.py                      # Hugging Face hub "openwebtext" (~54 GB HF cache)
    python data/openwebtext/prepare.py --input a.txt b.txt  # offline: local text files, one document per line
    OPENWEBTEXT_INPUT=a.txt:b.txt python -m data.openwebtext.prepare --out-dir /tmp/owt --num-proc 4
Offline runs also need TIKTOKEN_CACHE_DIR pointing at a tiktoken cache that holds gpt2.
"""
import argparse
import functools
import os
import sys

# repo root on sys.path so `from data.common import ...` also works when run as `python data/<name>/prepare.py`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import tiktoken
from datasets import load_dataset
from tqdm import tqdm

from data.common import add_common_args, require_file, write_meta

HERE = os.path.dirname(os.path.abspath(__file__))
INPUT_ENV = "OPENWEBTEXT_INPUT"


@functools.lru_cache(maxsize=None)
def _encoder():
    """The gpt2 encoding, loaded once per (worker) process."""
    return tiktoken.get_encoding("gpt2")


def process(example):
    """Tokenise one document: GPT-2 ids plus a trailing end-of-text token, and their count."""
    enc = _encoder()
    ids = enc.encode_ordinary(example["text"])
    ids.append(enc.eot_token)
    return {"ids": ids, "len": len(ids)}


def write_split(dset, filename):
    """Concatenate the 'ids' of `dset` into a uint16 memmap written to a temp file, then move it to `filename`."""
    arr_len = int(np.sum(dset["len"], dtype=np.uint64))
    tmp = f"{filename}.{os.getpid()}.tmp"
    arr = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(arr_len,))
    try:
        total_batches = min(1024, len(dset))
        idx = 0
        for batch_idx in tqdm(range(total_batches), desc=f"writing {filename}"):
            # batch together samples for faster write
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx : idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        assert idx == arr_len, (idx, arr_len)
        arr.flush()
        del arr
    except BaseException:
        os.remove(tmp)
        raise
    os.replace(tmp, filename)
    print(f"{os.path.basename(filename)} has {arr_len:,} tokens")


def main(argv=None):
    """Parse `argv`, load, split, tokenise and write the dataset."""
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), HERE, input_nargs="+")
    parser.add_argument("--val-fraction", type=float, default=0.0005, help="fraction of documents held out for val")
    parser.add_argument("--num-proc", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="worker processes")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face datasets cache (default: HF_DATASETS_CACHE)")
    args = parser.parse_args(argv)

    if args.input:
        files = [require_file(p, "--input") for p in args.input]
    elif os.environ.get(INPUT_ENV):
        files = [require_file(p, f"${INPUT_ENV}") for p in os.environ[INPUT_ENV].split(os.pathsep) if p]
    else:
        files = None
    if files:
        dataset = load_dataset("text", data_files=files, cache_dir=args.cache_dir)
    else:
        dataset = load_dataset("openwebtext", num_proc=args.num_proc, cache_dir=args.cache_dir)

    # owt by default only contains the 'train' split, so create a test split
    split_dataset = dataset["train"].train_test_split(test_size=args.val_fraction, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")  # rename the test split to val

    tokenized = split_dataset.map(
        process, remove_columns=["text"], desc="tokenizing the splits", num_proc=args.num_proc)
    os.makedirs(args.out_dir, exist_ok=True)
    for split, dset in tokenized.items():
        write_split(dset, os.path.join(args.out_dir, f"{split}.bin"))
    write_meta(os.path.join(args.out_dir, "meta.pkl"), {"vocab_size": _encoder().n_vocab, "tiktoken_encoding": "gpt2"})


if __name__ == "__main__":
    main()
