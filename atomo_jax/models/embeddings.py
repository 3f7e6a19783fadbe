"""Sinusoidal embeddings: diffusion timesteps (SD's `Timesteps`) and frame positions (AnimateDiff)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """(B,) timesteps -> (B, dim) float32, diffusers' `get_timestep_embedding` (SD 1.5: flip, shift 0)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """(length, dim) table with sin on even and cos on odd channels (AnimateDiff's fixed `pe` buffer)."""
    position = np.arange(length, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * (-math.log(10000.0) / dim))
    pe = np.zeros((length, dim), dtype=np.float32)
    pe[:, 0::2] = np.sin(position * div_term)
    pe[:, 1::2] = np.cos(position * div_term)
    return pe
