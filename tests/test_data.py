"""Tests for the data/ prepare scripts and data/common.py helpers (offline: local tiny-shakespeare + tiktoken cache)."""
import os
import pickle

import numpy as np
import pytest

from data import common


@pytest.fixture(scope="module")
def text(shakespeare_path):
    """The tinyshakespeare text."""
    with open(shakespeare_path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def enc(monkeypatch, tiktoken_cache):
    """gpt2 tiktoken encoding, loaded offline from TIKTOKEN_CACHE_DIR."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", tiktoken_cache)
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def _load(out_dir):
    """Read train.bin, val.bin and meta.pkl from `out_dir`."""
    train = np.fromfile(os.path.join(out_dir, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(out_dir, "val.bin"), dtype=np.uint16)
    with open(os.path.join(out_dir, "meta.pkl"), "rb") as f:
        meta = pickle.load(f)
    return train, val, meta


def test_shakespeare_char(tmp_path, shakespeare_path, text):
    from data.shakespeare_char.prepare import main
    main(["--input", shakespeare_path, "--out-dir", str(tmp_path)])
    train, val, meta = _load(tmp_path)
    assert len(train) == 1_003_854 and len(val) == 111_540
    assert meta["vocab_size"] == 65 and len(meta["itos"]) == 65 and len(meta["stoi"]) == 65
    assert "".join(meta["itos"][int(i)] for i in train[:20]) == text[:20]
    assert "".join(meta["itos"][int(i)] for i in val[-20:]) == text[-20:]
    assert sorted(os.listdir(tmp_path)) == ["meta.pkl", "train.bin", "val.bin"]  # no temp files left


def test_shakespeare_bpe(tmp_path, shakespeare_path, text, enc):
    from data.shakespeare.prepare import main
    main(["--input", shakespeare_path, "--out-dir", str(tmp_path)])
    train, val, meta = _load(tmp_path)
    assert len(train) == 301_966 and len(val) == 36_059
    assert meta == {"vocab_size": 50257, "tiktoken_encoding": "gpt2"}
    head = enc.decode(train[:100].tolist())
    assert len(head) > 100 and text.startswith(head)
    assert text.endswith(enc.decode(val[-50:].tolist()))


def test_openwebtext_local_files(tmp_path, enc):
    from data.openwebtext.prepare import main
    words = "the quick brown fox jumps over lazy dogs, Ünïcödé — naïve café 1234 !?".split()
    lines = [f"doc {i}: " + " ".join(words[(i * 7 + k) % len(words)] for k in range(1 + i % 13)) for i in range(200)]
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    main(["--input", str(src), "--out-dir", str(out), "--val-fraction", "0.1", "--num-proc", "2",
          "--cache-dir", str(tmp_path / "hf_cache")])
    train, val, meta = _load(out)
    expected = sum(len(enc.encode_ordinary(line)) + 1 for line in lines)
    assert len(train) + len(val) == expected
    assert os.path.getsize(out / "train.bin") == 2 * len(train)
    assert meta == {"vocab_size": 50257, "tiktoken_encoding": "gpt2"}

    def docs(arr):  # split on eot and decode each document
        ends = np.flatnonzero(arr == enc.eot_token)
        assert len(arr) and arr[-1] == enc.eot_token
        return [enc.decode(d[:-1].tolist()) for d in np.split(arr, ends + 1)[:-1]]  # d[:-1] drops the eot

    train_docs, val_docs = docs(train), docs(val)
    assert len(train_docs) == 180 and len(val_docs) == 20
    assert sorted(train_docs + val_docs) == sorted(lines)  # every line exactly once, in one split
    assert len(train) == sum(len(enc.encode_ordinary(d)) + 1 for d in train_docs)
    assert len(val) == sum(len(enc.encode_ordinary(d)) + 1 for d in val_docs)


def test_resolve_input_missing_cli_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        common.resolve_input(missing, "NANOPARALLEL_TEST_UNSET", "file:///unused", None, str(tmp_path / "dest.txt"))


def test_resolve_input_env_var(tmp_path, monkeypatch, capsys):
    src = tmp_path / "mine.txt"
    src.write_text("hello")
    monkeypatch.setenv("NANOPARALLEL_TEST_INPUT", str(src))
    # a local file with the wrong hash is used, with only a warning
    got = common.resolve_input(None, "NANOPARALLEL_TEST_INPUT", "file:///unused", "0" * 64, str(tmp_path / "d"))
    assert got == str(src)
    assert "warning" in capsys.readouterr().err
    monkeypatch.setenv("NANOPARALLEL_TEST_INPUT", str(tmp_path / "gone.txt"))
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        common.resolve_input(None, "NANOPARALLEL_TEST_INPUT", "file:///unused", None, str(tmp_path / "d"))


def test_resolve_input_download(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOPARALLEL_TEST_UNSET", raising=False)
    src = tmp_path / "remote.txt"
    src.write_bytes(b"to be or not to be\n")
    url = src.as_uri()
    dest = tmp_path / "sub" / "input.txt"
    good = common.sha256_file(src)
    with pytest.raises(ValueError, match="0{64}") as err:
        common.resolve_input(None, "NANOPARALLEL_TEST_UNSET", url, "0" * 64, str(dest))
    assert good in str(err.value)  # message shows the actual hash too
    assert os.listdir(dest.parent) == []  # nothing left behind
    assert common.resolve_input(None, "NANOPARALLEL_TEST_UNSET", url, good, str(dest)) == str(dest)
    assert dest.read_bytes() == b"to be or not to be\n"
    assert os.listdir(dest.parent) == ["input.txt"]


def test_sha256_file(tmp_path, shakespeare_path):
    p = tmp_path / "abc"
    p.write_bytes(b"abc")
    assert common.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert common.sha256_file(shakespeare_path) == common.SHAKESPEARE_SHA256


def test_write_tokens(tmp_path):
    path = tmp_path / "x.bin"
    common.write_tokens(str(path), [0, 1, 65535])
    assert np.fromfile(path, dtype=np.uint16).tolist() == [0, 1, 65535]
    with pytest.raises(ValueError):
        common.write_tokens(str(tmp_path / "y.bin"), [5, 65536])
    with pytest.raises(ValueError):
        common.write_tokens(str(tmp_path / "y.bin"), [-1])
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]
