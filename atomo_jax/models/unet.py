"""The spatio-temporal UNet: SD 1.5 spatial layers + temporal conv + AnimateDiff motion modules + IP-Adapter.

Parameter names mirror diffusers with list indices joined by "_" (`down_blocks_0/resnets_1/conv1`), so converters
are mechanical. Each layer of a block runs: resnet -> temporal conv -> spatial transformer -> motion module, the
skip connection is taken after all of them (the UNet3D/AnimateDiff order). `temporal=False` skips every temporal
layer, leaving exactly the SD 1.5 UNet (plus the 9-channel input conv).

Activations are channels-last, (B*F, H, W, C) through spatial layers and (B, F, H, W, C) through temporal ones; the
switch between the two is a reshape, never a transpose.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from atomo_jax.models import layers
from atomo_jax.models.attention import Transformer2D
from atomo_jax.models.embeddings import timestep_embedding
from atomo_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from atomo_jax.models.temporal import MotionModule, TemporalConvLayer

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Defaults are SD 1.5 with AnimateDiff v2 motion modules and IP-Adapter SD 1.5 (ViT-H/14 image embeddings)."""

    in_channels: int = 9
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    num_attention_heads: int = 8
    transformer_layers: int = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_temporal_conv: bool = True
    use_motion_modules: bool = True
    motion_num_heads: int = 8
    motion_max_seq_length: int = 32
    motion_mid_block: bool = True
    motion_layers: int = 1
    ip_adapter: bool = True
    ip_tokens: int = 4
    image_embed_dim: int = 1024
    dtype: str = "float32"
    attention_impl: str | None = None
    remat: str = "none"

    def __post_init__(self):
        if len(self.down_attention) != len(self.block_out_channels):
            raise ValueError(f"unet.down_attention has {len(self.down_attention)} entries but block_out_channels "
                             f"has {len(self.block_out_channels)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unet.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % self.num_attention_heads or c % self.motion_num_heads:
                raise ValueError(f"unet.block_out_channels entry {c} must divide by norm_num_groups "
                                 f"({self.norm_num_groups}) and the head counts")

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown unet config keys {unknown}; known keys: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)


def _remat(cls: type[nn.Module], policy: str) -> type[nn.Module]:
    return cls if policy == "none" else nn.remat(cls, policy=REMAT_POLICIES[policy])


class ImageProjection(nn.Module):
    """IP-Adapter SD 1.5 image projection: CLIP image embedding -> `tokens` context tokens."""

    tokens: int
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        h = layers.dense(self.tokens * self.dim, dtype=self.dtype, name="image_embeds")(image_embeds)
        h = h.reshape(image_embeds.shape[0], self.tokens, self.dim)
        return layers.layer_norm(1e-5, dtype=self.dtype, name="norm")(h)


class _Layers(nn.Module):
    """Shared plumbing of the down, mid and up blocks: one (resnet, temporal conv, attention, motion) layer."""

    config: UNetConfig

    def layer(self, i: int, channels: int, attention: bool, x: jax.Array, temb: jax.Array, context: jax.Array,
              ip_tokens: jax.Array | None, ip_scale: jax.Array, temporal: bool, *, has_motion: bool = True
              ) -> jax.Array:
        cfg, dt = self.config, self.config.compute_dtype
        x = _remat(ResnetBlock2D, cfg.remat)(channels, cfg.norm_num_groups, cfg.norm_eps, dt, name=f"resnets_{i}")(
            x, temb)
        batch = temb.shape[0]
        if cfg.use_temporal_conv and temporal:
            conv = _remat(TemporalConvLayer, cfg.remat)(channels, cfg.norm_num_groups, dt, name=f"temp_convs_{i}")
            x = layers.fold_frames(conv(layers.unfold_frames(x, batch)))
        elif cfg.use_temporal_conv and self.is_initializing():
            raise ValueError("initialise the UNet with temporal=True so the temporal parameters exist")
        if attention:
            x = _remat(Transformer2D, cfg.remat)(channels, cfg.num_attention_heads, cfg.transformer_layers,
                                                 cfg.norm_num_groups, cfg.ip_adapter, cfg.attention_impl, dt,
                                                 name=f"attentions_{i}")(x, context, ip_tokens, ip_scale)
        if cfg.use_motion_modules and has_motion and temporal:
            motion = _remat(MotionModule, cfg.remat)(channels, cfg.motion_num_heads, cfg.motion_max_seq_length,
                                                     cfg.motion_layers, cfg.norm_num_groups, cfg.attention_impl, dt,
                                                     name=f"motion_modules_{i}")
            x = layers.fold_frames(motion(layers.unfold_frames(x, batch)))
        return x


class DownBlock(_Layers):
    out_channels: int = 0
    attention: bool = True
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context, ip_tokens, ip_scale, temporal: bool):
        skips = []
        for i in range(self.config.layers_per_block):
            x = self.layer(i, self.out_channels, self.attention, x, temb, context, ip_tokens, ip_scale, temporal)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.config.compute_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(_Layers):
    channels: int = 0

    @nn.compact
    def __call__(self, x, temb, context, ip_tokens, ip_scale, temporal: bool):
        cfg = self.config
        x = self.layer(0, self.channels, False, x, temb, context, ip_tokens, ip_scale, temporal, has_motion=False)
        # attention + motion module (AnimateDiff v2+; v1 has none) after the first resnet, then the second resnet
        # (+ its temporal conv)
        dt = cfg.compute_dtype
        x = _remat(Transformer2D, cfg.remat)(self.channels, cfg.num_attention_heads, cfg.transformer_layers,
                                             cfg.norm_num_groups, cfg.ip_adapter, cfg.attention_impl, dt,
                                             name="attentions_0")(x, context, ip_tokens, ip_scale)
        if cfg.use_motion_modules and cfg.motion_mid_block and temporal:
            motion = _remat(MotionModule, cfg.remat)(self.channels, cfg.motion_num_heads, cfg.motion_max_seq_length,
                                                     cfg.motion_layers, cfg.norm_num_groups, cfg.attention_impl, dt,
                                                     name="motion_modules_0")
            x = layers.fold_frames(motion(layers.unfold_frames(x, temb.shape[0])))
        return self.layer(1, self.channels, False, x, temb, context, ip_tokens, ip_scale, temporal, has_motion=False)


class UpBlock(_Layers):
    out_channels: int = 0
    attention: bool = True
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb, context, ip_tokens, ip_scale, temporal: bool):
        for i, skip in enumerate(skips):
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self.layer(i, self.out_channels, self.attention, x, temb, context, ip_tokens, ip_scale, temporal)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.config.compute_dtype, name="upsamplers_0")(x)
        return x


class SpatioTemporalUNet(nn.Module):
    config: UNetConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 image_embeds: jax.Array | None = None, *, temporal: bool = True,
                 ip_scale: jax.Array | float = 1.0) -> jax.Array:
        """sample (B, F, h, w, in_channels), timesteps (B,) or scalar, encoder_hidden_states (B, L, D),
        image_embeds (B, image_embed_dim) -> (B, F, h, w, out_channels) float32."""
        cfg, dt = self.config, self.config.compute_dtype
        if sample.ndim != 5 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet sample must be (B, F, h, w, {cfg.in_channels}), got {sample.shape}")
        b, f, h, w, _ = sample.shape
        levels = len(cfg.block_out_channels) - 1
        if h % (2 ** levels) or w % (2 ** levels):
            raise ValueError(f"latent size {h}x{w} must be divisible by {2 ** levels}")
        c0 = cfg.block_out_channels[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(timesteps, c0).astype(dt)
        temb = layers.dense(4 * c0, dtype=dt, name="time_embedding_linear_1")(temb)
        temb = layers.dense(4 * c0, dtype=dt, name="time_embedding_linear_2")(nn.silu(temb))
        context = encoder_hidden_states.astype(dt)
        ip_tokens = None
        if cfg.ip_adapter:
            if image_embeds is None:
                raise ValueError("the UNet has IP-Adapter layers: pass image_embeds (zeros and ip_scale=0 to disable)")
            ip_tokens = ImageProjection(cfg.ip_tokens, cfg.cross_attention_dim, dt, name="image_proj")(
                image_embeds.astype(dt))
        ip_scale = jnp.asarray(ip_scale, dt)

        x = layers.fold_frames(sample.astype(dt))
        x = layers.conv(c0, (3, 3), padding=((1, 1), (1, 1)), dtype=dt, name="conv_in")(x)
        skips = [x]
        for i, (ch, attn) in enumerate(zip(cfg.block_out_channels, cfg.down_attention)):
            x, s = DownBlock(cfg, ch, attn, i < levels, name=f"down_blocks_{i}")(
                x, temb, context, ip_tokens, ip_scale, temporal)
            skips += s
        x = MidBlock(cfg, cfg.block_out_channels[-1], name="mid_block")(x, temb, context, ip_tokens, ip_scale,
                                                                        temporal)
        n_up = cfg.layers_per_block + 1
        for i, (ch, attn) in enumerate(zip(reversed(cfg.block_out_channels), reversed(cfg.down_attention))):
            block_skips, skips = skips[-n_up:][::-1], skips[:-n_up]
            x = UpBlock(cfg, ch, attn, i < levels, name=f"up_blocks_{i}")(
                x, block_skips, temb, context, ip_tokens, ip_scale, temporal)
        x = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype=dt, name="conv_norm_out", silu=True)(x)
        x = layers.conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dt, name="conv_out")(x)
        return layers.unfold_frames(x, b).astype(jnp.float32)
