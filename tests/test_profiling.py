"""
profile=True / memory_snapshot / the peak memory per rank in train.py's log (tools/profiling.py), and the loss-curve
command (tools/plot_loss.py). The traces of several ranks: tests/test_hf.py's ddp/custom run (2 processes) profiles.
"""

import json
import os

import pytest
import torch

from tools import plot_loss
import train
from tools.profiling import check_profiling_config
from tests.reference import train_config


def test_profile_writes_a_chrome_trace_and_logs_peak_memory(shakespeare_char_dir, tmp_path, capsys):
    """train.py with profile=True: out_dir/profile/rank0.json is a Chrome trace of iterations 2 and 3 (torch.profiler's
    ProfilerStep#2, #3) with CPU ops; every log line and metrics record carries the peak memory (RSS on CPU)."""
    out = str(tmp_path / "out")
    args = ["config/train_shakespeare_char_cpu.py", f"--data_dir={shakespeare_char_dir}", f"--out_dir={out}",
            "--max_iters=5", "--eval_interval=5", "--eval_iters=1", "--n_layer=1", "--n_embd=32", "--n_head=2",
            "--block_size=16", "--batch_size=2", "--profile=True", "--profile_start=2", "--profile_steps=2"]
    assert train.main(args) == 0
    with open(os.path.join(out, "profile", "rank0.json")) as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names and not {"ProfilerStep#1", "ProfilerStep#4"} & names
    assert "aten::mm" in names or "aten::addmm" in names
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter ")]
    assert len(lines) == 5 and all("peak mem" in line and line.endswith("MiB") for line in lines)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        peaks = [r["peak_mem_mib"] for r in map(json.loads, f) if "peak_mem_mib" in r]
    assert len(peaks) == 5 and all(len(p) == 1 and 50 < p[0] < 100_000 for p in peaks)


@pytest.mark.parametrize("overrides, words", [(dict(memory_snapshot=True), "needs a GPU"),
                                              (dict(profile=True, profile_steps=0), "profile_steps")])
def test_bad_profiling_config_is_a_one_line_error(overrides, words):
    with pytest.raises(ValueError) as e:
        check_profiling_config(train_config(**overrides), torch.device("cpu"))
    assert words in str(e.value) and "\n" not in str(e.value)


def write_metrics(path, records):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def test_plot_loss_joins_resumed_runs_and_draws_a_png(tmp_path, capsys):
    """A run resumed at iteration 4 continues the curve (its clock after the first process's, the repeated
    iteration replaced), a run restarted at 0 replaces the earlier one; the PNG is written, and the table gives
    each run's distance from the first."""
    a = write_metrics(str(tmp_path / "a"), [{"iter": i, "train/loss": 5.0 - i, "time_s": 1.0 * i} for i in range(8)]
                      + [{"iter": 8, "val/loss": 2.0, "time_s": 8.0}])
    b = write_metrics(str(tmp_path / "b"), [{"iter": i, "train/loss": 9.0, "time_s": 1.0 * i} for i in range(5)]
                      + [{"iter": 0, "train/loss": 5.0, "time_s": 0.5}]  # started again from 0
                      + [{"iter": i, "train/loss": 5.0 - i, "time_s": 0.5 + i} for i in range(1, 6)]
                      + [{"iter": i, "train/loss": 5.0 - i + 0.25, "time_s": i - 4.0} for i in range(4, 8)]  # resumed
                      + [{"iter": 8, "val/loss": 2.5, "time_s": 5.0}])
    series = plot_loss.read_metrics(b)
    assert [p[0] for p in series["train"]] == list(range(8))
    assert [p[2] for p in series["train"]] == [5.0, 4.0, 3.0, 2.0, 1.25, 0.25, -0.75, -1.75]
    times = [p[1] for p in series["train"]]
    assert times == sorted(times) and times[4] == 5.5 + 0.0  # the resumed clock starts after the first's 5.5 s
    out = str(tmp_path / "curves.png")
    plot_loss.main([a, b, "--labels", "a,b", "--out", out, "--smooth", "0.5"])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "5.00e-01 (1 evals), 2.50e-01 (8 its)" in table


def test_peak_flops_by_device_name(monkeypatch):
    """MFU's denominator comes from the GPU's name (profiling.PEAK_FLOPS, shared with gpu_check): H200 and the SXM
    H100 989.4 TFLOP/s dense bf16, the PCIe H100 756, A100 312, fp32 without TF32 lower; unknown GPUs and CPUs have
    none, so train.py prints no MFU for them instead of dividing by an A100's peak."""
    from tools.profiling import peak_flops
    cuda = torch.device("cuda", 0)
    for name, dtype, expected in (("NVIDIA H200", "bfloat16", 989.4e12),
                                  ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
                                  ("NVIDIA H100 PCIe", "float16", 756e12),
                                  ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
                                  ("NVIDIA A100-PCIE-40GB", "float32", 19.5e12),
                                  ("NVIDIA GeForce RTX 3090", "bfloat16", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(cuda, dtype) == (name, expected)
    assert peak_flops(torch.device("cpu")) == ("CPU", None)
