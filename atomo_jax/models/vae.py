"""Flax port of diffusers' `AutoencoderKL` (the SD 1.5 VAE), channels-last.

Parameter names mirror diffusers with list indices joined by "_" (`encoder/down_blocks_0/resnets_1/conv1/kernel`,
`decoder/mid_block/attentions_0/to_q/kernel`, `quant_conv`), so `atomo_jax.convert.vae` is a rename + transpose.
Usage: `mean, logvar = model.apply(params, x, method="encode")`, `x = model.apply(params, z, method="decode")`;
`z = mean * config.scaling_factor` is what the diffusion model sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atomo_jax.models import layers
from atomo_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from atomo_jax.parallel import axes as ax

_EPS = 1e-6  # every norm of the SD VAE
_PAD1 = ((1, 1), (1, 1))


@dataclass(frozen=True)
class VAEConfig:
    """Defaults are the SD 1.5 VAE (`stable-diffusion-v1-5/vae/config.json`)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels with a GroupNorm in front and a residual (the VAE mid block)."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        t = layers.group_norm(self.groups, _EPS, dtype=self.dtype, name="group_norm")(x).reshape(n, h * w, c)

        def project(name: str) -> jax.Array:
            return layers.dense(c, axes=(ax.EMBED, ax.HEADS), dtype=self.dtype, name=name)(t)[:, :, None, :]

        out = layers.attention(project("to_q"), project("to_k"), project("to_v"))
        out = layers.dense(c, axes=(ax.HEADS, ax.EMBED), dtype=self.dtype, name="to_out_0")(out.reshape(n, h * w, c))
        return x + out.reshape(n, h, w, c)


class VAEMidBlock(nn.Module):
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, _EPS, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, _EPS, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, dtype=self.dtype, padding=0, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """(N, H, W, in_channels) -> (N, H/f, W/f, 2 * latent_channels): mean and log-variance, before quant_conv."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, groups = self.config, self.config.norm_num_groups
        x = layers.conv(cfg.block_out_channels[0], (3, 3), padding=_PAD1, dtype=self.dtype, name="conv_in")(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock(channels, cfg.layers_per_block, groups, add_downsample=i < last, dtype=self.dtype,
                                 name=f"down_blocks_{i}")(x)
        x = VAEMidBlock(groups, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        x = layers.group_norm(groups, _EPS, dtype=self.dtype, name="conv_norm_out", silu=True)(x)
        return layers.conv(2 * cfg.latent_channels, (3, 3), padding=_PAD1, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """(N, h, w, latent_channels) -> (N, h*f, w*f, out_channels), after post_quant_conv."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, groups = self.config, self.config.norm_num_groups
        channels = tuple(reversed(cfg.block_out_channels))
        x = layers.conv(channels[0], (3, 3), padding=_PAD1, dtype=self.dtype, name="conv_in")(z)
        x = VAEMidBlock(groups, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        for i, c in enumerate(channels):
            x = UpDecoderBlock(c, cfg.layers_per_block + 1, groups, add_upsample=i < len(channels) - 1,
                               dtype=self.dtype, name=f"up_blocks_{i}")(x)
        x = layers.group_norm(groups, _EPS, dtype=self.dtype, name="conv_norm_out", silu=True)(x)
        return layers.conv(cfg.out_channels, (3, 3), padding=_PAD1, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """SD VAE. Inputs may carry extra leading axes (e.g. (B, F, H, W, C)): they are folded into the batch, so every
    image is encoded on its own."""

    config: VAEConfig = VAEConfig()
    dtype: Any = jnp.float32

    def setup(self) -> None:
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config, dtype=self.dtype)
        self.decoder = Decoder(self.config, dtype=self.dtype)
        self.quant_conv = layers.conv(2 * latent, (1, 1), padding="VALID", dtype=self.dtype)
        self.post_quant_conv = layers.conv(latent, (1, 1), padding="VALID", dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean (used to initialise every parameter)."""
        mean, _ = self.encode(x)
        return self.decode(mean)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (..., H, W, in_channels) in [-1, 1] -> (mean, logvar), each (..., H/f, W/f, latent_channels), unscaled.

        logvar is clamped to [-30, 20] as diffusers' `DiagonalGaussianDistribution` does."""
        f = self.config.downsample_factor
        if x.ndim < 4 or x.shape[-1] != self.config.in_channels or x.shape[-3] % f or x.shape[-2] % f:
            raise ValueError(f"AutoencoderKL.encode expects (..., H, W, {self.config.in_channels}) with H and W "
                             f"divisible by {f}, got shape {x.shape}")
        lead = x.shape[:-3]
        moments = self.quant_conv(self.encoder(x.reshape((-1,) + x.shape[-3:]).astype(self.dtype)))
        mean, logvar = jnp.split(moments.reshape(lead + moments.shape[1:]), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """z (..., h, w, latent_channels), unscaled (divide by scaling_factor first) -> (..., h*f, w*f, out)."""
        if z.ndim < 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"AutoencoderKL.decode expects (..., h, w, {self.config.latent_channels}), "
                             f"got shape {z.shape}")
        lead = z.shape[:-3]
        x = self.decoder(self.post_quant_conv(z.reshape((-1,) + z.shape[-3:]).astype(self.dtype)))
        return x.reshape(lead + x.shape[1:])


def sample_latent(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior (unscaled)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
