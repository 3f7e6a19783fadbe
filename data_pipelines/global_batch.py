"""Per-process numpy batches -> global jax.Arrays laid out on the mesh."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, pspec: PartitionSpec) -> dict:
    """Assembles each process's batch shard into global arrays sharded by `pspec` on `mesh`.

    `pspec` names the mesh axes of the leading (batch) dimension, e.g. P(("data", "fsdp")); trailing dimensions are
    replicated. Every process passes its own rows (from `make_loader(..., shard_index=jax.process_index(),
    shard_count=jax.process_count())`); the global batch is their concatenation in process order. Non-numeric
    entries (captions) stay per-process numpy arrays.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            out[key] = value
            continue
        spec = PartitionSpec(*pspec, *([None] * (value.ndim - len(pspec))))
        if len(spec) > value.ndim:
            raise ValueError(f"to_global: batch[{key!r}] has shape {value.shape}, too few dims for pspec {pspec}")
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
    return out
