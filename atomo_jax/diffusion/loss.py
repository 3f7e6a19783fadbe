"""The training objective: v-prediction MSE under the (zero-SNR) schedule, with conditioning dropout for CFG.

Conditioning dropout draws one event per example, mutually exclusive: text dropped (empty-prompt context), image
dropped (CLIP image embedding and the given-frame latents zeroed; the frame mask is kept), or both.

Every random draw (VAE posterior sample, timestep, noise, dropout event) comes from the example's own key, so an
example's loss does not depend on how the batch is split into micro-batches or over devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from atomo_jax.diffusion import schedule


def dropout_masks(keys: jax.Array, drop: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(drop_text, drop_image) booleans of shape (B,), one event per example key: text only, image only or both,
    with probabilities drop.text, drop.image, drop.both."""
    u = jax.vmap(jax.random.uniform)(keys)
    p_text, p_image, p_both = float(drop.text), float(drop.image), float(drop.both)
    for name, p in (("text", p_text), ("image", p_image), ("both", p_both)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"config.cond_drop.{name}={p}: expected a probability in [0, 1]")
    if p_text + p_image + p_both > 1.0:
        raise ValueError(f"config.cond_drop probabilities sum to {p_text + p_image + p_both} > 1")
    text_only = u < p_text
    image_only = (u >= p_text) & (u < p_text + p_image)
    both = (u >= p_text + p_image) & (u < p_text + p_image + p_both)
    return text_only | both, image_only | both


def loss_weights(alphas_cumprod: jax.Array, t: jax.Array, min_snr_gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma weights as diffusers' training scripts compute them: min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v-prediction; ones when gamma <= 0. Under zero terminal SNR the last timestep
    has SNR 0, where the epsilon weight takes its limit, 1, instead of 0 / 0."""
    if min_snr_gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    snr = schedule.snr(alphas_cumprod, t)
    clipped = jnp.minimum(snr, min_snr_gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)


def sample_timesteps(keys: jax.Array, num_t: int, diffusion: ml_collections.ConfigDict) -> jax.Array:
    """One training timestep per example key, int32 in [0, num_t): uniform, or logit-normal (t/T =
    sigmoid(mean + std * N(0, 1)), as SD3 samples its flow times) when diffusion.timestep_sampling says so."""
    if diffusion.timestep_sampling == "uniform":
        return jax.vmap(lambda k: jax.random.randint(k, (), 0, num_t))(keys)
    if diffusion.timestep_sampling != "logit_normal":
        raise ValueError(f"config.diffusion.timestep_sampling={diffusion.timestep_sampling!r}: expected 'uniform' or "
                         "'logit_normal'")
    mean, std = (float(v) for v in diffusion.timestep_logit_normal)
    u = jax.nn.sigmoid(mean + std * jax.vmap(lambda k: jax.random.normal(k, ()))(keys))
    return jnp.clip(jnp.floor(u * num_t), 0, num_t - 1).astype(jnp.int32)


def diffusion_loss(model: Any, params: dict, batch: dict, keys: jax.Array, alphas_cumprod: jax.Array,
                   diffusion: ml_collections.ConfigDict, drop: ml_collections.ConfigDict,
                   null_tokens: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Mean loss over the batch and auxiliary metrics. `batch` holds "video" (or "latents"), "cond_image", "mask"
    and optionally "tokens"/"image_embeds"; `keys` (B,) one PRNG key per example. Frozen encoders run here under
    stop_gradient."""
    if diffusion.prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(f"config.diffusion.prediction_type={diffusion.prediction_type!r}: expected "
                         "'v_prediction' or 'epsilon'")
    r_vae, r_t, r_noise, r_drop = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 4))(keys), 1, 0)
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
    drop_text, drop_image = dropout_masks(r_drop, drop)
    if null_tokens is not None:
        null = frozen(model.encode_text(params, jnp.broadcast_to(null_tokens, (b,) + null_tokens.shape[-1:]), b))
    else:
        null = jnp.zeros_like(context)
    context = jnp.where(drop_text[:, None, None], null, context)
    keep_image = (~drop_image).astype(jnp.float32)
    image_embeds = image_embeds * keep_image[:, None]
    mask = batch["mask"].astype(jnp.float32)
    given = latents * keep_image[:, None, None, None, None]

    t = sample_timesteps(r_t, alphas_cumprod.shape[0], diffusion)
    noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(r_noise)
    x_t = schedule.add_noise(alphas_cumprod, latents, noise, t)
    if diffusion.prediction_type == "v_prediction":
        target = schedule.v_target(alphas_cumprod, latents, noise, t)
    else:
        target = noise
    pred = model.predict(params, x_t, t, mask, given, context, image_embeds)
    per_example = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3, 4))
    w = loss_weights(alphas_cumprod, t, float(diffusion.min_snr_gamma), diffusion.prediction_type)
    loss = jnp.mean(per_example * w)
    return loss, {"mse": jnp.mean(per_example)}
