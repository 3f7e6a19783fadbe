"""Device mesh from the config: axes (data, fsdp, tensor); -1 fills the remaining devices.

Multi-slice TPU jobs (several slices over DCN) put `dcn_data` slices on the outer data axis, so only data-parallel
gradient reductions cross the slow network.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh
from jax.experimental import mesh_utils

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
        device_array = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices=devices)
    elif devices[0].platform in ("tpu", "gpu", "cuda"):
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
