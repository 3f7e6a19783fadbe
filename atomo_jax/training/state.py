"""Train state and the trainable/frozen split of the parameters.

Only trainable parameters get gradients, optimizer state and an EMA copy; everything else (frozen UNet layers, VAE,
image and text encoders) lives in `frozen` and is never differentiated.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util

from atomo_jax.models import lora


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any  # nested dict: the trainable subset of the UNet params
    frozen: Any  # {"unet": rest of the UNet, "vae": ..., "image_encoder": ..., "text_encoder": ...}
    opt_state: Any
    ema: Any  # EMA of `trainable` (same structure)
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    skipped_steps: jax.Array  # updates skipped because the loss or gradients were not finite


def _flat(tree: Any) -> dict:
    return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def _unflat(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def split_trainable(unet_params: Any, patterns: Sequence[str]) -> tuple[dict, dict]:
    """Partitions the UNet params by regexes matched (re.search) against '/'-joined paths."""
    regexes = [re.compile(p) for p in patterns]
    flat = _flat(unet_params)
    trainable = {k: v for k, v in flat.items() if any(r.search(k) for r in regexes)}
    if not trainable:
        raise ValueError(f"config.train.trainable={tuple(patterns)} matches no UNet parameter; paths look like "
                         f"{sorted(flat)[:3]}")
    return _unflat(trainable), _unflat({k: v for k, v in flat.items() if k not in trainable})


def merge(a: Any, b: Any) -> dict:
    """Union of two disjoint nested dicts (the inverse of `split_trainable`)."""
    return _unflat({**_flat(a), **_flat(b)})


def model_params(state: TrainState, *, ema: bool = True, lora_scale: float | None = None) -> dict:
    """The params the model runs: every part, the UNet's trainable leaves (or their EMA) merged back in. With
    `lora_scale` (`LoraSpec.scale`) LoRA factors are folded into their kernels; without, they stay as leaves (for
    `lora.applied` or an export of the LoRA alone)."""
    unet = merge(state.ema if ema else state.trainable, state.frozen["unet"])
    if lora_scale is not None and lora.has_factors(unet):
        unet = jax.jit(lora.merged, static_argnums=1)(unet, lora_scale)  # one program, on sharded arrays too
    return {**state.frozen, "unet": unet}


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
