"""Shared helpers for the data/*/prepare.py scripts: find or download the input, write outputs atomically."""
import contextlib
import hashlib
import os
import pickle
import sys
import urllib.request

import numpy as np

# Karpathy's tiny-shakespeare, the file nanoGPT downloads (used by data/shakespeare*/prepare.py).
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_ENV = "SHAKESPEARE_INPUT"


def sha256_file(path):
    """Return the hex sha256 of the file at `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def require_file(path, source):
    """Return `path` if it is an existing file, else raise a one-line FileNotFoundError naming it and `source`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path} (from {source})")
    return path


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Yield a temp file next to `path`; os.replace it onto `path` on success, delete it on error."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # same directory, so os.replace is atomic; normal (umask) permissions
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def download(url, dest, sha256=None):
    """Download `url` (any scheme urllib knows, file:// included) to `dest` atomically, checking sha256 if given."""
    print(f"downloading {url} -> {dest}")
    h = hashlib.sha256()
    with atomic_open(dest) as f, urllib.request.urlopen(url) as r:
        for chunk in iter(lambda: r.read(1 << 20), b""):
            h.update(chunk)
            f.write(chunk)
        if sha256 is not None and h.hexdigest() != sha256:  # raising inside atomic_open removes the temp file
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {h.hexdigest()}")
    return dest


def resolve_input(cli_path, env_var, url, sha256, dest):
    """Return the input file path: `cli_path`, else $`env_var`, else an existing `dest`, else download `url` to `dest`.

    A local file whose sha256 differs from `sha256` only gets a warning (it may be the user's own text);
    a download with the wrong hash raises ValueError and leaves nothing behind.
    """
    if cli_path:
        path = require_file(cli_path, "--input")
    elif os.environ.get(env_var):
        path = require_file(os.environ[env_var], f"${env_var}")
    elif os.path.isfile(dest):
        path = dest
    else:
        return download(url, dest, sha256)
    if sha256 is not None and (actual := sha256_file(path)) != sha256:
        print(f"warning: {path} has sha256 {actual}, expected {sha256}; using it anyway", file=sys.stderr)
    return path


def read_shakespeare(cli_path, dest_dir):
    """The tiny-shakespeare text: from `cli_path`, else $SHAKESPEARE_INPUT, else dest_dir/input.txt, downloaded
    (and checked against its sha256) if it is not there yet."""
    path = resolve_input(cli_path, SHAKESPEARE_ENV, SHAKESPEARE_URL, SHAKESPEARE_SHA256,
                         os.path.join(dest_dir, "input.txt"))
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def write_tokens(path, ids):
    """Write token ids to `path` as a flat uint16 array, atomically; ValueError if any id is outside [0, 65536)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**16):
        raise ValueError(f"token ids must be in [0, 65536) to fit uint16, got range [{ids.min()}, {ids.max()}]")
    with atomic_open(path) as f:
        ids.astype(np.uint16).tofile(f)


def write_meta(path, meta):
    """Pickle the `meta` dict to `path` atomically."""
    with atomic_open(path) as f:
        pickle.dump(meta, f)


def add_common_args(parser, default_out_dir, input_nargs=None):
    """Add --input FILE (`input_nargs` as for argparse) and --out-dir DIR (default `default_out_dir`) to `parser`."""
    what = "local input text files" if input_nargs else "local input text file"
    parser.add_argument("--input", nargs=input_nargs, help=f"{what} (skips the download)")
    parser.add_argument("--out-dir", default=default_out_dir, help="where to write train.bin, val.bin, meta.pkl")
    return parser
