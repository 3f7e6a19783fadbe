"""Text-to-video: Stable Diffusion 1.5 text-to-image for the first frame, then image-to-video.

The first frame is sampled by the same UNet with every temporal layer off (`temporal=False`: exactly the SD 1.5
spatial network), one frame, mask 0 and no given latent (so the extra input channels see zeros), IP-Adapter
attention off (ip_scale 0), epsilon prediction on the plain SD 1.5 schedule (no zero-SNR rescale): the frozen
spatial weights are SD 1.5's. Plain classifier-free guidance over the text: u + s (c - u), two branches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from atomo_jax.diffusion.guidance import Conditioning, GuidanceConfig
from atomo_jax.diffusion.samplers import SamplerConfig, sd15_epsilon_config
from atomo_jax.pipelines import i2v

Params = dict[str, Any]


def text_to_image_latents(model: Any, params: Params, rng: jax.Array, *, batch: int, height: int, width: int,
                          sampler: SamplerConfig, guidance_scale: float = 7.5,
                          prompt_tokens: jax.Array | None = None,
                          empty_tokens: jax.Array | None = None) -> jax.Array:
    """SD 1.5 text-to-image with the video UNet's spatial layers: latents (B, 1, h, w, 4)."""
    h, w = i2v.latent_shape(model, params, height, width)
    context, empty = i2v.text_contexts(model, params, prompt_tokens, empty_tokens, batch)
    cfg = model.unet_config
    embeds = jnp.zeros((batch, cfg.image_embed_dim), jnp.float32) if cfg.ip_adapter else None
    zeros = jnp.zeros((batch, 1, h, w, 4), jnp.float32)
    cond = Conditioning(mask=jnp.zeros((batch, 1), jnp.float32), given_latents=zeros, context=context,
                        empty_context=empty, image_embeds=embeds)
    guidance = GuidanceConfig(guidance_scale, guidance_scale, rescale=0.0)
    return i2v.denoise(model, params, rng, cond, sampler, guidance, temporal=False, ip_scale=0.0)


def text_to_video(model: Any, params: Params, rng: jax.Array, *, batch: int, height: int, width: int,
                  num_frames: int, sampler: SamplerConfig, guidance: GuidanceConfig,
                  image_sampler: SamplerConfig | None = None, image_guidance_scale: float = 7.5,
                  prompt_tokens: jax.Array | None = None, empty_tokens: jax.Array | None = None,
                  frames_per_chunk: int = 8, progress: bool = True) -> tuple[i2v.Video, jax.Array]:
    """Returns (video, first-frame image (B, H, W, 3) in [-1, 1]). `image_sampler` defaults to SD 1.5's
    eps setup with the video sampler's solver and step count."""
    i2v.check_num_frames(model, num_frames)
    image_sampler = image_sampler or sd15_epsilon_config(sampler.sampler, sampler.num_steps)
    image_rng, video_rng = jax.random.split(rng)
    first = text_to_image_latents(model, params, image_rng, batch=batch, height=height, width=width,
                                  sampler=image_sampler, guidance_scale=image_guidance_scale,
                                  prompt_tokens=prompt_tokens, empty_tokens=empty_tokens)
    image = jnp.asarray(i2v.decode(model, params, first, progress=False)[:, 0])
    video = i2v.image_to_video(model, params, image, video_rng, num_frames=num_frames, sampler=sampler,
                               guidance=guidance, prompt_tokens=prompt_tokens, empty_tokens=empty_tokens,
                               frames_per_chunk=frames_per_chunk, progress=progress)
    return video, image
