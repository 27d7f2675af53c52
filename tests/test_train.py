"""
train.py and sample.py end to end, as subprocesses: exact resume, a real Shakespeare run whose loss falls (with
wandb offline), and one-line errors for bad input.
"""

import json
import os
import sys

import pytest

from tests.distributed import run_command, torchrun_cmd

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--compile=False",
        "--learning_rate=1e-3", "--warmup_iters=5", "--lr_decay_iters=20", "--min_lr=1e-4", "--eval_iters=2",
        "--log_interval=1", "--dtype=float32"]


def train(nproc, args, timeout_s=300):
    """Run train.py (plain python for nproc=0, else torchrun with nproc processes); return (code, output)."""
    cmd = [sys.executable, "train.py", *args] if nproc == 0 else torchrun_cmd(nproc, "train.py", *args)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return run_command(cmd, timeout_s, env)


def metrics(out_dir, key):
    """{iter: value} of `key` from out_dir/metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {m["iter"]: m[key] for m in map(json.loads, f) if key in m}


@pytest.mark.parametrize("nproc, parallel, extra", [(0, "single", []), (2, "ddp", []), (2, "fsdp", []),
                                                    (4, "3d", ["--dp_size=2", "--pp_size=2", "--tp_size=1"])])
def test_resume_continues_exactly(tmp_path, shakespeare_char_dir, nproc, parallel, extra):
    """20 steps straight vs 10 steps + resume for 10: identical losses (dropout on, so the RNG state matters).
    fsdp and 3d (dp2 x pp2, FSDP) resume from a sharded (DCP) checkpoint directory, which sample.py also reads."""
    common = [f"--data_dir={shakespeare_char_dir}", *TINY, "--dropout=0.1", "--eval_interval=10",
              f"--parallel={parallel}", "--variant=pytorch" if parallel == "single" else "--variant=custom",
              "--gradient_accumulation_steps=2", *extra]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    for args in ([f"--out_dir={straight}", "--max_iters=20"],
                 [f"--out_dir={split}", "--max_iters=10"],
                 [f"--out_dir={split}", "--max_iters=20", "--init_from=resume"]):
        code, out = train(nproc, [*common, *args])
        assert code == 0, out[-5000:]
    a, b = metrics(straight, "train/loss"), metrics(split, "train/loss")
    assert sorted(a) == list(range(20)) and sorted(b) == list(range(20))
    assert a == b
    assert metrics(straight, "val/loss") == metrics(split, "val/loss")

    # sample.py loads the checkpoint (single file, or DCP directory converted in memory) and decodes characters
    code, out = run_command([sys.executable, "sample.py", f"--out_dir={straight}", "--num_samples=1",
                             "--max_new_tokens=30", "--start=ROMEO:"], 120)
    assert code == 0, out
    assert out.startswith("ROMEO:") and len(out.splitlines()[0]) >= 6


def test_ddp_on_shakespeare_loss_falls_and_logs_to_wandb_offline(tmp_path, shakespeare_char_dir):
    """The CPU recipe's model with the custom DDP on 2 processes, 60 iterations: the val loss falls from ~4.2
    (uniform over 65 characters) to below 3.0; metrics reach metrics.jsonl and an offline wandb run."""
    out_dir = str(tmp_path / "out")
    code, out = train(2, ["config/train_shakespeare_char_ddp_custom_cpu.py", f"--data_dir={shakespeare_char_dir}",
                          f"--out_dir={out_dir}", "--max_iters=60", "--eval_interval=60", "--eval_iters=5",
                          "--warmup_iters=10", "--lr_decay_iters=60", "--log_interval=10", "--wandb_log=True"])
    assert code == 0, out[-5000:]
    val = metrics(out_dir, "val/loss")
    assert val[0] > 4.0 and val[60] < 3.0, val
    bus = metrics(out_dir, "comm/all_reduce_bus_bytes")
    assert len(bus) == 6 and all(v > 0 for v in bus.values())
    runs = os.listdir(os.path.join(out_dir, "wandb"))
    assert any(r.startswith("offline-run-") for r in runs), runs


@pytest.mark.parametrize("nproc, args, message", [
    (0, ["--parallel=nope"], "no strategy parallel='nope' variant='pytorch'; available: 3d/cuda, 3d/custom, 3d/nccl, "
                             "3d/pytorch, 3d/triton, cp/cuda"),
    (0, ["--n_layers=2"], "unknown config key 'n_layers'"),
    (0, ["--dtype=fp8"], "dtype must be one of float32, bfloat16, float16, got 'fp8'"),
    (0, ["--data_dir=/nonexistent"], "data file /nonexistent/train.bin not found: run "
                                     "`python data/openwebtext/prepare.py`"),
    (0, ["--data_dir=MALFORMED"], "train.bin is malformed (3 bytes: not whole uint16 tokens"),
    (0, ["--init_from=resume", "--out_dir=CORRUPT"], "is corrupt or unreadable"),
    (2, ["--parallel=single"], "parallel='single' runs on one process, but WORLD_SIZE=2"),
    (2, ["--parallel=ddp", "--gradient_accumulation_steps=3"], "must be divisible by the data-parallel size 2"),
    (0, ["--batch_size=0"], "batch_size must be >= 1, got 0"),
    (0, ["--eval_batch_size=-1"], "eval_batch_size must be >= 0, got -1"),
    (0, ["--out_dir=AFILE"], "exists and is not a directory"),
    (0, ["--init_from=resume"], "init_from='resume': no complete checkpoint in out_dir"),
    (2, ["--parallel=ddp", "--dropout=1.5"], "dropout must be in [0, 1), got 1.5"),
])
def test_bad_input_is_a_one_line_error(tmp_path, shakespeare_char_dir, nproc, args, message):
    """Each bad input: a non-zero exit and one line naming it, no traceback (torchrun's own aside); the range checks
    run before any process group starts (tests/test_fault.py checks every key's range in process)."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ckpt.pt").write_bytes(b"not a checkpoint")
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "train.bin").write_bytes(b"abc")
    (tmp_path / "afile").write_text("not a directory")
    places = {"CORRUPT": corrupt, "MALFORMED": malformed, "AFILE": tmp_path / "afile"}
    for word, path in places.items():
        args = [a.replace(word, str(path)) for a in args]
    if not any(a.startswith("--data_dir") for a in args):
        args.append(f"--data_dir={shakespeare_char_dir}")
    code, out = train(nproc, [*TINY, "--max_iters=1", f"--out_dir={tmp_path / 'out'}", *args], timeout_s=120)
    assert code != 0
    assert message in out, out[-3000:]
    assert out.count("Traceback") == (1 if nproc else 0), out[-3000:]  # torchrun's own, on a failed child
