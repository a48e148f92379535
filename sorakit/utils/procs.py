"""Worker processes that cannot outlive the job that started them."""

from __future__ import annotations

import contextlib


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
