"""
Sample text from a trained model's checkpoint, as nanoGPT's sample.py: the newest complete checkpoint in
out_dir/checkpoints (ckpt.pt, or the sharded DCP directory ckpt that fsdp, tp, pp and 3d write, converted in
memory); out_dir may also be one step directory, or an out_dir of the layout before them (out_dir/ckpt.pt).

    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --init_from=gpt2-xl --start="What is the answer to life, the universe, and everything?"

init_from: "resume" (out_dir's checkpoint), or GPT-2 weights (tools/hf.py): "gpt2", "gpt2-medium", "gpt2-large",
"gpt2-xl" (the Hugging Face cache) or a local Hugging Face model directory.
The tokenizer is the one the checkpoint's dataset was prepared with: meta.pkl's characters (shakespeare_char)
or a tiktoken encoding (GPT-2 BPE); for GPT-2 weights, GPT-2's BPE (tiktoken's "gpt2": offline, set
TIKTOKEN_CACHE_DIR to a cache holding it). `--start=FILE:prompt.txt` reads the prompt from a file.
"""

import os
import pickle
import sys
from contextlib import nullcontext

import torch

from config import ConfigError, load_config
from tools.hf import is_hf_source, load_pretrained
from model import GPT, GPTConfig
from parallel import load_checkpoint_file
from parallel.checkpoint import resolve

# -----------------------------------------------------------------------------
init_from = "resume"  # "resume" (out_dir's checkpoint), or GPT-2 weights: gpt2(-medium, -large, -xl), an HF directory
out_dir = "out"
start = "\n"  # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10
max_new_tokens = 500
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random
top_k = 200  # retain only the top_k most likely tokens, clamp others to have 0 probability
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
compile = False
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def load_tokenizer(train_config):
    """(encode, decode) for the dataset a checkpoint was trained on: meta.pkl's stoi/itos if it has them,
    else the tiktoken encoding it names (GPT-2 BPE by default)."""
    data_dir = train_config.get("data_dir") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                                            train_config.get("dataset", ""))
    meta = {}
    if os.path.isfile(os.path.join(data_dir, "meta.pkl")):
        with open(os.path.join(data_dir, "meta.pkl"), "rb") as f:
            meta = pickle.load(f)
    if "stoi" in meta:
        stoi, itos = meta["stoi"], meta["itos"]
        return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(itos[i] for i in ids))
    import tiktoken
    enc = tiktoken.get_encoding(meta.get("tiktoken_encoding", "gpt2"))
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


def main(argv):
    cfg = load_config(DEFAULTS, argv)
    torch.manual_seed(cfg["seed"])
    if is_hf_source(cfg["init_from"]):
        model_config, state = load_pretrained(cfg["init_from"])
        train_config = {"dataset": "openwebtext"}  # GPT-2's BPE: no meta.pkl there, so tiktoken's "gpt2"
    elif cfg["init_from"] == "resume":
        ckpt = load_checkpoint_file(resolve(cfg["out_dir"]), cfg["device"])  # the newest complete checkpoint
        model_config, state, train_config = GPTConfig(**ckpt["model_args"]), ckpt["model"], ckpt.get("config", {})
    else:
        raise ValueError(f"init_from must be 'resume', one of gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face "
                         f"model directory, got {cfg['init_from']!r}")
    model = GPT(model_config)
    model.load_state_dict(state)
    model.eval().to(cfg["device"])
    if cfg["compile"]:
        model.compile()
    encode, decode = load_tokenizer(train_config)

    prompt = cfg["start"]
    if prompt.startswith("FILE:"):
        with open(prompt[5:], encoding="utf-8") as f:
            prompt = f.read()
    x = torch.tensor(encode(prompt), dtype=torch.long, device=cfg["device"])[None, ...]
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    device_type = "cuda" if "cuda" in cfg["device"] else "cpu"
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    with torch.no_grad(), ctx:
        for _ in range(cfg["num_samples"]):
            y = model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"])
            print(decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
