"""Multi-host start-up: `jax.distributed.initialize` when the environment says this is one process of many."""

from __future__ import annotations

import os

import jax
from absl import logging

_initialized = False


def maybe_initialize() -> None:
    """TPU pod slices and SLURM jobs are detected by JAX itself; the local launcher passes ATOMO_* variables."""
    global _initialized
    if _initialized:
        return
    env = os.environ
    if env.get("ATOMO_COORDINATOR"):
        jax.distributed.initialize(coordinator_address=env["ATOMO_COORDINATOR"],
                                   num_processes=int(env["ATOMO_NUM_PROCESSES"]),
                                   process_id=int(env["ATOMO_PROCESS_ID"]),
                                   initialization_timeout=int(env.get("ATOMO_INIT_TIMEOUT", "120")))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", "") or \
            env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    else:
        return
    _initialized = True
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
