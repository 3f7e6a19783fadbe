"""Flax ports of transformers' `CLIPTextModel` and `CLIPVisionModelWithProjection`, channels-last images.

Parameter names mirror the transformers checkpoints with list indices joined by "_" (`encoder/layers_3/self_attn/
q_proj/kernel`; the vision model keeps its `vision_model/` prefix and `visual_projection`; the text model drops
`text_model/`), so `atomo_jax.convert.clip` is a rename + transpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from atomo_jax.models import layers
from atomo_jax.parallel import axes as ax

# CLIPImageProcessor's normalisation (OpenAI CLIP, also used by the LAION ViT-H/14 of IP-Adapter).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults: the SD 1.5 text encoder (OpenAI CLIP ViT-L/14 text tower)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # SD 1.5's config says 2 (a legacy value): transformers then pools at argmax(input_ids), the EOS token (49407)
    # being the largest id. Any other value pools at the first occurrence of that id.
    eos_token_id: int = 2


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Defaults: the IP-Adapter SD 1.5 image encoder (LAION CLIP ViT-H/14)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, L, D), after the final layer norm
    pooled_output: jax.Array  # (B, D), the EOS position of last_hidden_state


class CLIPVisionOutput(NamedTuple):
    image_embeds: jax.Array  # (B, projection_dim)
    last_hidden_state: jax.Array  # (B, 1 + patches, D), no final norm (as transformers)
    penultimate_hidden_state: jax.Array  # (B, 1 + patches, D): transformers' hidden_states[-2]


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"CLIP hidden_act {name!r} is not supported; expected 'quick_gelu' or 'gelu'")


def _embed(num: int, features: int, name: str) -> nn.Embed:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (ax.VOCAB, ax.EMBED))
    return nn.Embed(num, features, param_dtype=jnp.float32, embedding_init=init, name=name)


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, length, d = x.shape
        head_dim = d // self.num_heads

        def project(name: str) -> jax.Array:
            t = layers.dense(d, axes=(ax.EMBED, ax.HEADS), dtype=self.dtype, name=name)(x)
            return t.reshape(b, length, self.num_heads, head_dim)

        out = layers.attention(project("q_proj"), project("k_proj"), project("v_proj"), mask=mask)
        return layers.dense(d, axes=(ax.HEADS, ax.EMBED), dtype=self.dtype, name="out_proj")(out.reshape(b, length, d))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.dense(self.intermediate_size, axes=(ax.EMBED, ax.MLP), dtype=self.dtype, name="fc1")(x)
        h = _activation(self.hidden_act)(h)
        return layers.dense(self.hidden_size, axes=(ax.MLP, ax.EMBED), dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        h = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, dtype=self.dtype, name="self_attn")(h, mask)
        h = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """Returns (last hidden state, the one before it: the input of the last layer)."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        previous = x
        for i in range(self.config.num_hidden_layers):
            previous, x = x, CLIPEncoderLayer(self.config, dtype=self.dtype, name=f"layers_{i}")(x, mask)
        return x, previous


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tokens = _embed(cfg.vocab_size, cfg.hidden_size, "token_embedding")(input_ids)
        positions = _embed(cfg.max_position_embeddings, cfg.hidden_size, "position_embedding")
        return tokens + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPVisionEmbeddings(nn.Module):
    """[CLS] + patch embeddings, plus learned positions. pixel_values (B, H, W, C), already CLIP-normalised."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = layers.conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                              dtype=self.dtype, name="patch_embedding")(pixel_values.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)
        cls = self.param("class_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(cfg.hidden_size ** -0.5), (ax.EMBED,)),
                         (cfg.hidden_size,), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size)), patches], axis=1)
        num_positions = (cfg.image_size // p) ** 2 + 1
        positions = _embed(num_positions, cfg.hidden_size, "position_embedding")(jnp.arange(num_positions))
        return x + positions[None].astype(self.dtype)


class CLIPTextModel(nn.Module):
    """input_ids (B, L) int -> CLIPTextOutput. `attention_mask` (B, L) of {0, 1} is optional (SD uses none)."""

    config: CLIPTextConfig = CLIPTextConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        cfg = self.config
        b, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: sequence length {length} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids).astype(self.dtype)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        x, _ = CLIPEncoder(cfg, dtype=self.dtype, name="encoder")(x, mask)
        x = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        if cfg.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        return CLIPTextOutput(x, x[jnp.arange(b), eos])


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (pooled: post-layernormed [CLS], last hidden state, penultimate hidden state)."""
        cfg = self.config
        x = CLIPVisionEmbeddings(cfg, dtype=self.dtype, name="embeddings")(pixel_values)
        x = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)  # sic, as in transformers
        last, penultimate = CLIPEncoder(cfg, dtype=self.dtype, name="encoder")(x)
        pooled = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(last[:, 0])
        return pooled, last, penultimate


class CLIPVisionModelWithProjection(nn.Module):
    """pixel_values (B, image_size, image_size, C), CLIP-normalised (see `clip_preprocess`) -> CLIPVisionOutput."""

    config: CLIPVisionConfig = CLIPVisionConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"CLIPVisionModelWithProjection expects (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                             f"pixel values, got shape {pixel_values.shape}")
        pooled, last, penultimate = CLIPVisionTransformer(cfg, dtype=self.dtype, name="vision_model")(pixel_values)
        embeds = layers.dense(cfg.projection_dim, axes=(ax.EMBED, ax.MLP), use_bias=False, dtype=self.dtype,
                              name="visual_projection")(pooled)
        return CLIPVisionOutput(embeds, last, penultimate)


def clip_preprocess(images: jax.Array, image_size: int = 224) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> CLIP pixel values (B, image_size, image_size, 3).

    Like `CLIPImageProcessor`: resize the short side to `image_size` (bicubic, antialiased), centre-crop, normalise
    with the CLIP mean/std. Differences from PIL's resampling are at the level of interpolation rounding.
    """
    b, h, w, c = images.shape
    scale = image_size / min(h, w)
    nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="cubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = jnp.clip(x[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
