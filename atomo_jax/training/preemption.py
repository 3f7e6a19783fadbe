"""SIGTERM (and TPU maintenance notices) -> finish the step, save, stop.

`listen()` is the entry point's first call, before the imports and set-up that take seconds, so a notice that comes
early is not lost (the default action would end the process with 143 and nothing saved). One process: this handler
decides. Several: JAX's preemption service, started by `jax.distributed.initialize`, replaces the handler, catches
the notice on whichever host gets it and agrees on one step for all (`reached_preemption_sync_point`, no collective
per step); a notice that came before it started is handed to it.
"""

from __future__ import annotations

import logging
import os
import signal

# The exit code of a run stopped to save before its last step: sysexits' EX_TEMPFAIL ("try again later"). Not 0, so
# a scheduler never reports an unfinished run as finished; not 1 or 2 (errors), so launchers can tell "rerun to
# resume" from "fix something first" (launch/slurm.sbatch requeues on it, launch/tpu_pod.py reruns).
STOPPED_EXIT_CODE = 75


class Preemption:
    def __init__(self):
        self.requested = False

    def listen(self) -> None:
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):  # noqa: ARG002
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.requested = True

    def distributed_started(self) -> None:
        """Call after `jax.distributed.initialize`: with several processes the preemption service now owns SIGTERM."""
        import jax  # here, not at the top: the handler is installed before the seconds jax takes to import

        if jax.process_count() > 1 and self.requested:
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        import jax  # as in distributed_started: this module loads before jax does

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested
