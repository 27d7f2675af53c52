"""
The Triton kernels of kernels/triton_comm.py compile for sm_80 and sm_90 (no GPU needed), in every variant the
backend launches, and the backend's description of its launches is enforced.

- test_every_kernel_compiles_for_sm80_and_sm90: `python -m kernels.compile_check` in its own process (the kernels
  must be defined with TRITON_INTERPRET=0): every (architecture, kernel, constexprs, argument specialization) of
  launch_space x ARGUMENTS through Triton's whole pipeline to a cubin. A failure names the kernel, its signature and
  constexprs, and the compiler's message. 728 compiles in 2 processes: ~50 s on 2 idle cores (91 s of CPU).
- the rest, in this process (interpreter): the description covers every kernel of the module and every value the
  backend's tuning and dtypes produce, and check_launch rejects a launch outside it, naming what is missing.
  The backend calls check_launch on every launch under the interpreter, so tests/test_triton_comm.py (every
  collective, dtype and strategy on 2 and 4 ranks) fails if a launch site drifts from the description.
"""

import json
import os
import sys

import pytest
import torch

from tests.distributed import REPO, run_command

triton_comm = pytest.importorskip("kernels.triton_comm")


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "compile.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code, text = run_command([sys.executable, "-m", "kernels.compile_check", "--json", str(out)], 900, env=env)
    assert out.exists(), f"kernels.compile_check wrote no report (exit code {code}):\n{text[-6000:]}"
    report = json.loads(out.read_text())
    failed = [f"{e['describe']}: {e['error']}" for e in report["kernels"] if not e["ok"]]
    assert not failed, (f"{len(failed)} of {report['compiled']} kernel variants do not compile:\n"
                        + "\n".join(failed[:20]))
    assert not report["specialization_errors"], report["specialization_errors"]
    assert code == 0, text[-6000:]
    compiled = {(e["arch"], e["kernel"]) for e in report["kernels"]}
    assert compiled == {(a, k) for a in (80, 90) for k in triton_comm.KERNELS}
    reduce_kinds = {(e["arch"], e["constexprs"]["KIND"], e["constexprs"]["OP"]) for e in report["kernels"]
                    if e["kernel"] == "_reduce_kernel"}
    assert reduce_kinds == {(a, str(k), str(o)) for a in (80, 90) for k in (0, 1, 2) for o in (0, 1, 2)}
    print(text.strip().splitlines()[-1])


def test_the_description_covers_every_kernel_of_the_module():
    """Every @triton.jit function of triton_comm whose name ends in _kernel is in KERNELS, ARGUMENTS and launch_space,
    and ARGUMENTS names exactly its runtime parameters (the rest are constexprs in every combination)."""
    jitted = {name for name, obj in vars(triton_comm).items()
              if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    assert jitted == set(triton_comm.KERNELS) == set(triton_comm.ARGUMENTS) == set(triton_comm.NUM_WARPS)
    tuning = triton_comm.TUNING["cuda"]
    space = triton_comm.launch_space(4, tuning["block"], tuning["spins"])
    assert set(space) == jitted
    for name, combos in space.items():
        fn = triton_comm.KERNELS[name]
        for constexprs in combos:
            runtime = [p for p in fn.arg_names if p not in constexprs]
            assert runtime == list(triton_comm.ARGUMENTS[name]), name


def test_launch_space_spans_dtypes_ops_and_element_sizes():
    """What the backend's dispatch tables produce is in the space: every reduced dtype and op, every element size
    data movement uses, a broadcast (one lane) and an N-rank gather, both mailbox directions; nothing for a group
    of one besides the data kernels."""
    t = triton_comm
    block, spins = t.TUNING["cuda"]["block"], t.TUNING["cuda"]["spins"]
    space = t.launch_space(3, block, spins)
    keys = {name: {t.constexpr_key(c) for c in combos} for name, combos in space.items()}
    for kind in t.REDUCE_KIND.values():
        for op in t.OPS.values():
            assert t.constexpr_key(dict(WORLD=3, OP=op, KIND=kind, BLOCK=block)) in keys["_reduce_kernel"]
    for dt in t.MOVE_TYPE.values():
        for lanes in (1, 4):
            assert t.constexpr_key(dict(DT=dt, LANES=lanes, BLOCK=block)) in keys["_gather_kernel"]
        for send in (True, False):
            assert t.constexpr_key(dict(SEND=send, DT=dt, BLOCK=block)) in keys["_mailbox_kernel"]
    assert keys["_barrier_kernel"] == {t.constexpr_key(dict(WORLD=3, LANES=4, SPINS=spins))}
    alone = t.launch_space(1, block, spins)
    assert alone["_barrier_kernel"] == alone["_mailbox_kernel"] == []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8):
        assert torch.empty((), dtype=dtype).element_size() in t.MOVE_TYPE


def test_specialization_is_tritons_rule():
    t = triton_comm
    assert t.specialization(1) == ("constexpr", 1)
    assert t.specialization(0) == ("i32", "D") and t.specialization(17) == ("i32", "")
    assert t.specialization(2**31) == ("i64", "D") and t.specialization(2**40 + 3) == ("i64", "")
    x = torch.zeros(8, dtype=torch.int64)
    assert t.specialization(x) == ("*i64", "D")
    assert t.specialization(x.view(torch.int32)[1:]) == ("*i32", "")
    with pytest.raises(TypeError):
        t.specialization(1.5)


def test_check_launch_rejects_what_no_compile_test_covers():
    """A launch outside the description is a RuntimeError naming the kernel and what is missing: an argument whose
    specialization ARGUMENTS does not list, constexprs outside launch_space, or arguments that are not the
    kernel's."""
    t = triton_comm
    heaps = torch.zeros(2, dtype=torch.int64)
    ok = dict(WORLD=2, OP=0, KIND=1, BLOCK=1024)
    t.check_launch("_reduce_kernel", (heaps, 0, 2**40, 37), ok, 2, 1024, 1 << 16)  # covered: no error
    with pytest.raises(RuntimeError, match=r"_reduce_kernel: argument in_offset=2147483648 specializes as \('i64'"):
        t.check_launch("_reduce_kernel", (heaps, 2**31, 2**40, 37), ok, 2, 1024, 1 << 16)
    with pytest.raises(RuntimeError, match=r"_reduce_kernel: constexprs .*'KIND': '3'.* not in launch_space"):
        t.check_launch("_reduce_kernel", (heaps, 0, 2**40, 37), {**ok, "KIND": 3}, 2, 1024, 1 << 16)
    with pytest.raises(RuntimeError, match="_reduce_kernel: constexprs .* not in launch_space"):
        t.check_launch("_reduce_kernel", (heaps, 0, 2**40, 37), ok, 2, 512, 1 << 16)  # a block no test compiled
    with pytest.raises(RuntimeError, match="_reduce_kernel: launched with arguments"):
        t.check_launch("_reduce_kernel", (heaps, 0, 2**40), ok, 2, 1024, 1 << 16)


def test_compile_jobs_cover_the_space(monkeypatch):
    """compile_check's job list holds, for both architectures, every constexpr combination of launch_space for each
    world size and, for each, the generic and aligned signatures and every listed specialization of every argument.
    (Imported here without compiling anything: the module only builds its list.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # compile_check sets 0; undone after the test
    sys.path.insert(0, REPO)
    from kernels import compile_check
    t = triton_comm
    jobs = compile_check.compile_jobs(archs=(80, 90), world_sizes=(2, 4))
    have = {(j["arch"], j["kernel"], t.constexpr_key(j["constexprs"]), tuple(sorted(j["args"].items())))
            for j in jobs}
    assert len(have) == len(jobs)
    for N in (2, 4):
        for name, combos in t.launch_space(N, 1024, 1 << 16).items():
            for c in combos:
                for arch in (80, 90):
                    mine = [dict(args) for a, k, ck, args in have if (a, k, ck) == (arch, name, t.constexpr_key(c))]
                    generic = {p: next((s for s in specs if s[1] == ""), specs[0])
                               for p, specs in t.ARGUMENTS[name].items()}
                    assert generic in mine, (arch, name, c)
                    if N == 4:  # the largest: every listed specialization of every argument
                        for arg, specs in t.ARGUMENTS[name].items():
                            for spec in specs:
                                assert any(args[arg] == spec for args in mine), (arch, name, c, arg, spec)
