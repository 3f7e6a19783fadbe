"""LoRA (low-rank adaptation) of dense layers: factors in the params tree, applied on the fly or merged.

A factor pair sits beside the kernel it adapts, `.../attn1/to_q/{kernel, lora_a, lora_b}`, with lora_a (in, r) and
lora_b (r, out): the adapted layer computes x @ (kernel + scale * lora_a @ lora_b), scale = alpha / r. In torch terms
(PEFT) that is W + scale * B A with lora_A.weight = lora_a.T and lora_B.weight = lora_b.T. Kept in the tree, the
factors are ordinary leaves: the trainable/frozen split, optimizer state, EMA, sharding rules, small-leaf packing and
checkpoints take them with no special case.

Two ways to run params that hold factors, which agree to float32 rounding:
- `applied(...)`: a Flax method interceptor adds scale * dropout(x) @ lora_a @ lora_b to each adapted Dense output
  (training: the kernel's full-size weight gradient is never formed; dropout on the LoRA input, as PEFT does);
- `merged(params, scale)`: the factors folded into their kernels and removed (sampling, evaluation, export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from atomo_jax.models.layers import torch_default_init
from atomo_jax.parallel import axes as ax

FACTORS = ("lora_a", "lora_b")
FACTOR_PATTERN = r"/lora_[ab]$"  # the trainable-set regex that selects every factor
_DROPOUT_SALT = 0x4C6F5241  # separates the dropout draws from the example's other draws (diffusion_loss's)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int  # 0: no LoRA
    alpha: float  # scale = alpha / rank
    dropout: float  # dropout probability on the LoRA branch's input (training only)
    targets: tuple[str, ...]  # regexes (re.search) over '/'-joined kernel paths

    @classmethod
    def from_config(cls, lora: Any) -> "LoraSpec":
        rank = int(lora.rank)
        return cls(rank=rank, alpha=float(lora.alpha) or float(rank), dropout=float(lora.dropout),
                   targets=tuple(lora.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


def _flat(tree: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def _unflat(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple((leaf.value if isinstance(leaf, nn.Partitioned) else leaf).shape)


def target_paths(params: Any, spec: LoraSpec) -> list[str]:
    """Kernel paths the spec adapts, sorted. A target must be a dense (2-D) kernel; anything else is an error naming
    it, and so is a spec that matches nothing."""
    regexes = [re.compile(p) for p in spec.targets]
    flat = _flat(params)
    paths = sorted(p for p in flat if p.endswith("/kernel") and any(r.search(p) for r in regexes))
    if not paths:
        raise ValueError(f"config.train.lora.targets={spec.targets} matches no kernel; kernel paths look like "
                         f"{sorted(p for p in flat if p.endswith('/kernel'))[:3]}")
    bad = [f"{p} {_shape(flat[p])}" for p in paths if len(_shape(flat[p])) != 2]
    if bad:
        raise ValueError(f"config.train.lora.targets matches kernels that are not dense (in, out) matrices: "
                         f"{bad[:5]}; LoRA adapts dense layers only")
    return paths


def add_factors(params: Any, spec: LoraSpec, rng: jax.Array | None) -> dict:
    """`params` (a UNet params tree; values, ShapeDtypeStructs or `nn.Partitioned` boxes of either) with a factor
    pair beside every target kernel: lora_a ~ U(+-1/sqrt(in)) (PEFT's kaiming-uniform init) and lora_b = 0, so the
    adapted model starts as the base. `rng=None`: ShapeDtypeStructs only. Boxes get the kernel's logical axis names
    on their outer sides and `LORA_RANK` inside."""
    if spec.rank <= 0:
        return params
    flat = _flat(params)
    for i, path in enumerate(target_paths(params, spec)):
        kernel = flat[path]
        d_in, d_out = _shape(kernel)
        shapes = ((d_in, spec.rank), (spec.rank, d_out))
        if rng is None:
            a, b = (jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
        else:
            a = torch_default_init(jax.random.fold_in(rng, i), shapes[0], jnp.float32)
            b = jnp.zeros(shapes[1], jnp.float32)
        if isinstance(kernel, nn.Partitioned):
            outer_in, outer_out = kernel.names
            a = dataclasses.replace(kernel, value=a, names=(outer_in, ax.LORA_RANK))  # the kernel's box type
            b = dataclasses.replace(kernel, value=b, names=(ax.LORA_RANK, outer_out))
        module = path[: -len("kernel")]
        flat[module + "lora_a"], flat[module + "lora_b"] = a, b
    return _unflat(flat)


def has_factors(params: Any) -> bool:
    return any(p.endswith(("/lora_a", "/lora_b")) for p in _flat(params))


def factors(params: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{kernel path: (lora_a, lora_b)} of every adapted layer."""
    flat = _flat(params)
    return {p[: -len("lora_a")] + "kernel": (flat[p], flat[p[: -len("lora_a")] + "lora_b"])
            for p in sorted(flat) if p.endswith("/lora_a")}


def without_factors(params: Any) -> dict:
    return _unflat({k: v for k, v in _flat(params).items() if not k.endswith(("/lora_a", "/lora_b"))})


def merged(params: Any, scale: float) -> dict:
    """The factors folded into their kernels (kernel + scale * lora_a @ lora_b, float32 at full precision) and
    removed: a params tree the model runs without `applied`. Params without factors come back unchanged."""
    pairs = factors(params)
    if not pairs:
        return params
    flat = _flat(without_factors(params))
    for path, (a, b) in pairs.items():
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        flat[path] = (flat[path].astype(jnp.float32) + scale * delta).astype(flat[path].dtype)
    return _unflat(flat)


def _dropout(x: jax.Array, keys: jax.Array, rate: float, module_path: Sequence[str]) -> jax.Array:
    """Inverted dropout whose mask comes from each example's own key (x's leading axis is examples-major: B, B*F
    or B*H*W rows), so it does not depend on how the batch is split over devices or micro-batches."""
    salt = zlib.crc32("/".join(module_path).encode())
    per_example = x.reshape((keys.shape[0], -1) + x.shape[1:])

    def one(key, rows):
        key = jax.random.fold_in(jax.random.fold_in(key, _DROPOUT_SALT), salt)
        keep = jax.random.bernoulli(key, 1.0 - rate, rows.shape)
        return jnp.where(keep, rows / (1.0 - rate), 0).astype(rows.dtype)

    return jax.vmap(one)(keys, per_example).reshape(x.shape)


@contextlib.contextmanager
def applied(spec: LoraSpec, keys: jax.Array | None = None) -> Iterator[None]:
    """Within this context every `nn.Dense` whose params hold lora_a/lora_b adds spec.scale * (x @ lora_a) @ lora_b
    to its output, in the layer's compute dtype. `keys` (one PRNG key per example) turn on spec.dropout: training
    passes them, inference does not. A spec of rank 0 changes nothing."""
    if spec.rank <= 0:
        yield
        return
    dropout = spec.dropout if keys is not None else 0.0

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
                or not module.has_variable("params", "lora_a")):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        if dropout > 0:
            x = _dropout(x, keys, dropout, module.path)
        dtype = module.dtype or jnp.float32
        a = module.get_variable("params", "lora_a").astype(dtype)
        b = module.get_variable("params", "lora_b").astype(dtype)
        delta = jnp.dot(jnp.dot(x.astype(dtype), a), b)
        return y + (jnp.asarray(spec.scale, dtype) * delta).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield
