"""Data worker processes end with the process that started them, however it ends.

grain starts its workers with multiprocessing's spawn, and a spawned worker does not die with a SIGKILLed parent:
on a pod relaunched after preemption, every host would pile up orphaned workers (~250 MB each). `guard()` runs a
daemon thread in a worker process that exits the worker as soon as its parent is gone (it is re-parented). It does
nothing in a process that multiprocessing did not start (worker_count=0: the trainer itself). A parent-death signal
(prctl PR_SET_PDEATHSIG) would be simpler, but it fires when the parent *thread* that started the worker ends.
"""

from __future__ import annotations

import multiprocessing
import os
import threading

POLL_S = 0.5
_guarded_pid: int | None = None


def guard() -> None:
    """Idempotent and cheap: call it from code that runs in workers (the loader's per-record transforms)."""
    global _guarded_pid
    if _guarded_pid == os.getpid() or multiprocessing.parent_process() is None:
        return
    _guarded_pid = os.getpid()
    parent = multiprocessing.parent_process().pid

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(POLL_S):
            if os.getppid() != parent:
                os._exit(1)  # no cleanup to do: the parent that would consume our output is gone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
