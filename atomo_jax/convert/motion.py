"""AnimateDiff motion modules -> the `motion_modules` parameters of our UNet.

Two layouts are read:
- diffusers `MotionAdapter` (folder or state dict): `down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q...`,
  with one fixed position table per transformer block (`...transformer_blocks.0.pos_embed.pe`);
- the original AnimateDiff checkpoint (`mm_sd_v15_v2.ckpt`-style): `...motion_modules.0.temporal_transformer.
  transformer_blocks.0.attention_blocks.{0,1}...`, `norms.{0,1}`, `ff_norm`, one `pos_encoder.pe` per attention.
  The renames are those of diffusers' `convert_animatediff_checkpoint_to_diffusers`.

Position tables are buffers, not parameters: our model computes the sinusoidal table itself. Every table found in the
checkpoint is compared with ours and a mismatch is an error (learned or otherwise different tables are not supported),
so a checkpoint whose positions we cannot reproduce is never loaded half-way.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from atomo_jax.convert import torch_io
from atomo_jax.models.embeddings import sinusoidal_positions
from atomo_jax.models.unet import SpatioTemporalUNet, UNetConfig

FORMATS = ("diffusers MotionAdapter (folder, .safetensors or .bin; keys 'down_blocks.0.motion_modules.0."
           "transformer_blocks.0.attn1.to_q.weight', ...)",
           "original AnimateDiff checkpoint (mm_sd_v15_v2-style .ckpt/.safetensors; keys '...motion_modules.0."
           "temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight', ...)")

# original AnimateDiff name -> diffusers name (diffusers' convert_animatediff_checkpoint_to_diffusers)
_ORIGINAL_RENAMES = ((".temporal_transformer.", "."), (".attention_blocks.0.", ".attn1."),
                     (".attention_blocks.1.", ".attn2."), (".norms.0.", ".norm1."), (".norms.1.", ".norm2."),
                     (".ff_norm.", ".norm3."), (".pos_encoder.", ".pos_embed."))
# Fixed tables agree with ours up to bf16 rounding of values in [-1, 1]; any learned table differs by far more.
_POSITION_ATOL = 4e-3


@functools.lru_cache(maxsize=4)
def unet_shapes(config: UNetConfig) -> dict[str, Any]:
    """Parameter shapes of the UNet (`jax.eval_shape`, no memory), without the "params" level."""
    levels = len(config.block_out_channels) - 1
    side = 2 ** levels
    sample = jnp.zeros((1, 2, side, side, config.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    image = jnp.zeros((1, config.image_embed_dim), jnp.float32) if config.ip_adapter else None
    shapes = jax.eval_shape(lambda: SpatioTemporalUNet(config).init(jax.random.PRNGKey(0), sample,
                                                                     jnp.zeros((1,)), context, image))
    return flax.core.unfreeze(flax.linen.meta.unbox(shapes))["params"]


def subtree(shapes: Mapping[str, Any], keep) -> dict[str, Any]:
    """The part of a nested params tree whose "/"-joined paths satisfy `keep(path)`."""
    flat = flax.traverse_util.flatten_dict(dict(shapes))
    return flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep("/".join(k))})


def is_motion_param(path: str) -> bool:
    return any(part.startswith("motion_modules_") for part in path.split("/"))


def detect_format(state_dict: Mapping[str, Any], source: str = "motion checkpoint") -> str:
    """"original" or "diffusers"; anything else is an error naming the supported formats."""
    if any(".temporal_transformer." in k for k in state_dict):
        return "original"
    if any(".motion_modules." in k for k in state_dict):
        return "diffusers"
    sample = sorted(state_dict)[:5]
    raise ValueError(f"{source}: not an AnimateDiff motion-module checkpoint (no '.motion_modules.' keys; first keys: "
                     f"{sample}); supported formats: " + "; ".join(FORMATS))


def original_to_diffusers_key(key: str) -> str:
    for old, new in _ORIGINAL_RENAMES:
        key = key.replace(old, new)
    return key


def check_positions(key: str, table: np.ndarray, max_seq_length: int, source: str) -> None:
    """Raises unless `table` (1, L, C) or (L, C) is our sinusoidal table with L == max_seq_length."""
    table = np.asarray(table, np.float32)
    table = table[0] if table.ndim == 3 and table.shape[0] == 1 else table
    if table.ndim != 2:
        raise ValueError(f"{source}: position table {key} has shape {table.shape}; expected (1, length, channels)")
    length, dim = table.shape
    error = float(np.max(np.abs(table - sinusoidal_positions(length, dim))))
    if error > _POSITION_ATOL:
        raise ValueError(f"{source}: position table {key} is not the fixed sinusoidal AnimateDiff table (max abs "
                         f"difference {error:.3g}); learned or other position encodings are not supported")
    if length != max_seq_length:
        raise ValueError(f"{source}: position table {key} has {length} positions but the UNet is configured for "
                         f"{max_seq_length}; set unet.motion_max_seq_length={length}")


def to_diffusers_layout(state_dict: Mapping[str, np.ndarray], source: str = "motion checkpoint"
                        ) -> dict[str, np.ndarray]:
    """Either layout -> the diffusers MotionAdapter layout (position tables kept, for checking)."""
    if detect_format(state_dict, source) == "original":
        return {original_to_diffusers_key(k): v for k, v in state_dict.items()}
    return dict(state_dict)


def motion_modules_params(state_dict: Mapping[str, np.ndarray], config: UNetConfig, *,
                          source: str = "motion checkpoint") -> dict[str, Any]:
    """Motion-module weights (either layout) -> the `motion_modules_*` subtrees of our UNet params, all or nothing.

    Raises `WeightMappingError` listing missing/unexpected/mis-shaped keys, ValueError for position tables we do
    not compute identically or for a state dict that is not a motion checkpoint.
    """
    if not config.use_motion_modules:
        raise ValueError("the UNet config has use_motion_modules=False: there is nothing to load motion modules into")
    state_dict = to_diffusers_layout(state_dict, source)
    weights = {}
    for key, value in state_dict.items():
        if key.endswith(".pos_embed.pe"):
            check_positions(key, value, config.motion_max_seq_length, source)
        else:
            weights[key] = value
    shapes = subtree(unet_shapes(config), is_motion_param)
    return torch_io.convert_state_dict(weights, shapes, source=source)


def load_motion_modules(path: str, config: UNetConfig) -> dict[str, Any]:
    """Reads a MotionAdapter folder or an original AnimateDiff file and converts it (see `motion_modules_params`)."""
    return motion_modules_params(torch_io.load_state_dict(path), config, source=str(path))
