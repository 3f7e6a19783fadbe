"""Image-to-video: an image (+ optional prompt) becomes the first frame of a sampled video.

Frame 0 carries the image latent with mask 1, the other frames zeros (the 9-channel input); the CLIP embedding of
the image feeds the IP-Adapter cross-attention. Sampling starts from pure Gaussian noise, as the paper argues.
The whole denoising loop (all steps, all guidance branches) is ONE jitted call: a progress bar can only follow the
VAE decode chunks and, for long videos, the windows. Params may be global arrays sharded over a multi-host mesh (the
trainer samples with its training shardings); every process then makes the same calls and gets the same video.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from atomo_jax.diffusion import guidance as guidance_lib
from atomo_jax.diffusion import samplers
from atomo_jax.diffusion.guidance import Conditioning, GuidanceConfig
from atomo_jax.diffusion.samplers import SamplerConfig
from atomo_jax.parallel.sharding import fetch

Params = dict[str, Any]


class Video(NamedTuple):
    video: np.ndarray  # (B, F, H, W, 3) float32 in [-1, 1]
    latents: jax.Array  # (B, F, h, w, 4) scaled latents


def configs_from(config: Any, **overrides: Any) -> tuple[SamplerConfig, GuidanceConfig]:
    """SamplerConfig + GuidanceConfig from a training config's `diffusion` and `sample` sections.

    overrides: sampler, num_steps, eta, image_scale, text_scale, rescale (None leaves the config value).
    """
    s = dict(config.sample)
    s.update({k: v for k, v in overrides.items() if v is not None})
    d = config.diffusion
    if d.prediction_type != "v_prediction":
        raise ValueError(f"config.diffusion.prediction_type={d.prediction_type!r}: video sampling expects "
                         "'v_prediction' (the model's training target)")
    sampler = SamplerConfig(sampler=s["sampler"], num_steps=int(s["num_steps"]), eta=float(s["eta"]),
                            prediction_type=d.prediction_type, num_train_timesteps=d.num_train_timesteps,
                            beta_start=d.beta_start, beta_end=d.beta_end, beta_schedule=d.beta_schedule,
                            rescale_zero_snr=d.rescale_zero_snr)
    return sampler, GuidanceConfig(float(s["image_scale"]), float(s["text_scale"]), float(s["rescale"]))


def text_contexts(model: Any, params: Params, prompt_tokens: jax.Array | None, empty_tokens: jax.Array | None,
                  batch: int) -> tuple[jax.Array, jax.Array]:
    """(context of the prompt, context of the empty prompt). Without a prompt both are the empty prompt's."""
    empty = model.encode_text(params, empty_tokens, batch)
    context = empty if prompt_tokens is None else model.encode_text(params, prompt_tokens, batch)
    return context, empty


def check_num_frames(model: Any, num_frames: int) -> None:
    limit = model.unet_config.motion_max_seq_length
    if not 1 <= num_frames <= limit:
        raise ValueError(f"num_frames={num_frames}: the temporal attention position table of this model holds "
                         f"1..{limit} frames (unet.motion_max_seq_length)")


def latent_shape(model: Any, params: Params, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the latents of a height x width image; a clear error if the model cannot take that size."""
    levels = len(model.unet_config.block_out_channels) - 1
    image = jax.ShapeDtypeStruct((1, 1, height, width, 3), jnp.float32)
    try:
        h, w = jax.eval_shape(model.encode_video, params, image).shape[2:4]
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"image size {height}x{width}: the autoencoder cannot encode it ({e})") from None
    multiple = max(1, height // max(h, 1)) * 2 ** levels
    if height % multiple or width % multiple:
        raise ValueError(f"image size {height}x{width} is not usable: height and width must be multiples of "
                         f"{multiple} (autoencoder factor x 2^{levels} UNet down-samplings)")
    return h, w


@functools.partial(jax.jit, static_argnames=("model", "sampler", "guidance", "temporal", "ip_scale"))
def _denoise(model: Any, unet_params: Any, rng: jax.Array, cond: Conditioning, *, sampler: SamplerConfig,
             guidance: GuidanceConfig, temporal: bool, ip_scale: float) -> jax.Array:
    params = {"unet": unet_params}

    def predict(x_t, t, mask, given, context, image_embeds):
        return model.predict(params, x_t, t, mask, given, context, image_embeds, temporal=temporal,
                             ip_scale=ip_scale)

    noise_rng, sampler_rng = jax.random.split(rng)
    x_T = jax.random.normal(noise_rng, cond.given_latents.shape, jnp.float32)
    x0 = samplers.sample(guidance_lib.guided_model_fn(predict, cond, guidance), x_T, sampler_rng, sampler)
    # Given frames are known exactly: keep them rather than the model's reconstruction of them.
    keep = cond.mask[:, :, None, None, None] > 0
    return jnp.where(keep, cond.given_latents, x0)


def denoise(model: Any, params: Params, rng: jax.Array, cond: Conditioning, sampler: SamplerConfig,
            guidance: GuidanceConfig, *, temporal: bool = True, ip_scale: float = 1.0) -> jax.Array:
    """Samples latents shaped like cond.given_latents: one compiled call for all steps and guidance branches."""
    return _denoise(model, params["unet"], rng, cond, sampler=sampler, guidance=guidance, temporal=temporal,
                    ip_scale=ip_scale)


@functools.partial(jax.jit, static_argnames=("model",))
def _decode_chunk(model: Any, vae_params: Any, latents: jax.Array) -> jax.Array:
    return model.decode_latents({"vae": vae_params}, latents, frames_per_chunk=latents.shape[1])


def decode(model: Any, params: Params, latents: jax.Array, *, frames_per_chunk: int = 8,
           progress: bool = True) -> np.ndarray:
    """Latents (B, F, h, w, 4) -> video (B, F, H, W, 3) in [-1, 1], `frames_per_chunk` frames per VAE call."""
    f = latents.shape[1]
    chunk = max(1, min(frames_per_chunk, f))
    padded = jnp.pad(latents, ((0, 0), (0, (-f) % chunk), (0, 0), (0, 0), (0, 0)))  # one shape: one compile
    starts = range(0, padded.shape[1], chunk)
    out = [fetch(_decode_chunk(model, params["vae"], padded[:, s:s + chunk]))
           for s in tqdm(starts, desc="VAE decode", unit="chunk", disable=not progress, leave=False)]
    return np.concatenate(out, axis=1)[:, :f]


@functools.partial(jax.jit, static_argnames=("model", "num_frames"))
def _i2v_conditioning(model: Any, params: Params, image: jax.Array, num_frames: int, prompt_tokens: jax.Array | None,
                      empty_tokens: jax.Array | None) -> Conditioning:
    b = image.shape[0]
    image_latent = model.encode_video(params, image[:, None])  # (B, 1, h, w, 4)
    given = jnp.zeros((b, num_frames) + image_latent.shape[2:], jnp.float32).at[:, :1].set(image_latent)
    mask = jnp.zeros((b, num_frames), jnp.float32).at[:, 0].set(1.0)
    embeds = model.encode_image(params, image) if model.unet_config.ip_adapter else None
    context, empty = text_contexts(model, params, prompt_tokens, empty_tokens, b)
    return Conditioning(mask=mask, given_latents=given, context=context, empty_context=empty, image_embeds=embeds)


def i2v_conditioning(model: Any, params: Params, image: jax.Array, num_frames: int, *,
                     prompt_tokens: jax.Array | None = None,
                     empty_tokens: jax.Array | None = None) -> Conditioning:
    """Conditioning for image-to-video: frame 0 given (mask 1), CLIP image embedding, prompt contexts."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image must be (B, H, W, 3) in [-1, 1], got shape {image.shape}")
    check_num_frames(model, num_frames)
    latent_shape(model, params, image.shape[1], image.shape[2])
    if model.text_encoder is not None and empty_tokens is None:
        raise ValueError("the model has a text encoder: pass empty_tokens (the tokenized empty prompt '')")
    encoders = {k: v for k, v in params.items() if k != "unet"}
    return _i2v_conditioning(model, encoders, jnp.asarray(image, jnp.float32), num_frames, prompt_tokens,
                             empty_tokens)


def image_to_video(model: Any, params: Params, image: jax.Array, rng: jax.Array, *, num_frames: int,
                   sampler: SamplerConfig, guidance: GuidanceConfig, prompt_tokens: jax.Array | None = None,
                   empty_tokens: jax.Array | None = None, frames_per_chunk: int = 8,
                   progress: bool = True) -> Video:
    """image (B, H, W, 3) in [-1, 1] -> Video; frame 0 reproduces the image latent exactly."""
    cond = i2v_conditioning(model, params, image, num_frames, prompt_tokens=prompt_tokens,
                            empty_tokens=empty_tokens)
    latents = denoise(model, params, rng, cond, sampler, guidance)
    return Video(decode(model, params, latents, frames_per_chunk=frames_per_chunk, progress=progress), latents)
