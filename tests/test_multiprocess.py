"""Two local processes (2 fake CPU devices each, jax.distributed on 127.0.0.1 through the ATOMO_* variables the
trainer honours) train like one process with 4 devices: same mesh (the data axis across the processes, fsdp within
each, as on a pod), same global batches, same losses; a SIGTERM to one of them stops both at one saved step; a
process that reaches the first collective long after the other does not end the run.

The dataset is exactly one global batch, unshuffled, so both runs see the same examples whatever the per-process
sharding of the sampler. Tolerance: per-step losses agree to relative 1e-5 (only collective order may differ).
"""

from __future__ import annotations

import os
import re
import signal

import numpy as np

from atomo_jax.training.preemption import STOPPED_EXIT_CODE
from tests.conftest import TINY_DEMO, cli_env, kill_all, losses, start, start_processes, wait_all, wait_for

# One global batch of 8, unshuffled, on data 2 x fsdp 2.
SMALL = [*TINY_DEMO, "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.data.num_videos=8", "--config.data.shuffle=False", "--config.mesh.data=-1", "--config.mesh.fsdp=2",
         "--config.checkpoint.every_steps=0", "--config.checkpoint.async_save=False", "--config.sample.at_end=False"]


def test_two_processes_train_like_one_and_stop_together_on_one_hosts_sigterm(tmp_path):
    """The same job on 1 process x 4 devices and on 2 processes x 2 devices: the same losses. Then a preemption
    notice reaches one host of the 2-process job: JAX's preemption service (not a per-step all-gather) brings every
    process to the same step, where all save one shared checkpoint and stop. One 2-process run for both: each such
    run compiles everything again in the second process (the compilation cache serves process 0 only)."""
    one, two = tmp_path / "one", tmp_path / "two"
    procs = start_processes("atomo_jax.train", *SMALL, "--config.train.num_steps=1000", f"--workdir={two}",
                            num_processes=2, devices_per_process=2)
    ref = start("atomo_jax.train", *SMALL, "--config.train.num_steps=3", f"--workdir={one}", env=cli_env(4))
    try:
        wait_for(lambda: max(losses(two), default=0) >= 3, procs, "step 3")
        os.kill(procs[1].pid, signal.SIGTERM)
        outs = wait_all(procs, timeout=600, returncode=STOPPED_EXIT_CODE)  # both stopped, neither finished
        ref_out = wait_all([ref])[0]
    finally:
        kill_all([*procs, ref])
    for out in (ref_out, *outs):
        assert "devices=4 mesh={'data': 2, 'fsdp': 2, 'tensor': 1}" in out, out[-2000:]
    a, b = np.asarray(list(losses(one).values())), np.asarray(list(losses(two).values()))[:3]
    assert a.shape == b.shape == (3,)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5, (a, b)

    stopped = [re.search(r"preempted: saved step (\d+)", out) for out in outs]
    assert all(stopped), [out[-2000:] for out in outs]
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step >= 3
    assert os.listdir(two / "checkpoints") == [str(step)]
    assert max(losses(two)) == step


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
