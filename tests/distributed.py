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
"""

import atexit
import os
import signal
import subprocess
import sys
import unittest

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


def torchrun_launcher(test_file, nprocs=(2, 4), timeout_s=600):
    """A pytest test function that runs `test_file`'s DistributedTestCases under torchrun for each of nprocs."""

    @pytest.mark.parametrize("nproc", nprocs)
    def test_torchrun(nproc):
        cmd = torchrun_cmd(nproc, "-m", "unittest", os.path.relpath(test_file, REPO))
        code, out = run_command(cmd, timeout_s)
        assert code == 0, f"{' '.join(cmd)} failed with exit code {code}:\n{out[-12000:]}"

    return test_torchrun
