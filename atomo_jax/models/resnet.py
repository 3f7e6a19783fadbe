"""The resnet block and down/up samplers of SD 1.5's UNet and VAE (diffusers' `ResnetBlock2D`, `Downsample2D`,
`Upsample2D`), channels-last."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atomo_jax.models import layers


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, (+ time embedding), GN-SiLU-conv, + (1x1-projected) shortcut.

    In the UNet `x` is (B*F, H, W, C) and `temb` (B, T): the time embedding of one video is shared by all its frames.
    The VAE calls it without `temb` (diffusers' `temb_channels=None`), and so has no `time_emb_proj`.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = layers.group_norm(self.groups, self.eps, dtype=self.dtype, name="norm1", silu=True)(x)
        h = layers.conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv1")(h)
        if temb is not None:
            t = layers.dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            frames = h.shape[0] // t.shape[0]
            h = (h.reshape((t.shape[0], frames) + h.shape[1:])
                 + t[:, None, None, None, :].astype(h.dtype)).reshape(h.shape)
        h = layers.group_norm(self.groups, self.eps, dtype=self.dtype, name="norm2", silu=True)(h)
        h = layers.conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, (1, 1), padding="VALID", dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv. `padding=1` (the UNet) is torch's Conv2d(padding=1), symmetric, not "SAME";
    `padding=0` (the VAE) pads one pixel on the right and bottom only, then a VALID conv, as diffusers does."""

    channels: int
    dtype: Any = jnp.float32
    padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 1:
            pad = ((1, 1), (1, 1))
        elif self.padding == 0:
            x, pad = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), "VALID"
        else:
            raise ValueError(f"Downsample2D padding must be 0 or 1, got {self.padding}")
        return layers.conv(self.channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return layers.conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv")(x)
