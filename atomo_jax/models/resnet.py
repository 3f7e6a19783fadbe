"""SD 1.5 resnet block and the down/up samplers, channels-last."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atomo_jax.models import layers


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv, + (1x1-projected) shortcut.

    `x` is (B*F, H, W, C) and `temb` (B, T): the time embedding of one video is shared by all its frames.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = nn.silu(layers.group_norm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
        h = layers.conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv1")(h)
        t = layers.dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        frames = h.shape[0] // t.shape[0]
        h = (h.reshape((t.shape[0], frames) + h.shape[1:]) + t[:, None, None, None, :].astype(h.dtype)).reshape(h.shape)
        h = nn.silu(layers.group_norm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
        h = layers.conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, (1, 1), padding="VALID", dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # torch's Conv2d(stride=2, padding=1): explicit symmetric padding, not "SAME".
        return layers.conv(self.channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                           name="conv")(x)


class Upsample2D(nn.Module):
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return layers.conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv")(x)
