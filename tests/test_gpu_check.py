"""
tools/gpu_check.py, the one command for a GPU machine, proven on CPU so that the first GPU minute is not spent on a
typo.

- test_dry_run: `python -m tools.gpu_check --dry-run` runs the whole orchestration (every phase's workers under torchrun
  or alone, time limits, the JSON and Markdown writers) on CPU with gloo, Triton's interpreter and tiny sizes; the
  checks it makes must pass: the triton test cases, ddp's and pp's custom and triton variants (each cell its own
  process) = the single-device model step by step, all-reduce results correct, train.py with a checkpoint and a
  resume, GPT-2 (tiny) with compile off and on; the nccl parts skipped with the reason. ~3 minutes on 2 cores.
- without a GPU, plain `python -m tools.gpu_check` prints one line and exits non-zero.
- the budget: a part with too little time left is skipped, and says so.
- the Markdown writer on the kinds of records only a GPU run produces (MFU, failures, errors, timeouts).
"""

import argparse
import json
import sys

import pytest
import torch

from tests.distributed import REPO, run_command

sys.path.insert(0, REPO)
from tools import gpu_check  # noqa: E402

CUDA = torch.cuda.is_available()


def test_dry_run(tmp_path):
    out = tmp_path / "report"
    code, text = run_command([sys.executable, "-m", "tools.gpu_check", "--dry-run", "--out", str(out)], 400)
    assert (out / "report.json").exists(), text[-8000:]
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["ok"], f"exit code {code}:\n{text[-4000:]}\n{(out / 'report.md').read_text()}"
    assert text.strip().splitlines()[-1] == str(out / "report.md")
    parts = {(r["phase"], r["part"]): r for r in report["parts"]}
    assert set(parts) == {(p[0], p[1]) for p in gpu_check.plan(dry_run=True)}
    for key, r in parts.items():
        if key[1].endswith(("nccl", "cuda")):
            assert r["status"] == "skipped" and "dry run" in r["reason"], key
        else:
            assert r["status"] == "passed", (key, r.get("log_tail"))

    env = parts["env", "env"]["records"][0]
    assert env["info"]["torch"] == torch.__version__ and {p["api"] for p in env["probes"]} >= {
        "torch.distributed.all_gather_single", "libnccl (kernels/nccl.py)",
        "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES, NCCL_HOSTID", "libnanoccl (kernels/cuda)"}
    tests = parts["tests", "triton"]["records"]
    assert len(tests) == 3 and all(t["outcome"] == "passed" for t in tests)
    for variant in ("custom", "triton"):
        for name in ("ddp", "pp"):  # each cell its own process and record (a dry run's few cells)
            (r,) = parts["strategies", f"{name}/{variant}"]["records"]
            assert (r["strategy"], r["variant"], r["outcome"]) == (name, variant, "passed"), r.get("message")
            assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-6 and r["param_ratio"] < 1
            assert len(r["losses"]) == r["steps"] == 2
    (r,) = parts["train", "fsdp/custom"]["records"]  # train.py, a checkpoint, a resume from it
    assert r["outcome"] == "passed" and r["exit_codes"] == [0, 0] and r["resume_diff"] < 1e-5, r
    for backend in ("torch", "triton"):
        rows = parts["bandwidth", backend]["records"]
        assert [r["bytes"] for r in rows] == [4096, 65536] and all(r["correct"] and r["busbw"] > 0 for r in rows)
    gpt2 = [r for p in ("compile off", "compile on") for r in parts["gpt2", p]["records"]]
    assert [r["compile"] for r in gpt2] == [False, True]
    assert all(r["tokens_per_s"] > 0 and r["last_loss"] < r["first_loss"] for r in gpt2)
    md = (out / "report.md").read_text()
    for heading in ("## Environment", "## APIs the kernels and strategies need", "## GPU test classes",
                    "## Strategies vs single", "## All-reduce bus bandwidth", "## GPT-2 on one device", "## Parts"):
        assert heading in md
    assert "| pp | ok " in md and "skipped: dry run: libnccl needs a GPU" in md


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without a GPU")
def test_without_gpu_prints_one_line_and_fails():
    code, text = run_command([sys.executable, "-m", "tools.gpu_check"], 120)
    assert code == 2
    assert len(text.strip().splitlines()) == 1 and text.startswith("gpu_check: no GPU here"), text


def test_a_part_without_enough_budget_is_skipped(tmp_path):
    """With 10 s of budget nothing can start: every part is recorded as skipped with the reason, none runs."""
    args = argparse.Namespace(dry_run=True, out=str(tmp_path), budget_s=10, phases=["env", "gpt2"], gpt2_batch=16)
    report, code = gpu_check.orchestrate(args)
    assert code == 0 and [r["status"] for r in report["parts"]] == ["skipped"] * 3
    assert all("budget was spent" in r["reason"] for r in report["parts"])
    assert "skipped: not run: the 10 s budget was spent" in (tmp_path / "report.md").read_text()


def test_markdown_of_gpu_records():
    """The writer renders what only a GPU run produces: MFU, NCCL/torch/triton bandwidth rows, a failed strategy,
    an error, a test failure, a timed-out part with its log."""
    strategy = dict(kind="strategy", variant="custom", steps=5, loss_diff=2e-7, grad_diff=3e-8, param_ratio=0.0,
                    outcome="passed")
    suite = "tests.test_triton_comm:TestTritonCollectives"
    parts = [
        dict(phase="env", part="env", status="passed", seconds=3, records=[dict(
            kind="env", info=dict(gpu="NVIDIA H200", torch="2.11.0+cu130"), probes=[dict(
                api="torch.distributed.all_gather_single", status="fallback", detail="older name", consequence="")])]),
        dict(phase="tests", part="triton", status="failed", seconds=50, log="parts/t.log",
             log_tail="Traceback ...\nRuntimeError: boom", records=[
                 dict(suite=suite, test="t.test_a", outcome="passed", message=""),
                 dict(suite=suite, test="t.test_b", outcome="failed", message="Traceback\nAssertionError: 1 != 2")]),
        dict(phase="strategies", part="ddp/custom", status="passed", seconds=6,
             records=[dict(strategy, strategy="ddp")]),
        dict(phase="strategies", part="tp/custom", status="failed", seconds=6, records=[
            dict(strategy, strategy="tp", outcome="failed", message="gradient of x differs")]),
        dict(phase="strategies", part="pp/custom", status="failed", seconds=6, records=[dict(
            kind="strategy", strategy="pp", variant="custom", steps=5, outcome="error",
            message="RuntimeError: NCCL error")]),
        dict(phase="strategies", part="ddp/nccl", status="timeout", seconds=60, log="parts/n.log", log_tail="waiting",
             records=[]),
        dict(phase="strategies", part="ddp/cuda", status="failed", seconds=9, log="parts/c.log",
             log_tail="Fatal Python error: Segmentation fault", records=[]),
        dict(phase="train", part="fsdp/custom", status="passed", seconds=30, records=[dict(
            kind="train", variant="custom", strategy="fsdp", outcome="passed", exit_codes=[0, 0],
            losses={"0": 4.2, "1": 4.1, "2": 4.0, "3": 3.9}, resumed_losses={"2": 4.0, "3": 3.9}, resume_diff=0.0,
            mfu_line=["MFU against NVIDIA H200's dense float32 peak, 66.9 TFLOP/s"])]),
    ]
    parts += [dict(phase="bandwidth", part=b, status="passed", seconds=20, records=[dict(
        kind="bandwidth", backend=b, bytes=2**30, seconds=0.01, busbw=107.4, algbw=107.4, correct=True)])
        for b in ("torch", "nccl")]
    parts.append(dict(phase="gpt2", part="compile on", status="passed", seconds=100, records=[dict(
        kind="gpt2", compile=True, compile_backend="inductor", tokens_per_s=612345.0, mfu=0.43, tflops=425.0,
        ms_per_step=26.8, batch=16, block_size=1024, params=124.4e6, warmup_s=61.0, first_loss=10.99,
        last_loss=7.5)]))
    report = dict(title="gpu_check report", dry_run=False, date="20260101-000000", budget_s=450, seconds=400.0,
                  ok=False, parts=parts)
    md = gpu_check.markdown(report)
    assert "SOME CHECKS FAILED" in md and "| gpu | NVIDIA H200 |" in md
    assert "| torch.distributed.all_gather_single | fallback | older name |" in md
    assert "| tests.test_triton_comm:TestTritonCollectives | 1 | 1 | 0 | 50 | failed |" in md
    assert "`t.test_b` (failed): AssertionError: 1 != 2" in md
    assert ("| ddp | ok 2.00e-07 / 3.00e-08 / 0.00 | not run | HANG (timeout) (parts/n.log) | CRASH (parts/c.log) |"
            in md)
    assert "| tp | FAIL gradient of x differs | not run |" in md and "| pp | ERROR RuntimeError: NCCL error |" in md
    assert ("| fsdp/custom | passed | 4.2000, 4.1000, 4.0000, 3.9000 | 4.0000, 3.9000 | 0.00e+00 | "
            "MFU against NVIDIA H200" in md)
    assert "| 1 GB | 107.400 (10 ms) | 107.400 (10 ms) |  |" in md
    assert "| inductor | 612,345 | 43.0% | 425.0 | 26.8 | 16 x 1024 | 124.4M | 61.0 | 10.990 -> 7.500 |" in md
    assert "### strategies/ddp/nccl: timeout (end of parts/n.log)" in md
