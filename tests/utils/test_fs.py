import multiprocessing as mp
import os
import signal
import time

import pytest

from sorakit.utils.fs import LockHeld, append_jsonl, atomic_path, atomic_write_json, exclusive_lock, read_jsonl


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_replace_and_jsonl(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert (tmp_path / "a.json").read_text().strip().endswith("}")
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"i": 1})
    with open(log, "a") as f:
        f.write('{"i": 2')  # a line torn by a kill
    assert read_jsonl(log) == [{"i": 1}]


def _hold(path, ready):
    with exclusive_lock(path):
        ready.set()
        time.sleep(60)


def test_lock_is_exclusive_and_released_when_the_holder_dies(tmp_path):
    lock = tmp_path / "run.lock"
    ready = mp.get_context("spawn").Event()
    p = mp.get_context("spawn").Process(target=_hold, args=(lock, ready))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(LockHeld, match="run.lock"):
            with exclusive_lock(lock):
                pass
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    with exclusive_lock(lock):  # the kernel released the dead holder's lock
        pass
