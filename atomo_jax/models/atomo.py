"""The composite AtomoVideo model: frozen encoders + the spatio-temporal UNet, as pure functions over one params dict.

params = {"unet": ..., "vae": ..., "image_encoder": ..., "text_encoder": ...} (plain nested dicts of arrays).
Every method is jit-friendly; nothing here holds state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from atomo_jax.models.clip import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection,
                                   clip_preprocess)
from atomo_jax.models.pixel_autoencoder import PixelAutoencoder, PixelAutoencoderConfig
from atomo_jax.models.unet import SpatioTemporalUNet, UNetConfig
from atomo_jax.models.vae import AutoencoderKL, VAEConfig

PARTS = ("unet", "vae", "image_encoder", "text_encoder")


def _fields(cfg: ml_collections.ConfigDict | dict, drop: tuple[str, ...] = ("kind",)) -> dict:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k not in drop}


def _dataclass(cls: type, cfg: ml_collections.ConfigDict | dict, where: str) -> Any:
    """`cls` from the config section's fields that `cls` has: a section declares the fields of every kind it can
    be (configs/base.py), each kind reads its own."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in _fields(cfg).items() if k in names})


def _build_vae(cfg: ml_collections.ConfigDict) -> tuple[nn.Module, float]:
    if cfg.kind == "pixel":
        c = _dataclass(PixelAutoencoderConfig, cfg, "vae")
        return PixelAutoencoder(c), c.scaling_factor
    if cfg.kind == "sd":
        c = _dataclass(VAEConfig, cfg, "vae")
        return AutoencoderKL(c), c.scaling_factor
    raise ValueError(f"config.model.vae.kind={cfg.kind!r}: expected 'pixel' or 'sd'")


def _build_image_encoder(cfg: ml_collections.ConfigDict) -> nn.Module:
    if cfg.kind == "clip_vision":
        return CLIPVisionModelWithProjection(_dataclass(CLIPVisionConfig, cfg, "image_encoder"))
    raise ValueError(f"config.model.image_encoder.kind={cfg.kind!r}: expected 'clip_vision'")


def _build_text_encoder(cfg: ml_collections.ConfigDict) -> nn.Module | None:
    if cfg.kind == "none":
        return None
    if cfg.kind == "clip_text":
        return CLIPTextModel(_dataclass(CLIPTextConfig, cfg, "text_encoder"))
    raise ValueError(f"config.model.text_encoder.kind={cfg.kind!r}: expected 'clip_text' or 'none'")


class AtomoVideo:
    """Module definitions of the four parts and the functions that tie them together."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.unet_config = UNetConfig.from_dict(_fields(config.unet, drop=()))
        self.unet = SpatioTemporalUNet(self.unet_config)
        self.vae, self.latent_scale = _build_vae(config.vae)
        self.image_encoder = _build_image_encoder(config.image_encoder)
        self.text_encoder = _build_text_encoder(config.text_encoder)
        self.image_size = int(config.image_encoder.image_size)
        self.text_length = int(config.text_encoder.max_position_embeddings) if self.text_encoder is not None else 1

    # ---------------------------------------------------------------- parameters
    def min_resolution(self) -> int:
        """Smallest pixel size the VAE and UNet accept (parameter shapes do not depend on the input size)."""
        vae = self.config.vae
        vae_factor = int(vae.factor) if vae.kind == "pixel" else 2 ** (len(self.vae.config.block_out_channels) - 1)
        return vae_factor * 2 ** (len(self.unet_config.block_out_channels) - 1)

    def init(self, rng: jax.Array, *, num_frames: int = 1, resolution: int | None = None) -> dict:
        """Random parameters for every part (boxed with logical axis names; `nn.unbox` for plain arrays).

        Flax creates parameters by running the model once; the default input is the smallest the model accepts
        (1 frame, `min_resolution()` pixels), which keeps the init program small: at full size a 16-frame 256 px
        init forward made the GPU compile take minutes.
        """
        r_unet, r_vae, r_img, r_txt = jax.random.split(rng, 4)
        resolution = resolution or self.min_resolution()
        video = jnp.zeros((1, num_frames, resolution, resolution, 3), jnp.float32)
        vae_vars = self.vae.init(r_vae, video[:, 0])  # the full round trip creates encoder and decoder params
        latents = self.vae.apply(vae_vars, video[:, 0], method="encode")[0]
        image = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        img_vars = self.image_encoder.init(r_img, image)
        tokens = jnp.zeros((1, self.text_length), jnp.int32)
        txt_vars = self.text_encoder.init(r_txt, tokens) if self.text_encoder is not None else {}
        cfg = self.unet_config
        sample = jnp.zeros((1, num_frames) + latents.shape[1:3] + (cfg.in_channels,), jnp.float32)
        context = jnp.zeros((1, self.text_length, cfg.cross_attention_dim), jnp.float32)
        image_embeds = jnp.zeros((1, cfg.image_embed_dim), jnp.float32) if cfg.ip_adapter else None
        unet_vars = self.unet.init(r_unet, sample, jnp.zeros((1,), jnp.int32), context, image_embeds)
        return {"unet": unet_vars.get("params", {}), "vae": vae_vars.get("params", {}),
                "image_encoder": img_vars.get("params", {}), "text_encoder": txt_vars.get("params", {})}

    # ---------------------------------------------------------------- encoders
    def encode_video(self, params: dict, video: jax.Array, keys: jax.Array | None = None) -> jax.Array:
        """(B, F, H, W, 3) in [-1, 1] -> scaled latents (B, F, h, w, 4); samples the posterior when `keys` (B,), one
        PRNG key per video, are given."""
        b, f = video.shape[:2]
        mean, logvar = self.vae.apply({"params": params["vae"]}, video.reshape((b * f,) + video.shape[2:]),
                                      method="encode")
        mean, logvar = (x.reshape((b, f) + x.shape[1:]) for x in (mean, logvar))
        z = mean
        if keys is not None:
            eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
            z = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * eps
        return (z * self.latent_scale).astype(jnp.float32)

    def decode_latents(self, params: dict, latents: jax.Array, frames_per_chunk: int = 8) -> jax.Array:
        """Scaled latents (B, F, h, w, 4) -> (B, F, H, W, 3) in [-1, 1], decoding `frames_per_chunk` frames at a
        time to bound activation memory."""
        b, f = latents.shape[:2]
        flat = latents.reshape((b * f,) + latents.shape[2:]) / self.latent_scale
        n = flat.shape[0]
        chunk = max(1, min(frames_per_chunk, n))
        pad = (-n) % chunk
        flat = jnp.pad(flat, ((0, pad),) + ((0, 0),) * 3)
        decode = lambda z: self.vae.apply({"params": params["vae"]}, z, method="decode")
        out = jax.lax.map(decode, flat.reshape((-1, chunk) + flat.shape[1:]))
        out = out.reshape((-1,) + out.shape[2:])[:n]
        return jnp.clip(out, -1.0, 1.0).reshape((b, f) + out.shape[1:])

    def encode_image(self, params: dict, image: jax.Array) -> jax.Array:
        """[-1, 1] image (B, H, W, 3) -> projected CLIP image embedding (B, E) (CLIP preprocessing included)."""
        out = self.image_encoder.apply({"params": params["image_encoder"]}, clip_preprocess(image, self.image_size))
        return out.image_embeds.astype(jnp.float32)

    def encode_text(self, params: dict, tokens: jax.Array | None, batch: int) -> jax.Array:
        """tokens (B, L) -> context (B, L, D). Without a text encoder the context is one zero token per video."""
        if self.text_encoder is None:
            return jnp.zeros((batch, 1, self.unet_config.cross_attention_dim), jnp.float32)
        out = self.text_encoder.apply({"params": params["text_encoder"]}, tokens)
        return out.last_hidden_state.astype(jnp.float32)

    # ---------------------------------------------------------------- denoiser
    @staticmethod
    def unet_input(x_t: jax.Array, mask: jax.Array, given_latents: jax.Array) -> jax.Array:
        """concat(noisy latent [4], frame mask [1], given-frame latents [4]) on channels: the 9-channel input."""
        m = mask.astype(x_t.dtype)[:, :, None, None, None] * jnp.ones(x_t.shape[:-1] + (1,), x_t.dtype)
        return jnp.concatenate([x_t, m, given_latents.astype(x_t.dtype) * m], axis=-1)

    def predict(self, params: dict, x_t: jax.Array, t: jax.Array, mask: jax.Array, given_latents: jax.Array,
                context: jax.Array, image_embeds: jax.Array | None, *, temporal: bool = True,
                ip_scale: jax.Array | float = 1.0) -> jax.Array:
        """UNet output (v for our training; eps for plain SD 1.5 weights) for x_t (B, F, h, w, 4)."""
        return self.unet.apply({"params": params["unet"]}, self.unet_input(x_t, mask, given_latents), t, context,
                               image_embeds, temporal=temporal, ip_scale=ip_scale)


def build_model(model_config: ml_collections.ConfigDict) -> AtomoVideo:
    return AtomoVideo(model_config)
