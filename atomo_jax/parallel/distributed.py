"""Multi-host start-up: `jax.distributed.initialize` when the environment says this is one process of many."""

from __future__ import annotations

import glob
import importlib.util
import os

import jax
from absl import logging

_initialized = False


def _on_tpu_vm() -> bool:
    """A Cloud TPU VM (single- or multi-host): TPU chips show up as /dev/accel* or /dev/vfio devices. Calling
    `jax.distributed.initialize()` there is correct for any host count (GCE metadata names the workers), and a
    `gcloud ... tpu-vm ssh` shell does not always set TPU_WORKER_HOSTNAMES."""
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")) and \
        importlib.util.find_spec("libtpu") is not None


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
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS") or _on_tpu_vm():
        jax.distributed.initialize()  # JAX reads the SLURM / TPU-VM metadata itself
    else:
        return
    _initialized = True
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
