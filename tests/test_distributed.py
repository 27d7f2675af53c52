"""
The test harness itself (tests/distributed.py): which failed torchrun launches count as a native crash, the only
kind launched a second time. A real launch in which one rank aborts shows that torchrun's summary is recognized;
a failed assertion, a rank that exits with an error, and a rank killed by the launcher are not crashes.

    pytest tests/test_distributed.py     (~5 s)
"""

from tests.distributed import native_crash, run_command, torchrun_cmd

SUMMARY = """Root Cause (first observed failure):
[0]:
  rank      : {rank} (local_rank: {rank})
  exitcode  : {code} (pid: 22115)
"""


def test_a_rank_killed_by_a_signal_is_a_native_crash():
    out = "malloc(): unaligned tcache chunk detected\nEEEE\n" + SUMMARY.format(rank=2, code="-6")
    assert native_crash(out) == "malloc(): unaligned tcache chunk detected"
    assert native_crash(SUMMARY.format(rank=0, code="-11")) == "a rank died of a signal"


def test_failures_that_are_not_crashes_are_not_launched_again():
    assert native_crash("FAIL: test_x\nAssertionError: 1e-3 not less than 1e-5\n" + SUMMARY.format(rank=0, code="-6")) \
        is None  # a failed comparison, even if a rank crashed afterwards
    assert native_crash("Traceback ...\nValueError: bad\n" + SUMMARY.format(rank=1, code="1")) is None
    assert native_crash(SUMMARY.format(rank=1, code="-15")) is None  # SIGTERM: the launcher stopping a rank


def test_a_real_abort_under_torchrun_is_recognized(tmp_path):
    script = tmp_path / "abort_rank1.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    os.abort()\n")
    code, out = run_command(torchrun_cmd(2, str(script)), timeout_s=120)
    assert code != 0 and native_crash(out) is not None, out[-3000:]
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    code, out = run_command(torchrun_cmd(2, str(script)), timeout_s=120)
    assert code != 0 and native_crash(out) is None, out[-3000:]
