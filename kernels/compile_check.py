"""
Compile every Triton kernel of kernels/triton_comm.py ahead of time for NVIDIA GPUs, on a machine without one.

The CPU tests run the kernels in Triton's interpreter, which accepts code the compiler rejects; this compiles them
through Triton's whole pipeline (ttir, ttgir, llir, ptx, cubin with the ptxas that triton's wheel carries) for
each architecture, with exactly the variants the backend launches: kernels/triton_comm.py's launch_space (every
constexpr combination: dtypes fp32/bf16/fp16, reductions sum/avg/max, element sizes 1/2/4/8, block size, lanes,
spins, send/receive, for groups of `world_sizes` ranks, with TUNING["cuda"]) times the specializations of the
runtime arguments that ARGUMENTS lists (how Triton's JIT would specialize them at launch: the generic variant,
the all-aligned one, and, for the largest group, each argument's other specializations one at a time). The backend
checks every launch it makes against that same description (TritonCollectives._launch), so the two cannot drift
apart silently.

    python -m kernels.compile_check                       # sm_80 and sm_90, groups of 1, 2, 4 and 8 ranks
    python -m kernels.compile_check --arch 90 --jobs 1 --json out.json

Prints one line per failure (architecture, kernel, signature, constexprs, the compiler's message) and a summary;
exit code 1 if anything failed. Must run in its own process: the kernels have to be defined with
TRITON_INTERPRET=0 (this module sets it before importing them, and refuses if they were imported interpreted).
Each run compiles into a fresh temporary Triton cache unless --cache-dir is given.
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"  # before triton_comm defines the kernels

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_comm  # noqa: E402
from kernels.triton_comm import ARGUMENTS, KERNELS, NUM_WARPS, TUNING, constexpr_key, launch_space  # noqa: E402

ARCHS = (80, 90)           # A100, H100/H200
WORLD_SIZES = (1, 2, 4, 8)  # group sizes: 1 (3d's cuts), 2 (tools/gpu_check.py), 4 and 8 (a node)


def signature_variants(name):
    """The runtime-argument specializations to compile kernel `name` with: [{arg: (type, attribute)}, ...]:
    the generic one (no alignment), the all-aligned one, and from the generic one each argument's every other
    specialization of ARGUMENTS, one argument at a time."""
    declared = ARGUMENTS[name]
    generic = {p: next((s for s in specs if s[1] == ""), specs[0]) for p, specs in declared.items()}
    aligned = {p: next((s for s in specs if s[1] == "D"), specs[0]) for p, specs in declared.items()}
    variants = [generic, aligned]
    for p, specs in declared.items():
        variants += [{**generic, p: s} for s in specs if s != generic[p]]
    unique = []
    for v in variants:
        if v not in unique:
            unique.append(v)
    return unique


def compile_jobs(archs=ARCHS, world_sizes=WORLD_SIZES):
    """Every distinct (arch, kernel name, constexprs, argument specializations) to compile, as a list of dicts:
    every constexpr combination of every world size with the generic and the aligned signature, and for the largest
    world size (the most unrolled code) every combination with every signature variant. (The arguments'
    specializations do not depend on the world size; all of them at all sizes would be 1306 compiles, ~2 minutes.)"""
    tuning = TUNING["cuda"]
    jobs, seen = [], set()
    for N in world_sizes:
        for name, combos in launch_space(N, tuning["block"], tuning["spins"]).items():
            variants = signature_variants(name)
            for constexprs in combos:
                for args in variants if N == max(world_sizes) else variants[:2]:
                    for arch in archs:
                        key = (arch, name, constexpr_key(constexprs), tuple(sorted(args.items())))
                        if key not in seen:
                            seen.add(key)
                            jobs.append(dict(arch=arch, kernel=name, constexprs=constexprs, args=args))
    return jobs


def describe(job):
    """One line naming a job: arch, kernel, signature (with attributes), constexprs."""
    sig = ", ".join(f"{p}: {t}{':16' if a == 'D' else ''}" if t != "constexpr" else f"{p}=1"
                    for p, (t, a) in job["args"].items())
    consts = ", ".join(f"{k}={v}" for k, v in constexpr_key(job["constexprs"]))
    return f"sm_{job['arch']} {job['kernel']}({sig}) [{consts}] num_warps={NUM_WARPS[job['kernel']]}"


def ast_source(job):
    """triton.compiler.ASTSource for a job: what Triton's JIT builds at launch (JITFunction._pack_args): every
    parameter's type ("constexpr" for constexprs and for an int specialized to 1), the constexpr values, and
    tt.divisibility=16 on the arguments specialized "D"."""
    fn = KERNELS[job["kernel"]]
    signature, constexprs, attrs = {}, dict(job["constexprs"]), {}
    for i, p in enumerate(fn.arg_names):
        if p in job["constexprs"]:
            signature[p] = "constexpr"
            continue
        kind, attr = job["args"][p]
        signature[p] = kind
        if kind == "constexpr":
            constexprs[p] = attr
        elif attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_one(job):
    """Compile one job; return (ok, seconds, message)."""
    start = time.perf_counter()
    try:
        kernel = triton.compile(ast_source(job), target=GPUTarget("cuda", job["arch"], 32),
                                options={"num_warps": NUM_WARPS[job["kernel"]]})
        if not kernel.asm.get("cubin"):
            return False, time.perf_counter() - start, "no cubin produced"
        return True, time.perf_counter() - start, ""
    except Exception as e:  # the compiler's message, whatever stage failed
        return False, time.perf_counter() - start, summarize_error(e)


def summarize_error(e):
    """One line from a compiler exception: Triton's CompilationError is "at L:C:", source lines, a "^" line under
    the failing one, then the message; keep the position, the failing source line and the message."""
    lines = [line.rstrip() for line in str(e).splitlines() if line.strip()]
    marker = next((i for i, line in enumerate(lines) if line.strip() == "^"), None)
    if marker is None or marker == 0:
        text = " | ".join(line.strip() for line in lines[-4:])
    else:
        text = f"{lines[0]} {lines[marker - 1].strip()!r}: {' '.join(x.strip() for x in lines[marker + 1:])}"
    return f"{type(e).__name__}: {text}"[:800]


def _compile_many(jobs):
    return [compile_one(job) for job in jobs]


def specialization_mirror_errors():
    """Where triton_comm.specialization disagrees with Triton's own JIT specialization (native_specialize_impl,
    Triton's runtime/jit.py, a private function: used here only) on sample values: a list of messages."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    base = torch.zeros(8, dtype=torch.int64)
    samples = [0, 1, 2, 15, 16, 17, 2**31 - 16, 2**31, 2**40 + 16, 2**40 + 3, base, base.view(torch.int32),
               base.view(torch.int32)[1:]]
    errors = []
    for v in samples:
        theirs = tuple(native_specialize_impl(BaseBackend, v, False, True, True))
        mine = triton_comm.specialization(v)
        if mine != theirs:
            errors.append(f"specialization({v if isinstance(v, int) else 'tensor'}) = {mine}, Triton's {theirs}")
    return errors


def run(archs=ARCHS, world_sizes=WORLD_SIZES, jobs=None, cache_dir=None):
    """Compile everything; return the report dict (see main). jobs: worker processes (default: the CPU count)."""
    if triton_comm.INTERPRET:
        raise RuntimeError("kernels/triton_comm.py was imported with TRITON_INTERPRET=1: run "
                           "`python -m kernels.compile_check` in its own process")
    todo = compile_jobs(archs, world_sizes)
    workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nanoparallel-triton-cache-")
        cache_dir = tmp.name
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    start = time.perf_counter()
    try:
        if workers == 1:
            results = _compile_many(todo)
        else:  # interleaved slices, so every worker gets a mix of kernels; fork: nothing was compiled here yet
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                parts = list(pool.map(_compile_many, [todo[i::workers] for i in range(workers)]))
            results = [None] * len(todo)
            for i, part in enumerate(parts):
                results[i::workers] = part
    finally:
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - start
    entries = [dict(arch=j["arch"], kernel=j["kernel"], constexprs=dict(constexpr_key(j["constexprs"])),
                    args={p: list(s) for p, s in j["args"].items()}, describe=describe(j), ok=ok,
                    seconds=round(sec, 3), error=msg) for j, (ok, sec, msg) in zip(todo, results)]
    return dict(triton=triton.__version__, archs=list(archs), world_sizes=list(world_sizes), workers=workers,
                wall_seconds=round(wall, 1), compiled=len(entries), failed=sum(not e["ok"] for e in entries),
                specialization_errors=specialization_mirror_errors(), kernels=entries)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    p.add_argument("--world-sizes", default=",".join(map(str, WORLD_SIZES)))
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per CPU)")
    p.add_argument("--cache-dir", default=None, help="Triton cache to use (default: a fresh temporary one)")
    p.add_argument("--json", default=None, help="also write the full report here")
    args = p.parse_args(argv)
    report = run(tuple(int(a) for a in args.arch.split(",")), tuple(int(n) for n in args.world_sizes.split(",")),
                 args.jobs, args.cache_dir)
    for e in report["kernels"]:
        if not e["ok"]:
            print(f"FAIL {e['describe']}: {e['error']}")
    for msg in report["specialization_errors"]:
        print(f"FAIL {msg}")
    kinds = sorted({e["kernel"] for e in report["kernels"]})
    print(f"triton {report['triton']}: compiled {report['compiled']} variants of {len(kinds)} kernels for "
          f"{', '.join(f'sm_{a}' for a in report['archs'])} (groups of {report['world_sizes']} ranks) in "
          f"{report['wall_seconds']} s with {report['workers']} processes: {report['failed']} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if report["failed"] or report["specialization_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
