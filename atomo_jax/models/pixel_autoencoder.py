"""A weightless stand-in for the VAE, for the demo and tests.

encode: average-pool by `factor`, then a fixed 3->4 channel map with orthonormal columns; decode: its
pseudo-inverse (the transpose) then nearest-neighbour upsampling. decode(encode(x)) is exact on images that are
constant over every factor x factor block. Same call signature as `AutoencoderKL` so the composite model treats
both alike: `model.apply(params, x, method="encode") -> (mean, logvar)`, `model.apply(params, z, method="decode")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Three columns of the 4x4 Hadamard matrix / 2: orthonormal columns, so the pseudo-inverse is the transpose.
_RGB_TO_LATENT = np.array([[1, 1, 1], [1, -1, 1], [1, 1, -1], [1, -1, -1]], np.float32) / 2.0  # (4, 3)


@dataclass(frozen=True)
class PixelAutoencoderConfig:
    factor: int = 2  # spatial down-sampling factor
    scaling_factor: float = 1.0  # multiply latents by this before diffusion (as for the VAE)
    in_channels: int = 3
    latent_channels: int = 4


class PixelAutoencoder(nn.Module):
    """Channels-last (..., H, W, 3) <-> (..., H/f, W/f, 4); no parameters."""

    config: PixelAutoencoderConfig = PixelAutoencoderConfig()
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if (self.config.in_channels, self.config.latent_channels) != (3, 4):
            raise ValueError("PixelAutoencoder maps exactly 3 image channels to 4 latent channels, got "
                             f"in_channels={self.config.in_channels}, latent_channels={self.config.latent_channels}")
        if self.config.factor < 1:
            raise ValueError(f"PixelAutoencoder factor must be >= 1, got {self.config.factor}")

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        f = self.config.factor
        *lead, h, w, c = x.shape
        if c != 3 or h % f or w % f:
            raise ValueError(f"PixelAutoencoder.encode expects (..., H, W, 3) with H, W divisible by {f}, "
                             f"got shape {x.shape}")
        x = x.astype(self.dtype).reshape(*lead, h // f, f, w // f, f, c).mean(axis=(-4, -2))
        mean = x @ jnp.asarray(_RGB_TO_LATENT.T, self.dtype)
        # A deterministic encoder: log-variance at the VAE's clamp floor (std 3e-7), so sampling the "posterior"
        # returns the mean. (Zeros would mean unit variance: unit noise added to every training latent.)
        return mean, jnp.full_like(mean, -30.0)

    def decode(self, z: jax.Array) -> jax.Array:
        f = self.config.factor
        if z.shape[-1] != 4:
            raise ValueError(f"PixelAutoencoder.decode expects (..., h, w, 4), got shape {z.shape}")
        x = z.astype(self.dtype) @ jnp.asarray(_RGB_TO_LATENT, self.dtype)
        return jnp.repeat(jnp.repeat(x, f, axis=-3), f, axis=-2)
