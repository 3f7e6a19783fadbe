"""The training objective: v-prediction MSE under the (zero-SNR) schedule, with conditioning dropout for CFG.

Conditioning dropout draws one event per example, mutually exclusive: text dropped (empty-prompt context), image
dropped (CLIP image embedding and the given-frame latents zeroed; the frame mask is kept), or both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from atomo_jax.diffusion import schedule


def dropout_masks(rng: jax.Array, batch: int, drop: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(drop_text, drop_image) booleans of shape (B,)."""
    u = jax.random.uniform(rng, (batch,))
    p_text, p_image, p_both = float(drop.text), float(drop.image), float(drop.both)
    if p_text + p_image + p_both > 1.0:
        raise ValueError(f"config.cond_drop probabilities sum to {p_text + p_image + p_both} > 1")
    text_only = u < p_text
    image_only = (u >= p_text) & (u < p_text + p_image)
    both = (u >= p_text + p_image) & (u < p_text + p_image + p_both)
    return text_only | both, image_only | both


def loss_weights(alphas_cumprod: jax.Array, t: jax.Array, min_snr_gamma: float) -> jax.Array:
    """Min-SNR-gamma weights for v-prediction, min(SNR, gamma) / (SNR + 1); ones when gamma <= 0."""
    if min_snr_gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    snr = schedule.snr(alphas_cumprod, t)
    return jnp.minimum(snr, min_snr_gamma) / (snr + 1.0)


def diffusion_loss(model: Any, params: dict, batch: dict, rng: jax.Array, alphas_cumprod: jax.Array,
                   diffusion: ml_collections.ConfigDict, drop: ml_collections.ConfigDict,
                   null_tokens: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Mean loss over the batch and auxiliary metrics. `batch` holds "video" (or "latents"), "cond_image", "mask"
    and optionally "tokens"/"image_embeds"; frozen encoders run here under stop_gradient."""
    r_vae, r_t, r_noise, r_drop = jax.random.split(rng, 4)
    frozen = jax.lax.stop_gradient
    if "latents" in batch:
        latents = batch["latents"].astype(jnp.float32)
    else:
        latents = frozen(model.encode_video(params, batch["video"], r_vae))
    b = latents.shape[0]
    image_embeds = batch["image_embeds"] if "image_embeds" in batch else frozen(
        model.encode_image(params, batch["cond_image"]))
    context = batch["context"] if "context" in batch else frozen(
        model.encode_text(params, batch.get("tokens"), b))
    drop_text, drop_image = dropout_masks(r_drop, b, drop)
    if null_tokens is not None:
        null = frozen(model.encode_text(params, jnp.broadcast_to(null_tokens, (b,) + null_tokens.shape[-1:]), b))
    else:
        null = jnp.zeros_like(context)
    context = jnp.where(drop_text[:, None, None], null, context)
    keep_image = (~drop_image).astype(jnp.float32)
    image_embeds = image_embeds * keep_image[:, None]
    mask = batch["mask"].astype(jnp.float32)
    given = latents * keep_image[:, None, None, None, None]

    num_t = alphas_cumprod.shape[0]
    t = jax.random.randint(r_t, (b,), 0, num_t)
    noise = jax.random.normal(r_noise, latents.shape, jnp.float32)
    x_t = schedule.add_noise(alphas_cumprod, latents, noise, t)
    if diffusion.prediction_type == "v_prediction":
        target = schedule.v_target(alphas_cumprod, latents, noise, t)
    elif diffusion.prediction_type == "epsilon":
        target = noise
    else:
        raise ValueError(f"config.diffusion.prediction_type={diffusion.prediction_type!r}: expected "
                         "'v_prediction' or 'epsilon'")
    pred = model.predict(params, x_t, t, mask, given, context, image_embeds)
    per_example = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3, 4))
    w = loss_weights(alphas_cumprod, t, float(diffusion.min_snr_gamma))
    loss = jnp.mean(per_example * w)
    return loss, {"mse": jnp.mean(per_example)}
