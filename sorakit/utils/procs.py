"""Worker processes that cannot outlive the job that started them."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere nothing happens).

    Call it in a pool's initializer: a job killed by PID (cron, a scheduler, `kill`) otherwise leaves
    its workers running, still writing shards and done records into a directory that may meanwhile
    have been removed or handed to a rerun.
    """
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _pool_init(init: Callable[..., None], next_slot, args: tuple) -> None:
    die_with_parent()
    with next_slot.get_lock():
        slot = next_slot.value
        next_slot.value += 1
    init(slot, *args)


def spread_device(device: str, slot: int) -> str:
    """The device of the process in `slot`: a bare `cuda` on a machine with several GPUs becomes
    `cuda:<slot mod GPUs>`, so that N processes share the GPUs; any other device is kept."""
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{slot % count}" if count > 1 else device


def run_each(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    processes: int,
    init: Callable[..., None],
    initargs: tuple = (),
    on_done: Callable[[T, R], None] | None = None,
) -> list[tuple[T, BaseException]]:
    """Call `fn(item)` for every item; return the items that raised, with their errors.

    With `processes` > 1 the items are shared between that many spawned processes (a forked copy of
    a process that already ran torch threads can deadlock), which split the machine's cores between
    them and die with the job. Otherwise everything runs here, in the job's own process, which must
    not die with its shell (`nohup`). `init(slot, threads, *initargs)` prepares each process before
    its first item: `slot` numbers the processes from 0 (see `spread_device`), `threads` is its share
    of the cores (0 here: keep torch's default). `fn` and `init` must be module-level functions.
    `on_done(item, result)` runs in this process as each item finishes.
    """
    failed: list[tuple[T, BaseException]] = []
    if not items:  # nothing to prepare a model for
        return failed
    processes = min(processes, len(items))
    if processes <= 1:
        init(0, 0, *initargs)
        for item in items:
            try:
                result = fn(item)
            except Exception as e:  # one bad item never stops the others
                failed.append((item, e))
                continue
            if on_done:
                on_done(item, result)
        return failed
    threads = max(1, (os.cpu_count() or 1) // processes)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_pool_init,
                             initargs=(init, ctx.Value("i", 0), (threads, *initargs))) as pool:
        futures = {pool.submit(fn, item): item for item in items}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in finished:
                if fut.exception() is not None:
                    failed.append((futures[fut], fut.exception()))
                elif on_done:
                    on_done(futures[fut], fut.result())
    return failed
