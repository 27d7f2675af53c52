"""
Running unittest files under torchrun, and launching them from pytest.

A distributed test file defines DistributedTestCase subclasses and one pytest launcher:

    class TestX(DistributedTestCase):
        def test_y(self): ...                       # runs on every rank, inside one process group

    test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))

`torchrun --standalone --nproc_per_node=2 -m unittest tests/test_x.py` runs the cases on 2 ranks (gloo, CPU).
`pytest tests/test_x.py` skips the cases (they need the process group) and runs `test_torchrun`, which launches
that command for each process count with its own port (--standalone) and a timeout, and fails with the ranks'
output if any rank fails.

Every rank ends through parallel.teardown (barrier, gc, destroy, os._exit) with the exit code unittest would
have used, which avoids the gloo crash at exit described in ../shared/notes/cpu-facts.md.

A launch in which a rank was killed by a signal (SIGABRT, SIGSEGV, SIGBUS: a native crash inside torch or gloo, such
as the rare "malloc(): unaligned tcache chunk detected" abort CI saw once in test_cp's 4-process launch and this
machine never reproduced in 50 runs of the same case) and no test had failed is launched once more, with a pytest
warning that quotes the crash; a second crash, or any failed assertion, fails the test with the output of both.
"""

import atexit
import os
import re
import signal
import subprocess
import sys
import unittest
import warnings

import pytest
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kernels.comm import SHARE_GPU_ENV  # noqa: E402
from parallel import init_distributed, teardown  # noqa: E402

UNDER_TORCHRUN = "WORLD_SIZE" in os.environ
_results = []  # the unittest result objects of this process, to choose the exit code


def _exit_through_teardown():
    ok = bool(_results) and all(r.wasSuccessful() for r in _results)
    teardown(0 if ok else 1)


@unittest.skipUnless(UNDER_TORCHRUN, "needs torchrun: run via pytest's test_torchrun launcher or torchrun -m unittest")
class DistributedTestCase(unittest.TestCase):
    """A TestCase whose tests run on every rank of the default process group: comm.init_distributed's (gloo on CPU;
    on a GPU machine NCCL for CUDA tensors, the ranks sharing its GPUs if there are fewer than ranks)."""

    @classmethod
    def setUpClass(cls):
        if not dist.is_initialized():
            os.environ.setdefault(SHARE_GPU_ENV, "1")  # on a GPU machine the ranks may share its GPU(s)
            init_distributed(timeout_s=120)
            atexit.register(_exit_through_teardown)
        cls.rank, cls.world_size = dist.get_rank(), dist.get_world_size()

    def run(self, result=None):
        result = super().run(result)
        _results.append(result)
        return result


def run_command(cmd, timeout_s, env=None):
    """Run cmd (a list) from the repo root in its own process group; return (exit code, stdout+stderr).
    On timeout the whole group (torchrun and its ranks) is killed and the test fails with the output so far."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout_s}s:\n{out[-8000:]}")
    return proc.returncode, out


def torchrun_cmd(nproc, *args):
    """The torchrun command line for nproc local processes on a free port: [python -m torch.distributed.run ...]."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


_SIGNAL_DEATH = re.compile(r"exitcode\s*:\s*-(6|7|11) ")  # torchrun's summary of a rank killed by SIGABRT/BUS/SEGV


def native_crash(out):
    """The crash line to quote if torchrun's output `out` says a rank died of a signal and no test failed an
    assertion (unittest's "FAIL:"; the ranks left behind report ERRORs, not FAILs), else None."""
    if not _SIGNAL_DEATH.search(out) or "FAIL:" in out:
        return None
    lines = [line for line in out.splitlines() if re.search(r"malloc|free\(\)|corrupt|terminate called|Fatal Python "
                                                            r"error|Segmentation fault", line)]
    return lines[0].strip() if lines else "a rank died of a signal"


def torchrun_launcher(test_file, nprocs=(2, 4), timeout_s=600):
    """A pytest test function that runs `test_file`'s DistributedTestCases under torchrun for each of nprocs; a
    launch that only a native crash failed (native_crash) is run once more, with a warning."""

    @pytest.mark.parametrize("nproc", nprocs)
    def test_torchrun(nproc):
        cmd = torchrun_cmd(nproc, "-m", "unittest", os.path.relpath(test_file, REPO))
        code, out = run_command(cmd, timeout_s)
        crash = native_crash(out) if code != 0 else None
        if crash:
            warnings.warn(f"{os.path.basename(test_file)} at {nproc} processes: a rank crashed ({crash}); "
                          f"launched again", RuntimeWarning)
            code, again = run_command(cmd, timeout_s)
            out = f"{out[-6000:]}\n--- launched again after the crash above ---\n{again}"
        assert code == 0, f"{' '.join(cmd)} failed with exit code {code}:\n{out[-12000:]}"

    return test_torchrun
