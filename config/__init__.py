"""
nanoGPT's configuration convention, with checks.

    torchrun train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A config file is a plain Python file of assignments (`n_layer = 6`); `--key=value` overrides come after it.
Both are applied in order on top of train.py's defaults. Unlike nanoGPT's configurator.py, a key that is not
one of the defaults, or a value whose type differs from the default's (an int is accepted for a float), is
a ConfigError that names the key, so a typo never trains the wrong model silently.
"""

import ast
import math
import os


class ConfigError(ValueError):
    """A bad config file or override; the message is one line meant for the user."""


def _checked(key, value, defaults, source):
    """Return `value` for `key` converted to the default's type, or raise ConfigError."""
    if key not in defaults:
        known = ", ".join(sorted(defaults))
        raise ConfigError(f"{source}: unknown config key {key!r} (known keys: {known})")
    want = type(defaults[key])
    if want is float and type(value) is int:
        return float(value)
    if type(value) is not want:
        raise ConfigError(f"{source}: {key} must be {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config(defaults, argv):
    """Apply config files and --key=value overrides to a copy of `defaults`.

    defaults: dict of str -> int | float | bool | str (train.py's globals). argv: e.g.
    ["config/x.py", "--batch_size=8"]. An override value is read as a Python literal
    (`--lr=3e-4`, `--compile=False`); if it is not one, it is taken as a string (`--dataset=shakespeare`).
    Returns the new dict. Raises ConfigError for a missing config file, an argument that is neither a
    file nor --key=value, an unknown key, or a wrong type.
    """
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (arguments are config files or --key=value)")
            namespace = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if key.startswith("_") or type(value).__name__ in ("module", "function", "type"):
                    continue
                config[key] = _checked(key, value, defaults, arg)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"malformed override {arg!r}: expected --key=value")
            if isinstance(defaults.get(key), str):
                value = text
            else:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = text
            config[key] = _checked(key, value, defaults, arg)
    return config


# -----------------------------------------------------------------------------
# ranges of train.py's keys, checked before any process group starts

AT_LEAST_ONE = ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps",
                "eval_interval", "log_interval", "eval_iters", "pp_virtual_stages", "timeout_s", "n_expert_per_token",
                "moe_every")
NOT_NEGATIVE = ("max_iters", "warmup_iters", "lr_decay_iters", "eval_batch_size", "dp_size", "pp_size", "tp_size",
                "checkpoint_interval", "keep_checkpoints", "seed", "learning_rate", "min_lr", "weight_decay",
                "grad_clip", "n_kv_head", "ffn_hidden", "vocab_size", "n_expert", "n_shared_expert",
                "moe_aux_loss_coef", "ep_size")
POSITIVE = ("bucket_cap_mb", "rope_theta")
PROBABILITIES = ("dropout", "beta1", "beta2")  # in [0, 1)
# GPT-2 checkpoints init_from may name (tools/hf.py loads)
PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CHOICES = {
    # the one list of init_from's values (train.py reads it); a Hugging Face model directory is accepted too
    "init_from": ("scratch", "resume", "auto", *PRETRAINED),
    "block": ("gpt2", "llama"),
    "dtype": ("float32", "bfloat16", "float16"),
    "dp_type": ("fsdp", "ddp"),
    "cp_type": ("ring", "ulysses"),
    "reshard_after_forward": ("default", "always", "never"),
}


def check_train_config(config):
    """Check the range of every key of train.py's config dict (after load_config); return it unchanged.

    Sizes and counts that something divides by or loops over must be >= 1, iteration counts, learning rates,
    sizes where 0 means "derive it" and the seed >= 0, probabilities (dropout, Adam's betas) in [0, 1), choices
    one of their values, floats finite; zero_stage 0-2 and only where data parallelism replicates the parameters
    (ddp, 3d with dp_type=ddp); and n_embd divisible by n_head, n_head by n_kv_head, n_expert_per_token at most
    n_expert, lr_decay_iters > warmup_iters when decay_lr (the cosine's length), out_dir not an existing file. Keys
    absent from `config` are skipped.
    Raises ConfigError (one line naming the key, its value and the allowed range) on the first violation.
    """
    def bad(key, want):
        raise ConfigError(f"{key} must be {want}, got {config[key]!r}")

    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            bad(key, "a finite number")
    for key in AT_LEAST_ONE:
        if key in config and config[key] < 1:
            bad(key, ">= 1")
    for key in NOT_NEGATIVE:
        if key in config and config[key] < 0:
            bad(key, ">= 0")
    for key in POSITIVE:
        if key in config and config[key] <= 0:
            bad(key, "> 0")
    for key in PROBABILITIES:
        if key in config and not 0 <= config[key] < 1:
            bad(key, "in [0, 1)")
    for key, allowed in CHOICES.items():
        if key in config and config[key] not in allowed:
            if key == "init_from" and os.path.isfile(os.path.join(config[key], "config.json")):
                continue  # a Hugging Face model directory
            bad(key, "one of " + ", ".join(allowed) + (" or a Hugging Face model directory" if key == "init_from"
                                                         else ""))
    stage = config.get("zero_stage", 0)
    if stage == 3:
        raise ConfigError("zero_stage=3 shards the parameters too: that is ZeRO-3, use parallel=fsdp "
                          "(in 3d: dp_type=fsdp)")
    if stage not in (0, 1, 2):
        bad("zero_stage", "0 (DDP), 1 (optimizer states sharded) or 2 (and gradients)")
    parallel = config.get("parallel")
    replicated_dp = parallel == "ddp" or (parallel == "3d" and config.get("dp_type") == "ddp")
    if stage and not replicated_dp:
        raise ConfigError(f"zero_stage={stage} applies to parallel=ddp and to 3d with dp_type=ddp, not to "
                          f"parallel={parallel!r}" + (" with dp_type='fsdp' (ZeRO-3 already)" if parallel == "3d"
                                                      else ""))
    if {"n_embd", "n_head"} <= config.keys() and config["n_embd"] % config["n_head"]:
        raise ConfigError(f"n_embd={config['n_embd']} must be divisible by n_head={config['n_head']}")
    if config.get("n_kv_head") and config.get("n_head", 1) % config["n_kv_head"]:
        raise ConfigError(f"n_head={config['n_head']} must be a multiple of n_kv_head={config['n_kv_head']}")
    if config.get("n_expert") and config.get("n_expert_per_token", 1) > config["n_expert"]:
        raise ConfigError(f"n_expert_per_token={config['n_expert_per_token']} must be at most "
                          f"n_expert={config['n_expert']}")
    if config.get("decay_lr") and config.get("lr_decay_iters", 1) <= config.get("warmup_iters", 0):
        raise ConfigError(f"lr_decay_iters={config['lr_decay_iters']} must be greater than warmup_iters="
                          f"{config['warmup_iters']} when decay_lr (or set decay_lr=False)")
    out_dir = config.get("out_dir")
    if out_dir and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir {out_dir!r} exists and is not a directory")
    return config
