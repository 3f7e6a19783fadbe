"""Logical-axis annotations -> NamedShardings on a mesh, for parameters, optimizer state and batches."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atomo_jax.parallel import axes as ax


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules: Sequence) -> Any:
    """Shardings for a tree of `nn.LogicallyPartitioned` leaves (from `jax.eval_shape(init)`), unboxed structure."""
    specs = nn.get_partition_spec(boxed_abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, list(rules))
    return _fit(nn.unbox(boxed_abstract), shardings, mesh)


def _fit(abstract: Any, shardings: Any, mesh: Mesh) -> Any:
    """Drops mesh axes that do not divide a dimension (tiny configs on big meshes), keeping the rest."""

    def fit(x, s):
        spec = []
        for dim, names in zip(x.shape, tuple(s.spec) + (None,) * (len(x.shape) - len(s.spec))):
            group = names if isinstance(names, tuple) else (names,) if names else ()
            kept, size = [], 1
            for n in group:
                if dim % (size * mesh.shape[n]) == 0:
                    kept.append(n)
                    size *= mesh.shape[n]
            spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(fit, abstract, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: Sequence, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split as the rules say for `batch`; the rest replicated."""
    target = dict(rules).get(ax.BATCH)
    return NamedSharding(mesh, P(target, *([None] * (ndim - 1))))


@contextlib.contextmanager
def activation_layout(mesh: Mesh, rules: Sequence) -> Iterator[None]:
    """While a function is traced: the model's activation constraints (`nn.with_logical_constraint` on the
    `axes.VIDEO`, `FOLDED_FRAMES`, ... layouts) bind to `mesh` through `rules`, as do the logical rules splash
    attention's shard_map reads. Outside it they are no-ops."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
        yield


def fetch(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host) array as numpy, on every process. Over several processes it is a
    collective: every process must call it (one process alone would wait for, or fetch shards it does not hold)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
