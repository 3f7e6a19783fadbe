"""Temporal layers added to the spatial UNet: a 1-D temporal convolution after every resnet (ModelScope/UNet3D
layout) and an AnimateDiff motion module (temporal self-attention) after every spatial layer. Both start as the
identity: their last projection is zero-initialised.

Inputs are (B, F, H, W, C), channels-last; the temporal convolution is a matmul on that layout (layers.FrameConv).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atomo_jax.models import layers
from atomo_jax.models.attention import BasicTransformerBlock
from atomo_jax.parallel import axes as ax


class TemporalConvLayer(nn.Module):
    """Four (GN -> SiLU -> Conv3d(3,1,1)) stages with a residual; GroupNorm statistics span all frames."""

    channels: int
    groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for i in range(1, 5):
            h = layers.group_norm(self.groups, 1e-5, dtype=self.dtype, name=f"conv{i}_norm", silu=True)(h)
            h = layers.FrameConv(self.channels, zero_init=(i == 4), dtype=self.dtype, name=f"conv{i}_conv")(h)
        return x + h


class MotionModule(nn.Module):
    """AnimateDiff temporal transformer: attention along frames at every spatial position."""

    channels: int
    heads: int = 8
    max_seq_length: int = 32
    num_layers: int = 1
    groups: int = 32
    implementation: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, hgt, wid, c = x.shape
        h = layers.group_norm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
        h = nn.with_logical_constraint(h.transpose(0, 2, 3, 1, 4).reshape(b * hgt * wid, f, c), ax.FRAME_TOKENS)
        h = layers.dense(c, dtype=self.dtype, name="proj_in")(h)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(c, self.heads, c // self.heads, cross_attention=False,
                                      positions=self.max_seq_length, implementation=self.implementation,
                                      dtype=self.dtype, name=f"transformer_blocks_{i}")(h)
        h = layers.dense(c, axes=(ax.MLP, ax.EMBED), zero_init=True, dtype=self.dtype, name="proj_out")(h)
        return x + nn.with_logical_constraint(h.reshape(b, hgt, wid, f, c).transpose(0, 3, 1, 2, 4), ax.VIDEO)
