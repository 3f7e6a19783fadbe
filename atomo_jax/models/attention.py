"""Attention blocks of the SD 1.5 UNet (spatial transformer) with IP-Adapter decoupled cross-attention.

Layouts are (batch, length, channels). Frames of one video share their text and image context: the cross-attention
folds the frames into the query length instead of repeating keys and values per frame (same result, F times less
key/value work).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atomo_jax.models import layers
from atomo_jax.models.embeddings import sinusoidal_positions
from atomo_jax.parallel import axes as ax


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out_0; to_k_ip, to_v_ip)."""

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    ip_adapter: bool = False
    implementation: str | None = None
    dtype: Any = jnp.float32

    def _split(self, t: jax.Array) -> jax.Array:
        return t.reshape(t.shape[:-1] + (self.heads, self.dim_head))

    def _project(self, name: str, t: jax.Array) -> jax.Array:
        inner = self.heads * self.dim_head
        return self._split(layers.dense(inner, axes=(ax.EMBED, ax.HEADS), use_bias=self.qkv_bias, dtype=self.dtype,
                                        name=name)(t))

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, ip_tokens: jax.Array | None = None,
                 ip_scale: jax.Array | float = 1.0) -> jax.Array:
        n, length = x.shape[:2]
        q = self._project("to_q", x)
        source = x if context is None else context.astype(x.dtype)
        k, v = self._project("to_k", source), self._project("to_v", source)
        group = n // source.shape[0]
        if group != 1:  # frames sharing one context: (B*F, T) queries -> (B, F*T)
            q = q.reshape((source.shape[0], group * length) + q.shape[2:])
        out = layers.attention(q, k, v, implementation=self.implementation)
        if self.ip_adapter:
            if ip_tokens is None:
                raise ValueError("this attention layer has IP-Adapter weights but got no image tokens")
            ip_tokens = ip_tokens.astype(x.dtype)
            k_ip, v_ip = self._project("to_k_ip", ip_tokens), self._project("to_v_ip", ip_tokens)
            out = out + jnp.asarray(ip_scale, out.dtype) * layers.attention(q, k_ip, v_ip,
                                                                            implementation=self.implementation)
        out = out.reshape(n, length, self.heads * self.dim_head)
        return layers.dense(self.out_dim, axes=(ax.HEADS, ax.EMBED), dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    inner_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return layers.dense(self.dim, axes=(ax.MLP, ax.EMBED), dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """LN -> self-attn -> LN -> cross-attn (or a second self-attn) -> LN -> GEGLU FF, each residual.

    `positions > 0` adds a fixed sinusoidal table before both attentions (AnimateDiff motion modules).
    """

    dim: int
    heads: int
    dim_head: int
    cross_attention: bool = True
    ip_adapter: bool = False
    positions: int = 0
    implementation: str | None = None
    dtype: Any = jnp.float32

    def _with_positions(self, h: jax.Array) -> jax.Array:
        if not self.positions:
            return h
        if h.shape[1] > self.positions:
            raise ValueError(f"sequence of {h.shape[1]} frames exceeds the temporal position table "
                             f"({self.positions}); raise unet.motion_max_seq_length")
        pe = sinusoidal_positions(self.positions, self.dim)[: h.shape[1]]
        return h + jnp.asarray(pe, h.dtype)[None]

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, ip_tokens: jax.Array | None = None,
                 ip_scale: jax.Array | float = 1.0) -> jax.Array:
        attn = dict(heads=self.heads, dim_head=self.dim_head, out_dim=self.dim, implementation=self.implementation,
                    dtype=self.dtype)
        h = self._with_positions(layers.layer_norm(1e-5, dtype=self.dtype, name="norm1")(x))
        x = x + Attention(**attn, name="attn1")(h)
        h = self._with_positions(layers.layer_norm(1e-5, dtype=self.dtype, name="norm2")(x))
        if self.cross_attention:
            x = x + Attention(**attn, ip_adapter=self.ip_adapter, name="attn2")(h, context, ip_tokens, ip_scale)
        else:
            x = x + Attention(**attn, name="attn2")(h)
        h = layers.layer_norm(1e-5, dtype=self.dtype, name="norm3")(x)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(h)


class Transformer2D(nn.Module):
    """SD 1.5 spatial transformer: GN, 1x1 conv in, transformer blocks over H*W tokens, 1x1 conv out, residual."""

    channels: int
    heads: int
    num_layers: int = 1
    groups: int = 32
    ip_adapter: bool = False
    implementation: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, ip_tokens: jax.Array | None = None,
                 ip_scale: jax.Array | float = 1.0) -> jax.Array:
        n, hgt, wid, c = x.shape
        h = layers.group_norm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
        h = layers.conv(self.channels, (1, 1), padding="VALID", dtype=self.dtype, name="proj_in")(h)
        h = nn.with_logical_constraint(h.reshape(n, hgt * wid, self.channels), ax.PIXEL_TOKENS)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.channels, self.heads, self.channels // self.heads,
                                      ip_adapter=self.ip_adapter, implementation=self.implementation,
                                      dtype=self.dtype, name=f"transformer_blocks_{i}")(h, context, ip_tokens, ip_scale)
        h = nn.with_logical_constraint(h.reshape(n, hgt, wid, self.channels), ax.FOLDED_FRAMES)
        return x + layers.conv(c, (1, 1), padding="VALID", dtype=self.dtype, name="proj_out")(h)
