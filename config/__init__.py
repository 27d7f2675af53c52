"""
nanoGPT's configuration convention, with checks.

    torchrun train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A config file is a plain Python file of assignments (`n_layer = 6`); `--key=value` overrides come after it.
Both are applied in order on top of train.py's defaults. Unlike nanoGPT's configurator.py, a key that is not
one of the defaults, or a value whose type differs from the default's (an int is accepted for a float), is
a ConfigError that names the key, so a typo never trains the wrong model silently.
"""

import ast
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
