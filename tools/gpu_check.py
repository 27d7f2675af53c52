"""
One command that proves, on a machine with one GPU, what the CPU tests cannot: the triton, nccl and cuda variants
on a real GPU, through train.py's own setup, their bandwidth, and GPT-2's speed. Writes one report (Markdown + JSON)
and prints its path.

    make gpu-check                        # python -m tools.gpu_check: needs one GPU, takes at most --budget-s
                                          # (default 450 s)
    python -m tools.gpu_check --dry-run   # the same orchestration on CPU (gloo, Triton's interpreter, tiny sizes)
    python -m tools.gpu_check --phases tests,bandwidth --out out-gpu-check/mine
    python -m tools.gpu_check --phases strategies --only pp/nccl,3d/nccl   # some cells again

Phases, in order; every part runs in its own processes (torchrun with 2 ranks sharing GPU 0, or one process) with a
time limit carved out of the budget, so a part that fails, crashes the GPU context or hangs costs only itself and
the report says what happened (PYTHONFAULTHANDLER prints a crash's Python frames; faulthandler prints every thread's
stack 10 s before a part's limit, so a hang names where it waits). Every part starts its process group as train.py
does (comm.init_distributed: torch's NCCL for CUDA tensors, the ranks sharing the GPU through NANOPARALLEL_SHARE_GPU=1):
  env         versions, the GPU, libnccl, libnanoccl, and every API the kernels and strategies use that the machine's
              torch / triton might lack (torch 2.11 and triton 3.6 on the lent machines): present, replaced by a
              fallback, or missing, and then what is skipped because of it, with the reason
  tests       the GPU test classes: TestTritonCollectives (tests/test_triton_comm.py: triton on CUDA symmetric
              memory, with its strategies), TestNCCLOnGPU (tests/test_nccl.py), TestCudaLibOnGPU (test_cuda_lib.py)
  strategies  every case of tests/test_triton_comm.py's STRATEGIES (ddp, zero, fsdp, tp, pp, cp, ulysses, ep, 3d) x
              the custom, triton, nccl and cuda variants, each cell its own 2-rank process, 5 fp32 steps each checked
              against the single-device model from the same state (tests/reference.py's train_checked)
  bandwidth   all-reduce bus bandwidth (nccl-tests: busbw = S/t * 2(N-1)/N) of torch's NCCL and ours: the nccl
              binding, the triton kernels, libnanoccl; 1 MB to 1 GB, each result checked
  train       train.py itself for each variant (fsdp, 2 ranks: a sharded DCP checkpoint) and for ddp/custom (a
              replicated one-file checkpoint): 4 iterations with a checkpoint every 2, then a run resumed from the
              iteration-2 checkpoint, which must log the same losses
  gpt2        GPT-2 124M (block 1024, bf16 autocast) on one GPU through the `single` strategy: tokens/s and MFU
              with torch.compile off, then on
Two ranks on one GPU need: NCCL_HOSTID different per rank (NCCL otherwise refuses two ranks on one device; they then
talk through NCCL's network transport, so NCCL's figures here are not NVLink figures) and
TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1 (torch's CUDA symmetric memory otherwise refuses the rendezvous):
comm.share_gpus sets both.

--dry-run runs the same orchestration, workers and report writer on CPU: gloo, the interpreter, a few of the test
cases and cells, 2 steps, kilobyte sizes, a tiny GPT with compile backend aot_eager; the nccl and cuda parts are
skipped with the reason. Without a GPU and without --dry-run it prints one line and exits with 2. Exit code: 0 when
every check that ran passed, 1 otherwise.
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# tests/test_triton_comm.py's STRATEGIES
STRATEGY_NAMES = ("ddp", "zero", "fsdp", "tp", "pp", "cp", "ulysses", "ep", "3d")
VARIANTS = ("custom", "triton", "nccl", "cuda")
BACKENDS = ("torch", "nccl", "triton", "cuda")  # all-reduce bandwidth: torch's NCCL; ours: the nccl binding, the
#                                                 triton kernels, libnanoccl through the same binding
PHASES = ("env", "tests", "strategies", "bandwidth", "train", "gpt2")
# the train phase: train.py with a sharded (DCP) checkpoint, DTensor bookkeeping included, for every variant; and a
# replicated strategy's one-file checkpoint (another load path: torch.load onto the device)
TRAIN_CELLS = [("fsdp", v) for v in VARIANTS] + [("ddp", "custom")]


# ----------------------------------------------------------------------------------------------------------
# the plan: which parts run, with which limits, for a GPU run and a dry run

def plan(dry_run):
    """[(phase, part, worker argv, ranks, cap seconds)] in order. ranks: 2 (torchrun) or 1 (one process). Every
    strategy x variant cell is a part of its own, so a crash or a hang costs that cell only."""
    steps = "2" if dry_run else "5"
    sizes = "4K,64K" if dry_run else "1M,4M,16M,64M,256M,1G"
    triton_tests = ("tests.test_triton_comm:TestTritonCollectives:" + ",".join([
        "test_all_gather_reduce_scatter_broadcast", "test_point_to_point", "test_bad_input_is_a_clear_error"])
        if dry_run else "tests.test_triton_comm:TestTritonCollectives")
    parts = [
        ("env", "env", ["env"], 1, 60),
        ("tests", "triton", ["tests", "--suite", triton_tests], 2, 150),
        ("tests", "nccl", ["tests", "--suite", "tests.test_nccl:TestNCCLOnGPU"], 2, 90),
        ("tests", "cuda", ["tests", "--suite", "tests.test_cuda_lib:TestCudaLibOnGPU"], 2, 120),
    ]
    # a dry run proves the orchestration on a few cells (tests/test_triton_comm.py covers every strategy on CPU);
    # custom, which ran on a GPU before, comes last
    cells = [(n, v) for v in (*VARIANTS[1:], VARIANTS[0]) for n in STRATEGY_NAMES if not dry_run or n in ("ddp", "pp")]
    for name, variant in cells:
        parts.append(("strategies", f"{name}/{variant}", ["strategies", "--strategy", name, "--variant", variant,
                                                            "--steps", steps], 2, 90 if variant == "triton" else 60))
    for backend in BACKENDS:
        parts.append(("bandwidth", backend, ["bandwidth", "--backend", backend, "--sizes", sizes], 2, 60))
    for strategy, variant in TRAIN_CELLS if not dry_run else [("fsdp", "custom"), ("fsdp", "nccl")]:
        argv = ["train", "--strategy", strategy, "--variant", variant]
        parts.append(("train", f"{strategy}/{variant}", argv, 1, 120))
    for compile_ in ("off", "on"):
        cap = 60 if compile_ == "off" else 180
        parts.append(("gpt2", f"compile {compile_}", ["gpt2", "--compile", compile_], 1, cap))
    return parts


# ----------------------------------------------------------------------------------------------------------
# workers: run inside the parts' processes; rank 0 appends JSON lines to --result

def _emit(path, record):
    if int(os.environ.get("RANK", "0")) == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _start(dry_run):
    """This part's process group and device as train.py gets them (comm.init_distributed: NCCL for CUDA tensors, the
    ranks sharing GPU 0 through NANOPARALLEL_SHARE_GPU=1, which child_env sets; gloo on CPU), and faulthandler armed
    to print every thread's Python stack shortly before the orchestrator's time limit (a hang names its frames)."""
    import faulthandler
    from kernels.comm import init_distributed
    hang_s = float(os.environ.get("GPU_CHECK_HANG_S", "0"))
    if hang_s > 0:
        faulthandler.dump_traceback_later(hang_s, exit=False)
    return init_distributed(timeout_s=120)


def worker_env(args):
    """Versions and API probes (see the module docstring): one record."""
    import torch
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                host=socket.gethostname(), cpus=os.cpu_count(), dry_run=args.dry_run)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gb=round(
            props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
    probes = []

    def probe(name, status, detail, consequence=""):
        probes.append(dict(api=name, status=status, detail=detail, consequence=consequence))

    try:
        import triton
        info["triton"] = triton.__version__
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        assert callable(triton.compile) and ASTSource and GPUTarget
        probe("triton.compile, ASTSource, GPUTarget", "ok", f"triton {triton.__version__}: kernels/compile_check.py "
              "can compile ahead of time here too (CI compiles with triton 3.7.1 and was checked with 3.6.0)")
    except Exception as e:
        probe("triton", "missing", f"{type(e).__name__}: {e}", "the triton variant and tests are skipped")
    for new, old in (("all_gather_single", "all_gather_into_tensor"),
                     ("reduce_scatter_single", "reduce_scatter_tensor")):
        if hasattr(dist, new):
            probe(f"torch.distributed.{new}", "ok", "torch >= 2.13 name")
        elif hasattr(dist, old):
            probe(f"torch.distributed.{new}", "fallback", f"absent in torch {torch.__version__}: kernels/comm.py and "
                  f"parallel/fsdp.py use torch.distributed.{old}, the same collective under its older name")
        else:
            probe(f"torch.distributed.{new}", "missing", f"neither {new} nor {old}", "custom FSDP/TP fail")
    try:
        import torch.distributed._symmetric_memory as symm_mem
        missing = [f for f in ("empty", "rendezvous") if not hasattr(symm_mem, f)]
        probe("torch.distributed._symmetric_memory.empty/rendezvous", "missing" if missing else "ok",
              f"missing {missing}" if missing else "the triton backend's heap on CUDA (a private module: the one "
              "place kernels/triton_comm.py uses one, as no public API exists)",
              "the triton variant fails on CUDA" if missing else "")
    except Exception as e:
        probe("torch.distributed._symmetric_memory", "missing", f"{type(e).__name__}: {e}",
              "the triton variant fails on CUDA")
    probe("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES, NCCL_HOSTID", "ok", "set per rank by comm.share_gpus when ranks "
          "share a GPU (NANOPARALLEL_SHARE_GPU=1, which gpu_check sets): torch's CUDA symmetric memory (2.11 included) "
          "refuses two ranks' allocations on one device, and NCCL two ranks on one device, without them")
    probe("TORCH_SYMMMEM", "ok", f"{os.environ.get('TORCH_SYMMMEM', 'unset')}: the symmetric-memory allocator "
          "(gpu_check defaults it to CUDA, the cuMem one whose peer pointers the kernels use)")
    try:
        from kernels import nccl
        lib = nccl.NCCLLibrary()
        info["libnccl"] = f"{'.'.join(map(str, lib.version()))} ({lib.lib._name})"
        probe("libnccl (kernels/nccl.py)", "ok", info["libnccl"])
    except Exception as e:
        probe("libnccl (kernels/nccl.py)", "missing", f"{type(e).__name__}: {str(e)[:300]}",
              "the nccl variant, TestNCCLOnGPU and the nccl bandwidth fail")
    try:
        from kernels.cuda import build
        built, nvcc = build.library_path(build_if_missing=False), build.find_nvcc()
        info["libnanoccl"] = built or f"not built yet (nvcc: {nvcc})"
        probe("libnanoccl (kernels/cuda)", "ok" if built or nvcc else "missing", info["libnanoccl"],
              "" if built or nvcc else "no nvcc to build it: the cuda variant, its tests and bandwidth fail")
    except Exception as e:
        probe("libnanoccl (kernels/cuda)", "missing", f"{type(e).__name__}: {str(e)[:300]}",
              "the cuda variant, its tests and bandwidth fail")
    if cuda:
        probe("torch's NCCL", "ok" if dist.is_nccl_available() else "missing",
              f"torch.cuda.nccl.version() = {torch.cuda.nccl.version()}" if dist.is_nccl_available() else "",
              "" if dist.is_nccl_available() else "the custom variant on CUDA and torch's bandwidth fail")
    probe("torch.compile", "ok" if hasattr(torch, "compile") else "missing", "GPT-2 with compile on")
    for module in ("numpy", "pytest"):
        found = importlib.util.find_spec(module) is not None
        status = "ok" if found else ("fallback" if module == "pytest" else "missing")
        detail = "" if found else ("not installed: gpu_check puts a stand-in on the parts' PYTHONPATH (the GPU "
                                   "test classes are unittest classes; their modules import pytest only to "
                                   "decorate pytest functions)" if module == "pytest" else "not installed")
        probe(module, status, detail, "" if found or module == "pytest" else "train.py's data loading fails")
    _emit(args.result, dict(kind="env", info=info, probes=probes))
    return 0


class _Collect(unittest.TextTestResult):
    """A unittest result that also keeps the successes, and each test's seconds."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.records, self._t0 = [], {}

    def startTest(self, test):
        self._t0[test.id()] = time.perf_counter()
        super().startTest(test)

    def _record(self, test, outcome, message=""):
        t0 = self._t0.get(test.id(), time.perf_counter())
        self.records.append(dict(test=test.id(), outcome=outcome, message=message[-3000:],
                                 seconds=round(time.perf_counter() - t0, 2)))

    def addSuccess(self, test):
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._record(test, "failed", self._exc_info_to_string(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        self._record(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._record(test, "skipped", reason)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._record(subtest, "failed" if failed else "error", self._exc_info_to_string(err, test))


def worker_tests(args):
    """Run one unittest class (module:Class[:test,test]) on every rank; rank 0 records every test's outcome. The
    classes set up their process group as they do under torchrun (comm.init_distributed, GPU 0 shared). Without
    test names, every test of the class but its test_strategies_* ones: the strategies phase runs those cells, each
    in its own process."""
    from kernels.comm import teardown
    module, cls, *names = args.suite.split(":")
    case = getattr(importlib.import_module(module), cls)
    names = names[0].split(",") if names else [n for n in unittest.TestLoader().getTestCaseNames(case)
                                                if not n.startswith("test_strategies")]
    suite = unittest.TestSuite([case(n) for n in names])
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2, resultclass=_Collect).run(suite)
    for record in result.records:
        _emit(args.result, dict(kind="test", suite=f"{module}:{cls}", **record))
    skipped_class = getattr(case, "__unittest_skip__", False)
    if skipped_class and not result.records:
        _emit(args.result, dict(kind="test", suite=f"{module}:{cls}", test=cls, outcome="skipped",
                                message=getattr(case, "__unittest_skip_why__", ""), seconds=0))
    teardown(0 if result.wasSuccessful() else 1)


def worker_strategies(args):
    """One strategy (--strategy) with one variant (--variant), `steps` fp32 steps on 2 ranks, every step checked
    against the single-device model from the same state (tests/reference.py's train_checked): one record."""
    import torch.distributed as dist
    from kernels.comm import teardown
    device = _start(args.dry_run)
    from parallel import build_strategy
    from tests.reference import global_batches, train_checked, train_config
    from tests.test_triton_comm import strategy_case
    N, t0 = dist.get_world_size(), time.perf_counter()
    record = dict(kind="strategy", strategy=args.strategy, variant=args.variant, world_size=N, steps=args.steps,
                  device=str(device))
    try:
        cfg, model_config = strategy_case(args.strategy, N)
        batches = global_batches(args.steps, cfg["gradient_accumulation_steps"], 2, model_config)
        strategy = build_strategy(train_config(variant=args.variant, **cfg), device)
        try:
            run = train_checked(strategy, model_config, batches)
            record.update(outcome="passed", losses=run.losses, loss_fell=run.losses[-1] < run.losses[0],
                          loss_diff=run.margins["loss"], grad_diff=run.margins["grad"],
                          param_ratio=run.margins["param"], bus_bytes=dict(strategy.stats.bus))
        except AssertionError as e:  # tests/reference.py's rule: the first step that differs from single's
            record.update(outcome="failed", message=str(e)[:2000])
        strategy.close()
    except Exception as e:
        record.update(outcome="error", message=f"{type(e).__name__}: {e}"[:2000],
                      traceback=traceback.format_exc()[-3000:])
    record["seconds"] = round(time.perf_counter() - t0, 2)
    _emit(args.result, record)
    teardown(0 if record["outcome"] == "passed" else 1)


def worker_train(args):
    """train.py itself, as a user runs it, with --strategy and --variant on 2 ranks (one GPU shared): 4
    iterations with a checkpoint every 2, then a second run resumed from the iteration-2 checkpoint to iteration 4;
    the resumed run logs the first run's losses of iterations 2 and 3 (within 1e-5) and both end with code 0. One
    record, with the MFU line train.py printed (its peak comes from profiling.PEAK_FLOPS)."""
    import shutil
    work = os.path.join(os.path.dirname(args.result), f"train-{args.strategy}-{args.variant}")
    shutil.rmtree(work, ignore_errors=True)
    data = os.path.join(work, "data")
    subprocess.run([sys.executable, os.path.join(REPO, "data", "shakespeare_char", "prepare.py"), "--out-dir", data],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    common = [f"--data_dir={data}", f"--parallel={args.strategy}", f"--variant={args.variant}", "--n_layer=2",
              "--n_head=4", "--n_embd=64", "--block_size=64", "--batch_size=4", "--gradient_accumulation_steps=2",
              "--max_iters=4", "--eval_interval=2", "--eval_iters=2", "--log_interval=1", "--checkpoint_interval=2",
              "--keep_checkpoints=2", "--compile=False", "--dtype=float32", "--dropout=0.0", "--learning_rate=1e-3",
              "--warmup_iters=0", "--decay_lr=False", "--timeout_s=60"]
    record, logs, seconds = dict(kind="train", variant=args.variant, strategy=args.strategy), [], []

    def run(out_dir, *extra):
        """One train.py job: its exit code, or "timeout" after 55 s (two fit the part's 120 s); its output goes to
        run<N>.log, and one line saying how it ended to this part's log at once (so a part killed at its limit
        still says how far it got)."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train.py"), *common, f"--out_dir={out_dir}", *extra]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=55)
            code, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            out = [x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)]
            code, text = "timeout", "".join(out)
        logs.append(text)
        with open(os.path.join(work, f"run{len(logs)}.log"), "w") as f:
            f.write(text)
        seconds.append(round(time.perf_counter() - t0, 1))
        print(f"train.py run {len(logs)} ({os.path.basename(out_dir)}): exit code {code} after {seconds[-1]} s",
              flush=True)
        return code

    def losses(out_dir):
        path = os.path.join(out_dir, "metrics.jsonl")
        if not os.path.exists(path):  # the run ended before its first log line
            return {}
        with open(path) as f:
            return {m["iter"]: m["train/loss"] for m in map(json.loads, f) if "train/loss" in m}

    try:
        from parallel.checkpoint import step_dir
        first, resumed = os.path.join(work, "first"), os.path.join(work, "resumed")
        codes = [run(first)]
        if os.path.isdir(step_dir(first, 2)):  # else the first run's code and log say why
            shutil.copytree(step_dir(first, 2), step_dir(resumed, 2))
            codes.append(run(resumed, "--init_from=resume"))
        a, b = losses(first), losses(resumed)
        mfu = [line for line in logs[0].splitlines() if "MFU" in line or "no MFU" in line]
        record.update(exit_codes=codes, seconds=seconds, losses=a, resumed_losses=b, mfu_line=mfu[:1],
                      outcome="failed")
        if codes == [0, 0] and sorted(a) == [0, 1, 2, 3] and sorted(b) == [2, 3]:
            record["resume_diff"] = max(abs(a[i] - b[i]) for i in (2, 3))
            record["outcome"] = "passed" if record["resume_diff"] < 1e-5 else "failed"
        else:
            record["message"] = f"exit codes {codes}, iterations logged {sorted(a)} and resumed {sorted(b)}"
    except Exception as e:
        record.update(outcome="error", message=f"{type(e).__name__}: {e}"[:2000])
    if record["outcome"] != "passed":  # into this part's log, whose end the report shows
        for i, text in enumerate(logs, 1):
            print(f"--- train.py run {i} (end) ---\n{text[-3000:]}", flush=True)
    for name in ("data", "first/checkpoints", "resumed/checkpoints"):  # the report keeps logs and metrics only
        shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    _emit(args.result, record)
    return 0 if record["outcome"] == "passed" else 1


def worker_bandwidth(args):
    """All-reduce bus bandwidth of one backend over --sizes (bench/comm.py's bus_bandwidth): one record per
    size. torch: TorchCollectives over a process group whose CUDA backend is NCCL (gloo in a dry run)."""
    import torch
    from kernels.comm import teardown
    from bench.comm import bus_bandwidth, make_backend, parse_size
    device = _start(args.dry_run)
    comm = make_backend(args.backend, device, "auto")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    failed = False
    for size in sizes:  # one call per size, so a size that is too slow still leaves the smaller ones recorded
        row = bus_bandwidth(comm, [size], torch.float32, device, warmup=2 if args.dry_run else 3,
                            iters=2 if args.dry_run else 10)[0]
        failed |= not row["correct"]
        _emit(args.result, dict(kind="bandwidth", backend=args.backend, dtype="float32", **row))
    teardown(1 if failed else 0)


def worker_gpt2(args):
    """GPT-2 124M (block 1024, bf16 autocast, fused AdamW) on one device through the single strategy, random
    tokens: tokens/s and MFU over the timed steps after the warm-up ones (which include torch.compile's)."""
    import torch
    from model import GPTConfig, flops_per_token
    from parallel import build_strategy
    from tests.reference import train_config
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    compile_ = args.compile == "on"
    if args.dry_run:  # tiny, and aot_eager: inductor on CPU compiles C++ for ~25 s, which proves nothing here
        model_config = GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=2, n_embd=64)
        batch, warmup, steps, backend = 4, 1, 2, "aot_eager"
    else:
        model_config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=True)
        batch, warmup, steps, backend = args.gpt2_batch, 3, 20, "inductor"
    cfg = train_config(dtype="bfloat16", compile=compile_, compile_backend=backend, learning_rate=6e-4)
    strategy = build_strategy(cfg, device)
    strategy.build_model(model_config)
    opt = strategy.configure_optimizer()
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model_config.vocab_size, (batch, model_config.block_size), generator=g).to(device)
    y = torch.roll(x, -1, dims=1)

    def step():
        loss = strategy.forward_backward([(x, y)], scaler)
        strategy.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup):
        first = step().item()
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * model_config.block_size / dt
    flops = flops_per_token(model_config) * tokens
    from tools.profiling import peak_flops  # the table train.py's MFU uses
    name, peak = peak_flops(device, "bfloat16")
    record = dict(kind="gpt2", compile=compile_, compile_backend=backend if compile_ else None, device=name,
                  params=sum(p.numel() for p in strategy.model.parameters()), batch=batch,
                  block_size=model_config.block_size, ms_per_step=dt * 1e3, tokens_per_s=tokens,
                  tflops=flops / 1e12, mfu=flops / peak if peak else None, peak_tflops=peak / 1e12 if peak else None,
                  warmup_s=warm, first_loss=first, last_loss=last.item(), steps=steps)
    if device.type == "cuda":
        record["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    _emit(args.result, record)
    ok = torch.isfinite(last).item()
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # skip interpreter teardown (compile workers), as comm.teardown does


WORKERS = dict(env=worker_env, tests=worker_tests, strategies=worker_strategies, bandwidth=worker_bandwidth,
               train=worker_train, gpt2=worker_gpt2)


# ----------------------------------------------------------------------------------------------------------
# the orchestrator

PYTEST_SHIM = '''"""Stand-in for pytest where it is not installed (written by tools/gpu_check.py). The GPU test \
classes are
unittest classes; their modules use pytest only to declare pytest functions at import time, which never run here."""
import importlib
import unittest


def _decorator(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda f: f


class _Mark:
    def __getattr__(self, name):
        return _decorator


mark, fixture = _Mark(), _decorator


def skip(reason=""):
    raise unittest.SkipTest(reason)


def fail(reason=""):
    raise AssertionError(reason)


def importorskip(name, *args, **kwargs):
    return importlib.import_module(name)
'''


def child_env(dry_run, shim_dir):
    env = dict(os.environ)
    env.update(NANOPARALLEL_SHARE_GPU="1", NANOPARALLEL_TRITON_CHECK_LAUNCHES="1", NANOPARALLEL_TRITON_TIMEOUT_S="60",
               PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")  # ranks share GPU 0 (comm.share_gpus); a crash
    #                                                            prints every thread's Python frames
    env.setdefault("TORCH_SYMMMEM", "CUDA")  # torch's cuMem-based symmetric memory, whose peers' buffers the kernels
    #                                          address directly (not NVSHMEM's or NCCL's allocator)
    if dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    if shim_dir:
        env["PYTHONPATH"] = os.pathsep.join([shim_dir] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_part(phase, part, argv, ranks, timeout_s, out_dir, dry_run, env, extra):
    """Run one part in its own process(es) with a time limit; return its record (status, seconds, log, results)."""
    slug = f"{phase}-{part}".replace(" ", "-").replace("/", "-")
    result, log = os.path.join(out_dir, "parts", f"{slug}.jsonl"), os.path.join(out_dir, "parts", f"{slug}.log")
    worker = ["-m", "tools.gpu_check", "--worker", *argv, "--result", result] + extra
    if dry_run:
        worker.append("--dry-run")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *worker]
           if ranks > 1 else [sys.executable, *worker])
    t0 = time.perf_counter()
    env = {**env, "GPU_CHECK_HANG_S": str(max(timeout_s - 10, 5))}  # faulthandler's stacks before the kill (_start)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, status = None, "timeout"
    records = []
    if os.path.exists(result):
        with open(result) as f:
            records = [json.loads(line) for line in f if line.strip()]
    with open(log) as f:
        tail = f.read()[-4000:]
    return dict(phase=phase, part=part, status=status, exit_code=code, seconds=round(time.perf_counter() - t0, 1),
                timeout_s=timeout_s, command=" ".join(cmd), log=os.path.relpath(log, out_dir), records=records,
                log_tail=tail if status != "passed" else "")


def skip_reason(phase, part, env_records, dry_run):
    """Why a part does not run (a string), or None."""
    if dry_run and part.endswith(("nccl", "cuda")):
        return "dry run: libnccl needs a GPU" if part.endswith("nccl") else "dry run: the cuda library needs a GPU"
    probes = {p["api"]: p for r in env_records for p in r.get("probes", [])}
    if "nccl" in part and probes.get("libnccl (kernels/nccl.py)", {}).get("status") == "missing":
        return "libnccl not found: " + probes["libnccl (kernels/nccl.py)"]["detail"]
    if "triton" in part and probes.get("triton", {}).get("status") == "missing":
        return "triton not importable: " + probes["triton"]["detail"]
    return None


def orchestrate(args):
    """Run the plan within the budget and write the report; return (report dict, exit code)."""
    start = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = os.path.abspath(args.out or os.path.join(REPO, "out-gpu-check", stamp + ("-dry-run" if args.dry_run
                                                                                        else "")))
    os.makedirs(os.path.join(out_dir, "parts"), exist_ok=True)
    shim_dir = None
    if importlib.util.find_spec("pytest") is None:
        shim_dir = os.path.join(out_dir, "pytest-shim")
        os.makedirs(shim_dir, exist_ok=True)
        with open(os.path.join(shim_dir, "pytest.py"), "w") as f:
            f.write(PYTEST_SHIM)
    env = child_env(args.dry_run, shim_dir)
    extra = ["--gpt2-batch", str(args.gpt2_batch)]
    only = set(args.only.split(",")) if getattr(args, "only", None) else None
    parts = [p for p in plan(args.dry_run) if p[0] in args.phases and (only is None or p[1] in only or p[0] == "env")]
    deadline = start + args.budget_s
    reserve = 5  # seconds kept for each part still to come
    results, env_records = [], []
    for i, (phase, part, argv, ranks, cap) in enumerate(parts):
        reason = skip_reason(phase, part, env_records, args.dry_run)
        left = deadline - time.perf_counter() - reserve * (len(parts) - i - 1)
        if reason is None and left < 15:
            reason = f"not run: the {args.budget_s:.0f} s budget was spent"
        if reason:
            results.append(dict(phase=phase, part=part, status="skipped", reason=reason, records=[], seconds=0,
                                command=" ".join(argv)))
            print(f"gpu_check: {phase}/{part}: skipped ({reason})", flush=True)
            continue
        r = run_part(phase, part, argv, ranks, int(min(cap, left)), out_dir, args.dry_run, env, extra)
        results.append(r)
        if phase == "env":
            env_records = r["records"]
        print(f"gpu_check: {phase}/{part}: {r['status']} in {r['seconds']} s", flush=True)
    report = dict(title="gpu_check report", dry_run=args.dry_run, date=stamp, budget_s=args.budget_s,
                  seconds=round(time.perf_counter() - start, 1), out_dir=out_dir, pytest_shim=shim_dir is not None,
                  parts=results)
    report["ok"] = all(r["status"] in ("passed", "skipped") for r in results) and all(
        rec.get("outcome", "passed") in ("passed", "skipped") and rec.get("correct", True)
        for r in results for rec in r["records"])
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    return report, 0 if report["ok"] else 1


# ----------------------------------------------------------------------------------------------------------
# the report

def _fmt(x, spec=".2e"):
    return "" if x is None else format(x, spec)


def _human(nbytes):
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:g} {unit}"
    return f"{nbytes} B"


def markdown(report):
    """The report as Markdown: environment, API compatibility, test classes, strategies, bandwidth, GPT-2, parts."""
    parts = report["parts"]
    by_phase = {}
    for r in parts:
        by_phase.setdefault(r["phase"], []).append(r)
    lines = [f"# {report['title']}{' (dry run on CPU)' if report['dry_run'] else ''}", "",
             f"{report['date']} UTC, {report['seconds']} s of a {report['budget_s']:.0f} s budget: "
             f"**{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}**.", ""]
    env = next((rec for r in by_phase.get("env", []) for rec in r["records"]), None)
    lines += ["## Environment", ""]
    if env:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env["info"].items()] + [""]
        lines += ["## APIs the kernels and strategies need", "", "| API | status | detail | consequence |",
                  "|---|---|---|---|"]
        lines += [f"| {p['api']} | {p['status']} | {p['detail']} | {p['consequence']} |" for p in env["probes"]]
        lines.append("")
    else:
        lines += ["(the env part did not report)", ""]

    lines += ["## GPU test classes", "", "| class | passed | failed | skipped | seconds | status |",
              "|---|---|---|---|---|---|"]
    failures = []
    for r in by_phase.get("tests", []):
        recs = r["records"]
        count = {o: sum(x["outcome"] == o for x in recs) for o in ("passed", "failed", "error", "skipped")}
        suite = recs[0]["suite"] if recs else r.get("command", r["part"]).split("--suite ")[-1]
        status = r["status"] if r["status"] != "skipped" else f"skipped: {r['reason']}"
        lines.append(f"| {suite} | {count['passed']} | {count['failed'] + count['error']} | {count['skipped']} | "
                     f"{r['seconds']} | {status} |")
        failures += [f"- `{x['test']}` ({x['outcome']}): {(x['message'].strip().splitlines() or [''])[-1]}"
                     for x in recs if x["outcome"] in ("failed", "error")]
        failures += [f"- `{x['test']}` skipped: {x['message']}" for x in recs if x["outcome"] == "skipped"]
    lines += [""] + failures + ([""] if failures else [])

    from tests.reference import GRAD_TOL, LOSS_TOL  # the rule the strategies part applies
    cells = {r["part"]: r for r in by_phase.get("strategies", [])}
    steps = next((rec["steps"] for r in cells.values() for rec in r["records"]), "")
    lines += [f"## Strategies vs single (fp32, {steps} steps, 2 ranks on one device)", "",
              "Each cell is its own process. Each step checked against the single model from the same state "
              "(tests/reference.py's rule); a passed cell gives max |loss - single's| (< "
              f"{LOSS_TOL:g}) / max |clipped gradient - single's| (< {GRAD_TOL:g}) / the largest update difference "
              "as a fraction of its rounding tolerance (< 1).", "",
              "| strategy | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    failures = []
    for name in STRATEGY_NAMES:
        row = []
        for v in VARIANTS:
            part = cells.get(f"{name}/{v}")
            rec = part["records"][0] if part and part["records"] else None
            if part is None:
                row.append("not run")
            elif part["status"] == "skipped":
                row.append(f"skipped: {part['reason']}")
            elif rec is None:  # crashed or hung before it reported: the log's end has the Python frames
                row.append(f"{'HANG (timeout)' if part['status'] == 'timeout' else 'CRASH'} ({part['log']})")
            elif rec["outcome"] == "passed":
                row.append(f"ok {_fmt(rec['loss_diff'])} / {_fmt(rec['grad_diff'])} / "
                           f"{_fmt(rec['param_ratio'], '.2f')}")
            else:
                row.append(f"{'FAIL' if rec['outcome'] == 'failed' else 'ERROR'} {rec['message'][:150]}")
                failures.append(f"- {name}/{v}: {rec['message'][:1000]}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += [""] + failures + ([""] if failures else [])

    runs = {r["part"]: r for r in by_phase.get("train", [])}
    if runs:
        lines += ["## train.py: 4 iterations on 2 ranks, checkpoint at 2, resumed to 4", "",
                  "| strategy/variant | status | losses (it 0-3) | resumed it 2, 3 | max diff | MFU line |",
                  "|---|---|---|---|---|---|"]
        for name in [f"{s}/{v}" for s, v in TRAIN_CELLS]:
            part = runs.get(name)
            rec = part["records"][0] if part and part["records"] else None
            if part is None or rec is None:
                status = "not run" if part is None else (f"skipped: {part['reason']}" if part["status"] == "skipped"
                                                         else f"{part['status']} ({part['log']})")
                lines.append(f"| {name} | {status} | | | | |")
                continue
            fmt = lambda d: ", ".join(f"{d[k]:.4f}" for k in sorted(d, key=int))  # noqa: E731
            lines.append(f"| {name} | {rec['outcome']}{': ' + rec['message'][:150] if 'message' in rec else ''} | "
                         f"{fmt(rec.get('losses', {}))} | {fmt(rec.get('resumed_losses', {}))} | "
                         f"{_fmt(rec.get('resume_diff'))} | {' '.join(rec.get('mfu_line', []))} |")
        lines.append("")

    bw = [rec for r in by_phase.get("bandwidth", []) for rec in r["records"]]
    backends = BACKENDS
    label = {"torch": "torch (NCCL)" if not report["dry_run"] else "torch (gloo)", "nccl": "nccl (ours)",
             "triton": "triton (ours)", "cuda": "cuda (ours, libnanoccl)"}
    lines += ["## All-reduce bus bandwidth (fp32, 2 ranks, GB/s; busbw = S/t * 2(N-1)/N)", "",
              "| size | " + " | ".join(label[b] for b in backends) + " |", "|---|" + "---|" * len(backends)]
    for size in sorted({rec["bytes"] for rec in bw}):
        cells = []
        for b in backends:
            rec = next((x for x in bw if x["backend"] == b and x["bytes"] == size), None)
            cells.append("" if rec is None else f"{rec['busbw']:.3f} ({rec['seconds'] * 1e3:.3g} ms)"
                         + ("" if rec["correct"] else " WRONG RESULT"))
        lines.append(f"| {_human(size)} | " + " | ".join(cells) + " |")
    for r in by_phase.get("bandwidth", []):
        if r["status"] != "passed":
            lines.append(f"- {r['part']}: {r['status']}{': ' + r['reason'] if r.get('reason') else ''}")
    lines.append("")

    g = [rec for r in by_phase.get("gpt2", []) for rec in r["records"]]
    lines += ["## GPT-2 on one device (bf16 autocast, single strategy)", "",
              "| compile | tokens/s | MFU | TFLOP/s | ms/step | batch x block | params | warm-up s "
              "| loss first -> last |",
              "|---|---|---|---|---|---|---|---|---|"]
    for rec in g:
        mfu = "" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
        lines.append(f"| {rec['compile_backend'] or 'off'} | {rec['tokens_per_s']:,.0f} | {mfu} | "
                     f"{rec['tflops']:.1f} | {rec['ms_per_step']:.1f} | {rec['batch']} x {rec['block_size']} | "
                     f"{rec['params'] / 1e6:.1f}M | {rec['warmup_s']:.1f} | {rec['first_loss']:.3f} -> "
                     f"{rec['last_loss']:.3f} |")
    for r in by_phase.get("gpt2", []):
        if r["status"] != "passed":
            lines.append(f"- {r['part']}: {r['status']}{': ' + r['reason'] if r.get('reason') else ''}")
    lines.append("")

    lines += ["## Parts", "", "| phase | part | status | seconds | limit s | log |", "|---|---|---|---|---|---|"]
    for r in parts:
        lines.append(f"| {r['phase']} | {r['part']} | {r['status']}{': ' + r['reason'] if r.get('reason') else ''} | "
                     f"{r['seconds']} | {r.get('timeout_s', '')} | {r.get('log', '')} |")
    bad = [r for r in parts if r["status"] in ("failed", "timeout") and r.get("log_tail")]
    for r in bad:
        lines += ["", f"### {r['phase']}/{r['part']}: {r['status']} (end of {r['log']})", "", "```",
                  r["log_tail"].strip()[-2500:], "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------

def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the whole orchestration on CPU, tiny sizes")
    p.add_argument("--out", default=None, help="report directory (default out-gpu-check/<UTC time>)")
    p.add_argument("--budget-s", type=float, default=450, help="wall-clock budget of the whole check")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--only", default=None, help="comma-separated parts to run (e.g. pp/nccl,3d/nccl: in every phase "
                   "that has such a part, strategies and train for fsdp/custom): the rest skipped")
    p.add_argument("--gpt2-batch", type=int, default=16, help="GPT-2 micro-batch (sequences of 1024 tokens)")
    p.add_argument("--worker", default=None, choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--suite", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--strategy", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile", default="off", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if args.worker:
        return WORKERS[args.worker](args)
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print(f"gpu_check: no GPU here (torch {torch.__version__}: torch.cuda.is_available() is False); "
                  f"`python -m tools.gpu_check --dry-run` runs the same orchestration on CPU")
            return 2
    report, code = orchestrate(args)
    print(os.path.join(report["out_dir"], "report.md"))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
