"""Classifier-free guidance over image and text (InstructPix2Pix-style), with guidance rescale.

Three branches, built with the training dropout convention (see interfaces): "image dropped" zeroes the CLIP image
embeddings AND the given latents (the frame mask is kept); "text dropped" uses the empty prompt's context.
  u  = model(no image, no text)    i = model(image, no text)    it = model(image, text)
  out = u + s_img * (i - u) + s_txt * (it - i)
The branches are concatenated on the batch axis into ONE model call. When s_img == s_txt the image-only branch
cancels (out = u + s * (it - u)) and when both are 1 only `it` is needed, so those cases run a smaller batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

# predict(x_t, t, mask, given_latents, context, image_embeds) -> model output, shaped like x_t.
PredictFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    image_scale: float = 1.0
    text_scale: float = 7.5
    rescale: float = 0.7  # phi of "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4.

    def __post_init__(self):
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"GuidanceConfig.rescale={self.rescale}: expected a value in [0, 1]")

    @property
    def branches(self) -> tuple[str, ...]:
        if self.image_scale == self.text_scale == 1.0:
            return ("it",)
        if self.image_scale == self.text_scale:
            return ("u", "it")
        return ("u", "i", "it")


@flax.struct.dataclass
class Conditioning:
    """Conditioning of one batch. mask (B, F); given_latents like x_t; contexts (B, L, D); image_embeds (B, E)|None."""
    mask: jax.Array
    given_latents: jax.Array
    context: jax.Array
    empty_context: jax.Array
    image_embeds: jax.Array | None = None


def combine(u: jax.Array, i: jax.Array, it: jax.Array, image_scale: float, text_scale: float) -> jax.Array:
    return u + image_scale * (i - u) + text_scale * (it - i)


def rescale_guidance(guided: jax.Array, positive: jax.Array, phi: float) -> jax.Array:
    """diffusers' rescale_noise_cfg: match the per-sample std (over all non-batch dims) of the fully conditional
    output, then mix with weight phi. (torch's unbiased std and our biased one give the same ratio.)"""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (jnp.std(positive, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True))
    return phi * rescaled + (1.0 - phi) * guided


def _branch_inputs(cond: Conditioning, branch: str) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(given_latents, context, image_embeds) of one branch."""
    with_image = branch in ("i", "it")
    given = cond.given_latents if with_image else jnp.zeros_like(cond.given_latents)
    embeds = cond.image_embeds
    if embeds is not None and not with_image:
        embeds = jnp.zeros_like(embeds)
    return given, cond.context if branch == "it" else cond.empty_context, embeds


def guided_model_fn(predict: PredictFn, cond: Conditioning, config: GuidanceConfig) -> Callable:
    """A `model_fn(x_t, t)` for the samplers that evaluates all branches in one batched `predict` call."""
    branches = config.branches
    inputs = [_branch_inputs(cond, b) for b in branches]
    n = len(branches)
    given = jnp.concatenate([g for g, _, _ in inputs])
    context = jnp.concatenate([c for _, c, _ in inputs])
    embeds = None if cond.image_embeds is None else jnp.concatenate([e for _, _, e in inputs])
    mask = jnp.concatenate([cond.mask] * n)

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        out = predict(jnp.concatenate([x_t] * n), jnp.concatenate([t] * n), mask, given, context, embeds)
        outs = dict(zip(branches, jnp.split(out, n)))
        if n == 1:
            return outs["it"]
        if n == 2:  # s_img == s_txt: the "i" terms cancel.
            guided = outs["u"] + config.text_scale * (outs["it"] - outs["u"])
        else:
            guided = combine(outs["u"], outs["i"], outs["it"], config.image_scale, config.text_scale)
        return rescale_guidance(guided, outs["it"], config.rescale) if config.rescale > 0 else guided

    return model_fn
