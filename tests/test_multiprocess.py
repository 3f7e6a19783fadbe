"""A process that reaches the first collective long after the other does not end a multi-process run (2 local
processes x 2 fake CPU devices, jax.distributed on 127.0.0.1 through the ATOMO_* variables the entry points honour).

That two processes train like one and stop together on one host's SIGTERM is tests/test_buckets.py's
bucketed-training test (one multi-process job for both); tests/test_journey.py runs the rest of a user's journey on
two processes.
"""

from __future__ import annotations

from tests.conftest import kill_all, start_processes, wait_all


def test_a_process_45_s_late_at_the_first_gather_does_not_end_the_run():
    """Each process compiles its first program alone, so one can reach the first collective long after the other
    (the CI journey run died this way at its first sample). On CPU that collective's gloo rendezvous gives up after
    30 s unless the mesh set up its communicators while the processes stood together."""
    procs = start_processes("tests.late_gather", num_processes=2, devices_per_process=2)
    try:
        outs = wait_all(procs, timeout=600)
    finally:
        kill_all(procs)
    for out in outs:
        assert "gathered [0.0, 1.0, 10.0, 11.0]" in out, out[-3000:]
