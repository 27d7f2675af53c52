"""config/__init__.py: config files and --key=value overrides, with type checks."""

import pytest

from config import ConfigError, load_config

DEFAULTS = {"batch_size": 12, "learning_rate": 6e-4, "compile": True, "dataset": "openwebtext"}


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("import math\nbatch_size = 32\nlearning_rate = 1e-3\n_private = object()\n")
    cfg = load_config(DEFAULTS, [str(path), "--batch_size=8", "--compile=False", "--dataset=shakespeare_char"])
    assert cfg == {"batch_size": 8, "learning_rate": 1e-3, "compile": False, "dataset": "shakespeare_char"}
    assert DEFAULTS["batch_size"] == 12  # the defaults are not modified


def test_int_accepted_for_float_and_strings_taken_as_written():
    cfg = load_config(DEFAULTS, ["--learning_rate=1", "--dataset=123"])
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float
    assert cfg["dataset"] == "123"


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=8"], "unknown config key 'batch_sise'"),
    (["--batch_size=8.5"], "batch_size must be int, got float 8.5"),
    (["--compile=1"], "compile must be bool, got int 1"),
    (["--learning_rate=fast"], "learning_rate must be float, got str 'fast'"),
    (["--batch_size"], "malformed override '--batch_size'"),
    (["config/nope.py"], "config file 'config/nope.py' not found"),
])
def test_errors_name_the_problem(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(DEFAULTS, argv)


def test_config_file_errors(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("batch_size = 'big'\n")
    with pytest.raises(ConfigError, match="bad.py: batch_size must be int"):
        load_config(DEFAULTS, [str(path)])
    path.write_text("n_layers = 6\n")
    with pytest.raises(ConfigError, match="unknown config key 'n_layers'"):
        load_config(DEFAULTS, [str(path)])


def test_repo_configs_load():
    """Every config file in config/ is valid against train.py's defaults."""
    import glob
    from train import DEFAULTS as TRAIN_DEFAULTS
    files = sorted(glob.glob("config/train_*.py"))
    assert len(files) >= 4
    for f in files:
        load_config(TRAIN_DEFAULTS, [f])
