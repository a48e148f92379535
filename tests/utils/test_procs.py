"""Pool workers die with the job that started them; `run_each` runs items here or in processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sorakit.utils.procs import run_each, spread_device

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


def _square_or_fail(x: int) -> tuple[int, int, str]:
    if x == 3:
        raise ValueError("three is broken")
    return x * x, os.getpid(), os.environ["RUN_EACH_INIT"]


def _note_init(slot: int, threads: int, tag: str) -> None:
    os.environ["RUN_EACH_INIT"] = f"{tag}:{slot}:{threads}"


@pytest.mark.parametrize("processes", [1, 2])
def test_run_each_reports_every_result_and_every_failure(processes, monkeypatch):
    monkeypatch.delenv("RUN_EACH_INIT", raising=False)
    done = {}
    failed = run_each(_square_or_fail, [1, 2, 3, 4, 5, 6], processes=processes, init=_note_init, initargs=("x",),
                      on_done=lambda item, result: done.setdefault(item, result))
    assert [(item, str(e)) for item, e in failed] == [(3, "three is broken")]  # one bad item, the rest still run
    assert {k: v[0] for k, v in done.items()} == {1: 1, 2: 4, 4: 16, 5: 25, 6: 36}
    pids = {pid for _, pid, _ in done.values()}
    inits = {pid: init for _, pid, init in done.values()}
    if processes == 1:
        assert pids == {os.getpid()} and inits[os.getpid()] == "x:0:0"  # slot 0, torch's own thread count
    else:
        assert os.getpid() not in pids and "RUN_EACH_INIT" not in os.environ  # set in the workers only
        threads = max(1, (os.cpu_count() or 1) // 2)
        assert set(inits.values()) <= {f"x:0:{threads}", f"x:1:{threads}"}
        assert len(set(inits.values())) == len(pids)  # every process its own slot


def test_spread_device_shares_the_gpus_between_processes(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [spread_device("cuda", s) for s in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert spread_device("cuda:2", 1) == "cuda:2" and spread_device("cpu", 3) == "cpu"  # an explicit choice stays
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert spread_device("cuda", 3) == "cuda"


def _never(*args) -> None:
    raise AssertionError("init ran with nothing to do")


def test_run_each_with_nothing_to_do_prepares_nothing():
    assert run_each(_square_or_fail, [], processes=2, init=_never) == []  # resume after everything: no model load
