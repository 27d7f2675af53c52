"""Shared pytest fixtures: the offline data the tests use.

The tiny-shakespeare text comes from $SHAKESPEARE_INPUT, else ../shared/data (this workplace's layout), else the
copy that `python data/shakespeare_char/prepare.py` downloaded; GPT-2 BPE files from $TIKTOKEN_CACHE_DIR or
../shared/data/tiktoken_cache. .ci/run sets both variables.
"""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")


def _locate(env_var, *candidates):
    """$env_var if set, else the first existing candidate; fail (not skip) naming env_var if there is none."""
    if os.environ.get(env_var):
        paths = [os.environ[env_var]]
    else:
        paths = [p for p in candidates if os.path.exists(p)] or list(candidates)
    if not os.path.exists(paths[0]):
        pytest.fail(f"{paths[0]} not found: set {env_var} to point at it")
    return paths[0]


@pytest.fixture(scope="session")
def shakespeare_path():
    """Path of tinyshakespeare input.txt."""
    return _locate("SHAKESPEARE_INPUT", os.path.join(SHARED, "tinyshakespeare", "input.txt"),
                   os.path.join(REPO, "data", "shakespeare_char", "input.txt"))


@pytest.fixture(scope="session")
def tiktoken_cache():
    """A tiktoken cache directory holding the GPT-2 BPE files."""
    return _locate("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))


@pytest.fixture(scope="session")
def shakespeare_char_dir(tmp_path_factory, shakespeare_path):
    """A directory with the char-level train.bin, val.bin and meta.pkl (prepared once per session)."""
    from data.shakespeare_char.prepare import main
    out = tmp_path_factory.mktemp("shakespeare_char")
    main(["--input", shakespeare_path, "--out-dir", str(out)])
    return str(out)


def pytest_collection_modifyitems(config, items):
    """DistributedTestCase methods need a process group: pytest runs them through each file's test_torchrun
    launcher, so outside torchrun they are deselected rather than reported as skipped."""
    from tests.distributed import UNDER_TORCHRUN, DistributedTestCase
    if UNDER_TORCHRUN:
        return
    keep = [i for i in items if not (i.cls and issubclass(i.cls, DistributedTestCase))]
    deselected = [i for i in items if i not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep
