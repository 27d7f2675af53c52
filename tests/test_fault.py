"""
Runs that survive: train.py under `torchrun --max-restarts=1 ... --init_from=auto` after a rank is SIGKILLed (ddp,
fsdp, tp, pp, 3d), killed while writing a checkpoint, or sent SIGTERM, ends with final checkpoints (model,
optimizer, RNG states, scaler) bitwise equal to an uninterrupted run's; a stalled rank makes every other rank exit
within timeout_s + 10 s naming the collective; two torchrun agents as two "nodes" train like one process; the
checkpoint directory's rules (marker, rotation, async staging, damage) and the config's ranges, in process.

Faults come from train.py's test hook, NANOPARALLEL_FAULT="ACTION:RANK:ITER" (first attempt only, so the restarted
job runs clean). Every launch has a timeout and its own port.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from config import ConfigError, check_train_config
from parallel import checkpoint
from parallel.checkpoint import (COMPLETE, Checkpointer, check_out_dir, find_checkpoint, list_checkpoints,
                                 load_checkpoint_file, step_dir)
from tests.distributed import REPO, run_command, torchrun_cmd
from tests.test_train import TINY, metrics, train

# 12 iterations, eval (and a save) at 6 and 12, a checkpoint every 4: saves at 4, 6, 8, 12
COMMON = [*TINY, "--dropout=0.1", "--max_iters=12", "--eval_interval=6", "--checkpoint_interval=4",
          "--init_from=auto"]
INTERVAL, KILL_ITER = 4, 10
STRATEGIES = {  # name: (processes, arguments, the rank that is killed)
    "ddp": (2, ["--parallel=ddp", "--variant=custom", "--gradient_accumulation_steps=2"], 0),
    "fsdp": (2, ["--parallel=fsdp", "--variant=pytorch", "--gradient_accumulation_steps=2"], 1),
    "tp": (2, ["--parallel=tp", "--variant=custom", "--gradient_accumulation_steps=2", "--async_checkpoint=True"], 1),
    "pp": (2, ["--parallel=pp", "--variant=custom", "--gradient_accumulation_steps=2"], 0),
    "3d": (4, ["--parallel=3d", "--variant=custom", "--dp_size=2", "--pp_size=2", "--tp_size=1",
               "--gradient_accumulation_steps=4", "--async_checkpoint=True"], 3),
}


def launch(nproc, args, fault="", restarts=1, timeout_s=300):
    """torchrun train.py with --max-restarts=restarts and NANOPARALLEL_FAULT=fault; (exit code, output)."""
    cmd = torchrun_cmd(nproc, f"--max-restarts={restarts}", "train.py", *args)
    env = {**os.environ, "NANOPARALLEL_FAULT": fault, "WANDB_MODE": "disabled"}
    return run_command(cmd, timeout_s, env)


def final_state(out_dir):
    """{path: value} of every tensor and plain value of out_dir's newest complete checkpoint but its config."""
    ckpt = load_checkpoint_file(find_checkpoint(out_dir))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        else:
            flat[prefix] = value
    walk("", {k: v for k, v in ckpt.items() if k != "config"})
    return flat


def assert_bitwise_equal(out_dir, ref_dir):
    a, b = final_state(out_dir), final_state(ref_dir)
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    differ = [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]
    assert not differ, differ[:10]
    assert a["/iter_num"] == 12


def resumed_at(out):
    """The iteration the restarted job resumed from (train.py's "resuming from ... at iteration N")."""
    lines = [line for line in out.splitlines() if line.startswith("resuming from")]
    assert len(lines) == 1, out[-5000:]
    return int(lines[0].split(" at iteration ")[1].split()[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare_char_dir):
    """reference(name): out_dir of the uninterrupted run of STRATEGIES[name] (run once per module)."""
    runs = {}

    def get(name):
        if name not in runs:
            nproc, args, _ = STRATEGIES[name]
            out_dir = str(tmp_path_factory.mktemp(f"ref-{name}"))
            code, out = launch(nproc, [f"--data_dir={shakespeare_char_dir}", *COMMON, *args, f"--out_dir={out_dir}"])
            assert code == 0, out[-5000:]
            runs[name] = out_dir
        return runs[name]
    return get


# -----------------------------------------------------------------------------------------------------------
# crashes and preemption under torchrun


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_sigkill_restart_resumes_bitwise(tmp_path, shakespeare_char_dir, reference, name):
    """A rank SIGKILLed at iteration 10 of 12: torchrun restarts the job, which resumes from the checkpoint of 8
    (at most checkpoint_interval iterations lost) and ends bitwise equal to the uninterrupted run; every logged loss
    equal too. tp and 3d write their checkpoints asynchronously."""
    nproc, args, rank = STRATEGIES[name]
    out_dir = str(tmp_path / "run")
    code, out = launch(nproc, [f"--data_dir={shakespeare_char_dir}", *COMMON, *args, f"--out_dir={out_dir}"],
                       fault=f"kill:{rank}:{KILL_ITER}")
    assert code == 0, out[-5000:]
    assert f"fault: rank {rank} (pid" in out and f"SIGKILL at iteration {KILL_ITER}" in out
    assert KILL_ITER - INTERVAL <= resumed_at(out) < KILL_ITER
    assert_bitwise_equal(out_dir, reference(name))
    assert metrics(out_dir, "train/loss") == metrics(reference(name), "train/loss")
    complete = [it for it, _, done in list_checkpoints(out_dir) if done]
    assert complete == [8, 12], complete  # keep_checkpoints=2 rotated the older ones away


def test_kill_during_checkpoint_write_falls_back(tmp_path, shakespeare_char_dir, reference):
    """fsdp: rank 1 SIGKILLed once its part of the checkpoint of 8 is written, before the COMPLETE marker: the
    restarted job warns that step 8 is incomplete, resumes from 6 (the previous complete one, untouched) and ends
    bitwise equal."""
    nproc, args, _ = STRATEGIES["fsdp"]
    out_dir = str(tmp_path / "run")
    code, out = launch(nproc, [f"--data_dir={shakespeare_char_dir}", *COMMON, *args, f"--out_dir={out_dir}"],
                       fault="save-kill:1:8")
    assert code == 0, out[-5000:]
    assert f"checkpoint {step_dir(out_dir, 8)} is incomplete (no COMPLETE marker" in out, out[-5000:]
    assert resumed_at(out) == 6
    assert_bitwise_equal(out_dir, reference("fsdp"))


def test_sigterm_saves_exits_0_and_resumes_bitwise(tmp_path, shakespeare_char_dir, reference):
    """pp: SIGTERM to rank 1 during step 9: both ranks agree at the next step boundary, save the checkpoint of 10
    and exit 0 (no restart used); launching the same command again resumes at 10 and ends bitwise equal."""
    nproc, args, _ = STRATEGIES["pp"]
    out_dir = str(tmp_path / "run")
    run = [f"--data_dir={shakespeare_char_dir}", *COMMON, *args, f"--out_dir={out_dir}"]
    code, out = launch(nproc, run, fault="term:1:9", restarts=0)
    assert code == 0, out[-5000:]
    assert "SIGTERM: saving a checkpoint at iteration 10 and exiting" in out, out[-5000:]
    assert [it for it, _, done in list_checkpoints(out_dir) if done][-1] == 10
    assert max(metrics(out_dir, "train/loss")) == 9
    code, out = launch(nproc, run, restarts=0)
    assert code == 0, out[-5000:]
    assert resumed_at(out) == 10
    assert_bitwise_equal(out_dir, reference("pp"))


def rank_errors(lines):
    """[(arrival time, "error: rank R: ...")] of the (time, line) pairs: ranks write to one pipe, so two ranks' lines
    can arrive joined on one line ("...or diederror: rank 2: ..."); each is split out."""
    one = re.compile(r"error: rank \d+: .*?(?=error: rank \d+: |$)")
    return [(t, m.group(0)) for t, line in lines for m in one.finditer(line)]


def test_stalled_rank_fails_fast(tmp_path, shakespeare_char_dir):
    """3d on 4 ranks (pp2 x tp2: collectives on DeviceMesh subgroups), timeout_s=10: rank 1 stops (SIGSTOP) at the
    start of step 3; every other rank exits within timeout_s + 10 s of it with one line naming the collective and
    the timeout, and torchrun exits non-zero. (torchrun itself then waits 30 s before it SIGKILLs the stopped
    process, its fixed grace period on failure; the test kills it as soon as the other ranks are out.)"""
    timeout_s = 10
    cmd = torchrun_cmd(4, "train.py", f"--data_dir={shakespeare_char_dir}", *TINY, "--max_iters=12",
                       "--eval_interval=100", f"--out_dir={tmp_path / 'run'}", "--parallel=3d", "--variant=pytorch",
                       "--dp_size=1", "--pp_size=2", "--tp_size=2", "--gradient_accumulation_steps=4",
                       f"--timeout_s={timeout_s}")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "NANOPARALLEL_FAULT": "stop:1:3"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []  # (arrival time, line)

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and len(rank_errors(lines)) < 3:
            time.sleep(0.2)
        stop = [(t, l) for t, l in lines if l.startswith("fault: rank 1")]
        errors = rank_errors(lines)
        assert stop and len(errors) == 3, "\n".join(l for _, l in lines)[-6000:]
        os.kill(int(stop[0][1].split("(pid ")[1].split(")")[0]), signal.SIGKILL)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    assert code != 0
    for t, line in errors:  # a rank whose peer left on its own timeout may report that peer's end instead
        assert t - stop[0][0] < timeout_s + 10, (t - stop[0][0], line)
        assert not line.startswith("error: rank 1:") and line.split(": ", 2)[2].startswith("collective "), line
    assert any(f"timed out after timeout_s={timeout_s} s" in line for _, line in errors), errors
    print("seconds from the stop to each rank's exit:", [round(t - stop[0][0], 2) for t, _ in errors])


# -----------------------------------------------------------------------------------------------------------
# several machines: two torchrun agents as two nodes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dp, args", [(4, ["--parallel=ddp", "--variant=custom"]),
                                      (2, ["--parallel=3d", "--variant=pytorch", "--dp_size=2", "--tp_size=2"])])
def test_two_nodes_match_single(tmp_path, shakespeare_char_dir, dp, args):
    """Two torchrun agents (--nnodes=2 --nproc_per_node=2, c10d rendezvous on 127.0.0.1) train 4 ranks as two
    nodes (3d: tp inside a node, dp across); 4 steps log the single process's losses, and the last val loss, within
    1e-5 (fp32, no dropout; the same 4 eval sequences: eval_batch_size 4 / dp per rank). The weights themselves are not
    compared: two runs that each take their own AdamW steps differ by up to ~lr in elements whose gradient is near eps,
    by an amount that depends on the CPU (tests/reference.py); the in-process tests check ddp and 3d step by step, and
    this one the launch around them."""
    common = [f"--data_dir={shakespeare_char_dir}", *TINY, "--max_iters=4", "--eval_interval=4",
              "--gradient_accumulation_steps=4"]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    code, out = train(0, [*common, f"--out_dir={single}", "--eval_batch_size=4"])
    assert code == 0, out[-3000:]
    port = free_port()
    agents = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}",
               "train.py", *common, f"--out_dir={multi}", f"--eval_batch_size={4 // dp}", *args] for _ in range(2)]
    procs = [subprocess.Popen(a, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for a in agents]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "on 4 process(es)" in "".join(outs)
    a, b = metrics(single, "train/loss"), metrics(multi, "train/loss")
    assert sorted(a) == sorted(b) == list(range(4)) and max(abs(a[i] - b[i]) for i in a) < 1e-5, (a, b)
    a, b = metrics(single, "val/loss"), metrics(multi, "val/loss")
    assert sorted(a) == sorted(b) == [0, 4] and max(abs(a[i] - b[i]) for i in a) < 1e-5, (a, b)


# -----------------------------------------------------------------------------------------------------------
# bad input, end to end: one line, no traceback


def test_damaged_and_foreign_checkpoints_are_one_line(tmp_path, shakespeare_char_dir, reference):
    """A sharded checkpoint missing rank 1's file names that file (2 ranks, before loading anything); a checkpoint
    of another model shape names the keys that differ (no load_state_dict message)."""
    damaged = tmp_path / "damaged"
    shutil.copytree(reference("fsdp"), damaged)
    os.remove(os.path.join(find_checkpoint(str(damaged)), "__1_0.distcp"))
    nproc, args, _ = STRATEGIES["fsdp"]
    code, out = launch(nproc, [f"--data_dir={shakespeare_char_dir}", *COMMON, *args, f"--out_dir={damaged}",
                               "--init_from=resume"], restarts=0, timeout_s=120)
    assert code != 0
    assert "is damaged: __1_0.distcp missing" in out, out[-3000:]
    assert out.count("Traceback") == 1, out[-3000:]  # torchrun's own, on a failed child

    other = tmp_path / "other"
    shutil.copytree(reference("ddp"), other)
    code, out = train(0, [f"--data_dir={shakespeare_char_dir}", *COMMON, "--n_layer=3", "--n_embd=48",
                          f"--out_dir={other}", "--init_from=resume"], timeout_s=120)
    assert code != 0
    differ = "holds another model: n_layer 2 (checkpoint) vs 3 (config), n_embd 32 (checkpoint) vs 48 (config)"
    assert differ in out, out
    assert "Traceback" not in out and "state_dict" not in out, out


@pytest.mark.parametrize("override, message", [
    ("--batch_size=0", "batch_size must be >= 1, got 0"),
    ("--eval_batch_size=-1", "eval_batch_size must be >= 0, got -1"),
    ("--gradient_accumulation_steps=-2", "gradient_accumulation_steps must be >= 1, got -2"),
    ("--dropout=1.0", "dropout must be in [0, 1), got 1.0"),
    ("--beta2=-0.1", "beta2 must be in [0, 1), got -0.1"),
    ("--learning_rate=-1e-3", "learning_rate must be >= 0, got -0.001"),
    ("--max_iters=-5", "max_iters must be >= 0, got -5"),
    ("--min_lr=1e999", "min_lr must be a finite number, got inf"),
    ("--eval_interval=0", "eval_interval must be >= 1, got 0"),
    ("--timeout_s=0", "timeout_s must be >= 1, got 0"),
    ("--keep_checkpoints=-1", "keep_checkpoints must be >= 0, got -1"),
    ("--bucket_cap_mb=0", "bucket_cap_mb must be > 0, got 0.0"),
    ("--init_from=latest", "init_from must be one of scratch, resume, auto, gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                           "or a Hugging Face model directory, got 'latest'"),
    ("--dp_type=zero1", "dp_type must be one of fsdp, ddp, got 'zero1'"),
    ("--n_head=3", "n_embd=32 must be divisible by n_head=3"),
    ("--warmup_iters=20", "lr_decay_iters=20 must be greater than warmup_iters=20 when decay_lr"),
])
def test_config_ranges(override, message):
    """check_train_config: each bad value is a ConfigError naming the key, the value and the range."""
    from config import load_config
    from train import DEFAULTS
    cfg = load_config(DEFAULTS, [*TINY, override])
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg)
    assert message in str(e.value)


def test_every_repo_config_passes_the_range_check():
    import glob
    from config import load_config
    from train import DEFAULTS
    check_train_config(dict(DEFAULTS))
    for f in sorted(glob.glob(os.path.join(REPO, "config", "train_*.py"))):
        check_train_config(load_config(DEFAULTS, [f]))


def test_out_dir_checks(tmp_path):
    """out_dir a file; resume without a checkpoint; scratch onto another run's checkpoints (nothing is touched)."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="out_dir .* exists and is not a directory"):
        check_train_config({"out_dir": str(a_file)})
    with pytest.raises(FileNotFoundError, match="init_from='resume': no complete checkpoint in out_dir"):
        check_out_dir(str(tmp_path / "empty"), "resume")
    check_out_dir(str(tmp_path / "empty"), "auto")
    done = step_dir(str(tmp_path), 5)
    os.makedirs(os.path.join(done, "ckpt"))
    open(os.path.join(done, COMPLETE), "w").close()
    with pytest.raises(ValueError, match="already holds checkpoints .* set init_from='auto' to continue"):
        check_out_dir(str(tmp_path), "scratch")
    check_out_dir(str(tmp_path), "scratch", saves=False)  # eval_only writes nothing
    assert os.path.isfile(os.path.join(done, COMPLETE))


# -----------------------------------------------------------------------------------------------------------
# the checkpoint directory, in process


class FakeStrategy:
    """What Checkpointer asks of a Strategy, for one process: save_checkpoint writes extra["value"] to the file."""
    rank, world_size, sharded, checkpoint_name, strategy, variant = 0, 1, False, "ckpt.pt", "single", "pytorch"

    def save_checkpoint(self, path, optimizer, extra, asynchronous=False, process_group=None):
        ckpt = {"model": {"w": extra["value"]}, "model_args": {}, **extra}
        if asynchronous:
            return checkpoint.save_file_async(path, ckpt)
        checkpoint.save_file(path, ckpt)


def test_marker_rotation_and_fallback(tmp_path):
    """Only marked checkpoints count; keep=2 keeps the newest two, and removes interrupted ones older than the
    newest; an interrupted newer one is skipped with a warning; a step that exists is not saved again."""
    out = str(tmp_path)
    saver = Checkpointer(out, FakeStrategy(), keep=2)
    os.makedirs(step_dir(out, 3))  # an interrupted save (no marker)
    for it in (2, 4, 6):
        assert saver.save(it, None, {"value": torch.full((3,), float(it))}) == step_dir(out, it)
    assert [(it, done) for it, _, done in list_checkpoints(out)] == [(4, True), (6, True)]
    assert saver.save(6, None, {"value": torch.zeros(3)}) is None  # exists: kept as it is
    assert load_checkpoint_file(find_checkpoint(out))["model"]["w"].tolist() == [6.0, 6.0, 6.0]
    os.makedirs(os.path.join(step_dir(out, 8), "ckpt"))  # a crash mid-save of 8
    warnings = []
    assert find_checkpoint(out, warn=warnings.append) == os.path.join(step_dir(out, 6), "ckpt.pt")
    assert len(warnings) == 1 and "step_00000008 is incomplete" in warnings[0]
    assert find_checkpoint(str(tmp_path / "none")) is None


def test_async_save_stages_a_copy(tmp_path):
    """An async save returns before the write; the tensors changed afterwards do not reach the file; the marker
    appears once the write is done (wait)."""
    out = str(tmp_path)
    saver = Checkpointer(out, FakeStrategy(), keep=0, asynchronous=True)
    value = torch.ones(1000)
    step = saver.save(1, None, {"value": value})
    value.mul_(5)  # training goes on
    saver.wait()
    assert os.path.isfile(os.path.join(step, COMPLETE))
    assert load_checkpoint_file(find_checkpoint(out))["model"]["w"].eq(1).all()


def test_damaged_dcp_directory_names_the_missing_file(tmp_path):
    """A DCP directory whose .metadata names a data file that is missing or short: ValueError naming it."""
    import torch.distributed.checkpoint as dcp
    path = str(tmp_path / "ckpt")
    dcp.save({"model": {"w": torch.ones(64)}}, checkpoint_id=path, no_dist=True)
    torch.save({"model_args": {}}, os.path.join(path, "extra.pt"))
    data = os.path.join(path, "__0_0.distcp")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(ValueError, match="is damaged: __0_0.distcp truncated"):
        checkpoint.load_full(path)
    os.remove(data)
    with pytest.raises(ValueError, match="is damaged: __0_0.distcp missing"):
        checkpoint.load_full(path)
