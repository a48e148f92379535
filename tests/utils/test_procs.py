"""Pool workers die with the job that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARENT = """
import multiprocessing as mp, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from sorakit.utils.procs import die_with_parent

def work(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    init = die_with_parent if sys.argv[2] == "1" else None
    pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=init)
    pool.submit(work, sys.argv[1])
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie waiting for a reaper is dead


def _orphan_after_parent_killed(tmp_path: Path, die: bool) -> int:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    pidfile = tmp_path / f"worker-{int(die)}.pid"
    parent = subprocess.Popen([sys.executable, str(script), str(pidfile), "1" if die else "0"])
    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and pidfile.read_text()):
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.1)
    worker = int(pidfile.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return worker


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_a_worker_dies_when_its_job_is_killed(tmp_path):
    assert not _alive(_orphan_after_parent_killed(tmp_path, die=True))
    orphan = _orphan_after_parent_killed(tmp_path, die=False)  # without it: the worker lives on
    try:
        assert _alive(orphan)
    finally:
        os.kill(orphan, signal.SIGKILL)
