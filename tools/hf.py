"""
GPT-2 and Llama weights between Hugging Face `transformers` and model.py's layout, both ways.

    python train.py config/finetune_shakespeare.py                    # init_from="gpt2-xl": finetune GPT-2
    python sample.py --init_from=gpt2 --start="Hello, I'm a language model,"
    python -m tools.hf out-shakespeare-char-cpu hf-shakespeare-char         # any checkpoint -> a Hugging Face directory

In: `init_from` = "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" (the Hub's names: read from the local Hugging Face
cache, downloaded into it when the network allows; HF_HUB_OFFLINE=1 never tries) or a local Hugging Face model
directory (config.json + weights, as `save_pretrained` writes). `AutoModelForCausalLM.from_pretrained` reads them;
`from_hf` maps them onto model.py's names; train.py hands the result to the strategy, whose slice_init shards them
exactly as it shards a fresh init (parallel/__init__.py), for every strategy and variant.
Out: `python -m tools.hf CHECKPOINT OUT_DIR` writes any of our checkpoints (an out_dir, a step directory, ckpt.pt, or a
sharded DCP directory, read by parallel.load_checkpoint_file) as a Hugging Face directory (model.safetensors,
config.json) that `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads (GPT2LMHeadModel or LlamaForCausalLM).

The mapping (GPT-2's Conv1D stores its weight as (in, out), y = x W + b; nn.Linear as (out, in), y = x Wᵀ + b):
    transformer.wte / wpe / ln_1 / ln_2 / ln_f          the same names, the same tensors
    h.i.attn.c_attn  (C, 3C) = [q | k | v]              h.i.attn.{q,k,v}_proj: the three column blocks, transposed
    h.i.attn.c_proj, mlp.c_fc, mlp.c_proj                h.i.attn.out_proj, mlp.up_proj, mlp.down_proj, transposed
    lm_head                                              tied to wte in both models
What differs between the models is checked, not assumed: GPT-2's GELU is the tanh approximation ("gelu_new"), so a
converted model gets gelu_approximate="tanh"; options model.py does not have (attention scaled by the layer index,
upcast attention, a head not tied to the embedding) are a one-line ValueError. Exporting a model trained without
biases writes zero biases (the same function).

Llama (model_type "llama", LlamaForCausalLM: Llama 2 and 3, TinyLlama, SmolLM...) maps name for name onto the llama
block: model.embed_tokens -> transformer.wte, layers.i.input_layernorm / post_attention_layernorm -> h.i.ln_1 / ln_2,
self_attn.{q,k,v,o}_proj -> attn.{q,k,v,out}_proj, mlp.{gate,up,down}_proj -> the same, model.norm -> ln_f. The layouts
agree without permutation: Hugging Face's q/k rows are in the rotate-half RoPE order model.apply_rope uses, and its
k_proj/v_proj hold num_key_value_heads heads of which query head i reads head i // (heads / kv heads) (repeat_kv),
model.py's grouped-query attention: n_kv_head = num_key_value_heads. Checked, else one line: SiLU, RMSNorm eps 1e-5
(model.py's), plain RoPE (no rope_scaling: Llama 3.1's "llama3" scaling is not implemented), no biases, a head tied to
the embedding (Llama 3.2 1B/3B, SmolLM; Llama 3 8B's separate head does not convert). MoE models do not convert.

Vocabulary: the pretrained model's, GPT-2's 50257 tokens, unpadded (nanoGPT does the same): train.py's default pads
to 50304 for speed only for a model trained from scratch. Every strategy runs with 50257 (tensor parallelism splits
it unevenly, e.g. 25129 + 25128). A checkpoint trained with the padded 50304 exports as it is (the extra 47 rows are
never produced by the tokenizer; transformers loads it).
block_size: a model can use fewer positions than GPT-2's 1024 (`block_size` < n_positions crops the position
embedding, nanoGPT's crop_block_size); more is a ValueError.
"""

import argparse
import os
import sys
from dataclasses import asdict

import torch

from config import PRETRAINED  # "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl": what init_from may name
from model import GPTConfig

GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # HF activation_function -> F.gelu's


def is_hf_source(init_from):
    """Whether train.py's / sample.py's init_from names GPT-2 weights: a Hub name of PRETRAINED or a directory with a
    config.json (a Hugging Face model directory)."""
    return init_from in PRETRAINED or os.path.isfile(os.path.join(init_from, "config.json"))


def _linear(conv1d_weight):
    """A Conv1D weight (in, out) as nn.Linear's (out, in), contiguous."""
    return conv1d_weight.t().contiguous()


def config_from_hf(hf_config, block_size=0, dropout=0.0, init_seed=1337):
    """model.py's GPTConfig for a transformers GPT2Config (its sizes, biases, GELU) or LlamaConfig (llama_config_from);
    block_size (0: its n_positions / max_position_embeddings) at most that; dropout as given (GPT-2's own are 0.1
    everywhere; nanoGPT keeps the run's). Raises ValueError (one line) for a model type or an option model.py does not
    implement."""
    c = hf_config
    if c.model_type == "llama":
        return llama_config_from(c, block_size, dropout, init_seed)
    if c.model_type != "gpt2":
        raise ValueError(f"only GPT-2 and Llama models convert (model_type 'gpt2' or 'llama'), got {c.model_type!r}")
    unsupported = {"activation_function": c.activation_function not in GELU,
                   "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
                   "reorder_and_upcast_attn": c.reorder_and_upcast_attn,
                   "scale_attn_weights": not c.scale_attn_weights,
                   "layer_norm_epsilon": abs(c.layer_norm_epsilon - 1e-5) > 1e-12,
                   "tie_word_embeddings": not getattr(c, "tie_word_embeddings", True)}
    bad = [f"{k}={getattr(c, k, None)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"this GPT-2 has options model.py does not implement: {', '.join(bad)}")
    block_size = block_size or c.n_positions
    if block_size > c.n_positions:
        raise ValueError(f"block_size={block_size} exceeds the pretrained model's {c.n_positions} positions")
    return GPTConfig(block_size=block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                     n_embd=c.n_embd, dropout=dropout, bias=True, block="gpt2", ffn_hidden=c.n_inner or 0,
                     gelu_approximate=GELU[c.activation_function], init_seed=init_seed)


def llama_config_from(c, block_size=0, dropout=0.0, init_seed=1337):
    """model.py's GPTConfig (llama block, grouped-query attention) for a transformers LlamaConfig; see config_from_hf
    and the module docstring for what is checked."""
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0),
                                                   "rope_type": "default" if not getattr(c, "rope_scaling", None)
                                                   else c.rope_scaling.get("rope_type", "scaled")}
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    unsupported = {"hidden_act": c.hidden_act != "silu",
                   "rms_norm_eps": abs(c.rms_norm_eps - 1e-5) > 1e-12,
                   "rope_parameters": rope.get("rope_type", "default") != "default",
                   "attention_bias": getattr(c, "attention_bias", False),
                   "mlp_bias": getattr(c, "mlp_bias", False),
                   "head_dim": head_dim * c.num_attention_heads != c.hidden_size,
                   "pretraining_tp": getattr(c, "pretraining_tp", 1) != 1,
                   "tie_word_embeddings": not getattr(c, "tie_word_embeddings", False)}
    bad = [f"{k}={getattr(c, k, None)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"this Llama has options model.py does not implement: {', '.join(bad)}")
    block_size = block_size or c.max_position_embeddings
    if block_size > c.max_position_embeddings:
        raise ValueError(f"block_size={block_size} exceeds the pretrained model's {c.max_position_embeddings} "
                         f"positions")
    return GPTConfig(block_size=block_size, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                     n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size,
                     ffn_hidden=c.intermediate_size, rope_theta=float(rope["rope_theta"]), dropout=dropout, bias=False,
                     block="llama", init_seed=init_seed)


LLAMA_NAMES = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.q_proj": "attn.q_proj",
               "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
               "self_attn.o_proj": "attn.out_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
               "mlp.down_proj": "mlp.down_proj"}


def from_hf(hf_state, config):
    """{GPT name: tensor} (model.py's state_dict, lm_head.weight the same tensor as wte's) from a GPT2LMHeadModel's
    or (config.block "llama") a LlamaForCausalLM's state_dict, for `config` (config_from_hf's; GPT-2's position
    embedding cropped to config.block_size). fp32. Raises KeyError naming a tensor the Hugging Face state lacks."""
    if config.block == "llama":
        hf = {k: v.detach().float() for k, v in hf_state.items()}
        out = {"transformer.wte.weight": hf["model.embed_tokens.weight"],
               "transformer.ln_f.weight": hf["model.norm.weight"]}
        for i in range(config.n_layer):
            for src, dst in LLAMA_NAMES.items():
                out[f"transformer.h.{i}.{dst}.weight"] = hf[f"model.layers.{i}.{src}.weight"]
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out
    hf = {k.removeprefix("model."): v for k, v in hf_state.items()}  # plain GPT2Model states have no "transformer."
    hf = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v.detach().float()
          for k, v in hf.items()}
    C = config.n_embd
    out = {"transformer.wte.weight": hf["transformer.wte.weight"],
           "transformer.wpe.weight": hf["transformer.wpe.weight"][:config.block_size].clone(),
           "transformer.ln_f.weight": hf["transformer.ln_f.weight"],
           "transformer.ln_f.bias": hf["transformer.ln_f.bias"]}
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                out[f"{dst}{ln}.{p}"] = hf[f"{src}{ln}.{p}"]
        w, b = hf[f"{src}attn.c_attn.weight"], hf[f"{src}attn.c_attn.bias"]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}attn.{proj}.weight"] = _linear(w[:, j * C:(j + 1) * C])
            out[f"{dst}attn.{proj}.bias"] = b[j * C:(j + 1) * C].clone()
        for hf_name, name in (("attn.c_proj", "attn.out_proj"), ("mlp.c_fc", "mlp.up_proj"),
                              ("mlp.c_proj", "mlp.down_proj")):
            out[f"{dst}{name}.weight"] = _linear(hf[f"{src}{hf_name}.weight"])
            out[f"{dst}{name}.bias"] = hf[f"{src}{hf_name}.bias"]
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def hf_config_from(config):
    """The transformers GPT2Config (gpt2 block) or LlamaConfig (llama block) of a model.py GPTConfig. Raises
    ValueError (one line) for an MoE model."""
    from transformers import GPT2Config, LlamaConfig
    if config.n_expert:
        raise ValueError(f"MoE models (n_expert={config.n_expert}) do not export to Hugging Face")
    if config.block == "llama":
        return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.ffn_hidden,
                           num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                           num_key_value_heads=config.n_kv_head, max_position_embeddings=config.block_size,
                           rms_norm_eps=1e-5, rope_theta=config.rope_theta, tie_word_embeddings=True,
                           attention_dropout=config.dropout)
    if config.n_kv_head != config.n_head:
        raise ValueError(f"GPT-2 has no grouped-query attention (n_kv_head={config.n_kv_head}, n_head={config.n_head})")
    gpt2_vocab = config.vocab_size >= 50257  # then <|endoftext|> is token 50256
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, n_inner=config.ffn_hidden,
                      activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
                      resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                      layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                      bos_token_id=50256 if gpt2_vocab else None, eos_token_id=50256 if gpt2_vocab else None)


def to_hf(state, config):
    """The inverse of from_hf: a GPT2LMHeadModel (or LlamaForCausalLM) state_dict ({HF name: tensor}, fp32,
    contiguous) from model.py's state_dict. Missing GPT-2 biases (a model trained with bias=False) are zeros;
    lm_head.weight is wte's."""
    C, out = config.n_embd, {}
    if config.block == "llama":
        out["model.embed_tokens.weight"] = state["transformer.wte.weight"].detach().float().contiguous()
        for i in range(config.n_layer):
            for dst, src in LLAMA_NAMES.items():
                out[f"model.layers.{i}.{dst}.weight"] = state[f"transformer.h.{i}.{src}.weight"].detach().float()
        out["model.norm.weight"] = state["transformer.ln_f.weight"].detach().float()
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out

    def get(name, bias_size=None):
        """state[name] in fp32; a missing bias of bias_size is zeros; anything else missing is a KeyError."""
        if name in state:
            return state[name].detach().float()
        if bias_size is None:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        return torch.zeros(bias_size)

    out["transformer.wte.weight"] = get("transformer.wte.weight").contiguous()
    out["transformer.wpe.weight"] = get("transformer.wpe.weight").contiguous()
    out["transformer.ln_f.weight"] = get("transformer.ln_f.weight")
    out["transformer.ln_f.bias"] = get("transformer.ln_f.bias", C)
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{p}{ln}.weight"] = get(f"{p}{ln}.weight")
            out[f"{p}{ln}.bias"] = get(f"{p}{ln}.bias", C)
        qkv = ("q_proj", "k_proj", "v_proj")
        out[f"{p}attn.c_attn.weight"] = torch.cat([get(f"{p}attn.{x}.weight").t() for x in qkv], dim=1).contiguous()
        out[f"{p}attn.c_attn.bias"] = torch.cat([get(f"{p}attn.{x}.bias", C) for x in qkv])
        for hf_name, name, width in (("attn.c_proj", "attn.out_proj", C),
                                     ("mlp.c_fc", "mlp.up_proj", config.ffn_hidden),
                                     ("mlp.c_proj", "mlp.down_proj", C)):
            out[f"{p}{hf_name}.weight"] = get(f"{p}{name}.weight").t().contiguous()
            out[f"{p}{hf_name}.bias"] = get(f"{p}{name}.bias", width)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def load_pretrained(init_from, block_size=0, dropout=0.0, init_seed=1337):
    """(GPTConfig, {GPT name: full fp32 tensor}) of GPT-2 or Llama weights: init_from is a name of PRETRAINED (the
    Hugging Face cache; downloaded unless HF_HUB_OFFLINE=1) or a local model directory, read by
    transformers.AutoModelForCausalLM.from_pretrained; block_size and dropout as in config_from_hf. Raises ValueError
    (one line) if the weights cannot be found or read, or do not convert."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "not in the Hugging Face cache (HF_HUB_OFFLINE=1 or no network)" if init_from in PRETRAINED else \
            "not a readable Hugging Face GPT-2 or Llama directory"
        raise ValueError(f"init_from={init_from!r}: {where}: {first}") from None
    config = config_from_hf(hf_model.config, block_size, dropout, init_seed)
    state = from_hf(hf_model.state_dict(), config)
    del hf_model
    return config, state


def save_hf(state, config, out_dir):
    """Write model.py's state_dict `state` of a model of `config` to out_dir as a Hugging Face GPT-2 or Llama directory
    (model.safetensors, config.json, generation_config.json) through save_pretrained, after loading it into that
    model strictly (every tensor accounted for). Returns out_dir."""
    from transformers import AutoModelForCausalLM
    hf_model = AutoModelForCausalLM.from_config(hf_config_from(config))
    hf_model.load_state_dict(to_hf(state, config), strict=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def export_checkpoint(checkpoint, out_dir):
    """Convert one of our checkpoints to a Hugging Face directory: `checkpoint` is an out_dir (its newest complete
    checkpoint), a step directory, a ckpt.pt file, or a DCP directory (parallel.load_checkpoint_file gathers it in
    memory). Returns the GPTConfig. Raises FileNotFoundError or ValueError (one line) for a missing or unusable
    checkpoint."""
    from parallel.checkpoint import load_checkpoint_file, resolve
    path = resolve(checkpoint)
    ckpt = load_checkpoint_file(path, "cpu")
    config = GPTConfig(**ckpt["model_args"])
    state = dict(ckpt["model"])
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    save_hf(state, config, out_dir)
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write one of our checkpoints as a Hugging Face GPT-2 or Llama "
                                                 "directory "
                                                 "(model.safetensors + config.json) that transformers loads.")
    parser.add_argument("checkpoint", help="an out_dir (its newest complete checkpoint), a step directory, a ckpt.pt, "
                                           "or a sharded DCP directory")
    parser.add_argument("out_dir", help="the Hugging Face directory to write")
    args = parser.parse_args(argv)
    try:
        config = export_checkpoint(args.checkpoint, args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out_dir}: {'Llama' if config.block == 'llama' else 'GPT-2'} with {asdict(config)}; load it "
          f"with transformers.AutoModelForCausalLM.from_pretrained({args.out_dir!r})")


if __name__ == "__main__":
    main()
