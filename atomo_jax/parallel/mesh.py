"""Device mesh from the config: axes (data, fsdp, tensor); -1 fills the remaining devices.

Multi-slice TPU jobs (several slices over DCN) put `dcn_data` slices on the outer data axis, so only data-parallel
gradient reductions cross the slow network.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec as P
from jax.experimental import mesh_utils
from orbax.checkpoint import multihost

from atomo_jax.parallel.axes import MESH_AXES


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves (data, fsdp, tensor) sizes; exactly one of them may be -1."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"config.mesh: at most one of {MESH_AXES} may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fills:
        if num_devices % known:
            raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                             f"{dict(zip(MESH_AXES, sizes))}")
        sizes[fills[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    dcn = int(mesh_config.dcn_data)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1 or dcn > 1:
        if shape[0] % dcn:
            raise ValueError(f"config.mesh.data={shape[0]} must be a multiple of dcn_data={dcn}")
        ici = (shape[0] // dcn, shape[1], shape[2])
        device_array = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices=devices,
                                                            allow_split_physical_axes=True)
    elif devices[0].platform in ("tpu", "gpu", "cuda"):
        # allow_split_physical_axes: an axis that is no product of whole torus axes (fsdp 16 on v5e-64's 8x8, fsdp 8 on
        # v5e-16's 4x4) takes part of one; jax tries the whole-axis assignment first, so meshes that had one keep it.
        device_array = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    else:
        device_array = np.asarray(devices).reshape(shape)
    mesh = Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    if jax.process_count() > 1 and len({d.process_index for d in mesh.devices.flat}) > 1:
        connect_collectives(mesh)
    return mesh


_connections = itertools.count()


def connect_collectives(mesh: Mesh, timeout_s: int = 600) -> None:
    """Sets up, while every process stands at one barrier, the communicators of each group of devices a program on
    `mesh` reduces or gathers over (every subset of its axes).

    Why: on CPU (gloo) the first collective of a device group is a rendezvous that gives up after 30 s, and each
    process compiles a program on its own before running it: under load one process can reach the first sample's
    gather more than 30 s after the other and the run dies ("Gloo context initialization failed"). Once a group's
    communicator exists, later collectives wait for a late process (150 s of skew, tried here, passed). The
    barrier is the coordination service's, whose timeout is ours to set."""
    multihost.get_barrier_sync_fn()(key=f"atomo_connect_collectives_{next(_connections)}", timeout_ms=timeout_s * 1000)
    names = [a for a in mesh.axis_names if mesh.shape[a] > 1]
    groups = [g for r in range(1, len(names) + 1) for g in itertools.combinations(names, r)]
    every = P(tuple(mesh.axis_names))
    reduce = jax.shard_map(lambda x: [jax.lax.psum(x, g) for g in groups], mesh=mesh, in_specs=every,
                           out_specs=[every] * len(groups))
    jax.block_until_ready(jax.jit(reduce)(jnp.zeros((mesh.size,), jnp.float32)))
