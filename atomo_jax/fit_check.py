"""The compile side of the fit check: the trainer's jitted step for a list of devices (TPU topologies from this host,
or fake CPU devices), with abstract inputs only, lowered (`lower_train_step`) or compiled (`compile_train_step`).

jax starts when this module is imported, so `atomo_jax.aot` imports it only after setting the environment jax reads
then (JAX_PLATFORMS, the CPU device count, libtpu's lock).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import math
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import topologies

from atomo_jax.models.atomo import build_model
from atomo_jax.parallel import axes
from atomo_jax.parallel.mesh import make_mesh
from atomo_jax.parallel.sharding import replicated
from atomo_jax.training.metrics import compiled_cost
from atomo_jax.training.packing import packer_from_config
from atomo_jax.training.setup import abstract_batch, abstract_train_state, state_shardings, validate
from atomo_jax.training.state import model_params
from atomo_jax.training.train_step import batch_shardings, jit_train_step
from data_pipelines.buckets import Bucket, parse_buckets


def target_devices(target: Any) -> list:
    """The devices to compile for: `target`'s fake CPU devices, or its TPU topology's abstract devices."""
    if target.generation == "cpu":
        devices = jax.devices("cpu")
        if len(devices) != target.chips * target.num_slices:
            raise RuntimeError(f"--topology={target.name}: {len(devices)} CPU devices exist, wanted "
                               f"{target.chips * target.num_slices} (XLA_FLAGS was set after jax started?)")
        return devices
    try:
        import libtpu  # noqa: F401  optional: the [tpu] extra
    except ImportError:
        raise RuntimeError(f"--topology={target.name} needs libtpu to compile for TPU on this host: "
                           f"pip install '{libtpu_requirement()}'") from None
    desc = topologies.get_topology_desc(platform="tpu", topology_name=target.topology_name,
                                        chips_per_host_bounds=target.chips_per_host_bounds,
                                        num_slices=target.num_slices)
    return list(desc.devices)


def libtpu_requirement() -> str:
    """The libtpu pin of jax[tpu] for the installed jax, e.g. 'libtpu==0.0.42.*'."""
    for req in md.requires("jax") or []:
        if req.startswith("libtpu") and "tpu" in req.split(";")[-1]:
            return req.split(";")[0].strip()
    return "libtpu"


@dataclasses.dataclass
class Report:
    layout: dict
    remat: str
    devices: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float  # per device, one step
    bytes_accessed: float  # per device, one step (XLA's cost analysis: every operand read and result written)
    capacity_bytes: float | None
    compile_s: float

    @property
    def peak_bytes(self) -> int:
        """Live at once: inputs, temporaries, outputs not written in place over donated inputs, the program."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.peak_bytes <= self.capacity_bytes


def per_bucket(config: ml_collections.ConfigDict) -> list[tuple[Bucket, ml_collections.ConfigDict]]:
    """(bucket, the config with only that bucket) for each of `config.data.buckets` (the one square shape without
    buckets): what the fit check, sweep and plan compile one at a time, as the trainer compiles one step each."""
    d = config.data
    if not d.buckets:
        return [(parse_buckets((), d.num_frames, d.resolution)[0], config)]
    out = []
    for bucket in parse_buckets(d.buckets, d.num_frames, d.resolution):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.data.buckets = ((bucket.frames, bucket.height, bucket.width),)
        out.append((bucket, c))
    return out


class CompilerOutOfMemory(Exception):
    """The target's compiler itself refused the program: its temporaries alone exceed the chip's memory."""

    def __init__(self, needed: str, available: str, message: str):
        super().__init__(message)
        self.needed, self.available = needed, available


_OOM = re.compile(r"temporaries \(([\d.]+\s*[KMGT]?i?B?)\) exceeds available HBM \(([\d.]+\s*[KMGT]?i?B?)\)")


def placed_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (the most loaded device's share)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def lower_train_step(config: Any, devices: list) -> tuple[Any, Any, Any]:
    """The trainer's jitted step traced and lowered for `devices` with abstract inputs only (shapes, shardings and
    the partitioning checks, no XLA compile): (lowered, mesh, abstract sharded inputs)."""
    mesh = make_mesh(config.mesh, devices=devices)
    validate(config, mesh)
    rules = axes.rules_from_config(config.mesh.rules)
    model = build_model(config.model)
    # Shapes and shardings are worked out on the host (abstract TPU devices cannot run eager ops).
    state_sh = state_shardings(config, model, mesh, rules)
    abstract = abstract_train_state(config, model)
    params = model_params(abstract, ema=False)
    batch = abstract_batch(config, model, params)
    batch_sh = batch_shardings(batch, mesh, rules)
    packer, state_sh = packer_from_config(config, abstract, state_sh, replicated(mesh))  # as the trainer runs it
    if packer:
        abstract = jax.eval_shape(packer.pack_state, abstract)
    with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    state_in = jax.tree.map(with_sh, abstract, state_sh)
    batch_in = {k: with_sh(v, batch_sh[k]) for k, v in batch.items()}
    step = jit_train_step(config, model, mesh, state_sh, batch_sh, packer=packer)
    with jax.set_mesh(mesh):
        return step.lower(state_in, batch_in), mesh, (state_in, batch_in)


def compile_train_step(config: Any, devices: list, capacity_bytes: float | None = None) -> Report:
    """Lowers and compiles the trainer's jitted step for `devices` with abstract inputs only. Raises
    `CompilerOutOfMemory` when the TPU compiler refuses the program for the chip's memory."""

    t0 = time.perf_counter()
    lowered, mesh, _ = lower_train_step(config, devices)
    with jax.set_mesh(mesh):
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # XLA:TPU stops at "Ran out of memory in memory space hbm"
            m = _OOM.search(str(e))
            if "RESOURCE_EXHAUSTED" not in str(e) or not m:
                raise
            raise CompilerOutOfMemory(m.group(1), m.group(2), str(e).splitlines()[0]) from None
    mem = compiled.memory_analysis()
    return Report(layout=dict(mesh.shape), remat=str(config.model.unet.remat), devices=len(devices),
                  argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                  alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                  code_bytes=int(mem.generated_code_size_in_bytes), flops=compiled_cost(compiled) or 0.0,
                  bytes_accessed=compiled_cost(compiled, "bytes accessed") or 0.0,
                  capacity_bytes=capacity_bytes, compile_s=time.perf_counter() - t0)
