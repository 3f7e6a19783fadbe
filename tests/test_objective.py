"""The training objective itself: conditioning dropout (exclusive events at the configured rates), the empty prompt
for a dropped caption, given latents zeroed with the frame mask kept for a dropped image, per-example randomness,
Min-SNR weights against diffusers' `compute_snr` and its training scripts' formula, and the training timesteps'
distribution (uniform, or logit-normal as configured) as the loss draws them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from atomo_jax.diffusion import schedule
from atomo_jax.diffusion.loss import diffusion_loss, dropout_masks, loss_weights
from configs import base

B, F, H, C, L, D, E = 6, 3, 4, 4, 5, 8, 7
DIFFUSION = base.get_config().diffusion  # configs/base.py's values: v-prediction, zero SNR, uniform timesteps


def drop(text=0.0, image=0.0, both=0.0):
    return ml_collections.ConfigDict(dict(text=text, image=image, both=both))


class RecordingModel:
    """The AtomoVideo interface with transparent encoders; `predict` records what the UNet would see."""

    def __init__(self):
        self.seen = {}

    def encode_video(self, params, video, keys=None):
        return video[..., :C] * 2.0

    def encode_image(self, params, image):
        return jnp.full((image.shape[0], E), 3.0)

    def encode_text(self, params, tokens, batch):
        return jnp.broadcast_to(tokens[:, :, None].astype(jnp.float32), tokens.shape + (D,))

    def predict(self, params, x_t, t, mask, given, context, image_embeds):
        self.seen = dict(x_t=x_t, t=t, mask=mask, given=given, context=context, image_embeds=image_embeds)
        return jnp.zeros_like(x_t)


def batch():
    rng = np.random.default_rng(0)
    return {"video": jnp.asarray(rng.uniform(-1, 1, (B, F, H, H, 3)), jnp.float32),
            "cond_image": jnp.zeros((B, H, H, 3)),
            "mask": jnp.asarray(np.tile([1.0, 0.0, 0.0], (B, 1)), jnp.float32),
            "tokens": jnp.asarray(rng.integers(1, 100, (B, L)), jnp.int32)}


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def run(model, b, cond_drop, null_tokens=None, k=None):
    ac = schedule.make_alphas_cumprod()
    return diffusion_loss(model, {}, b, keys(B) if k is None else k, ac, DIFFUSION, cond_drop, null_tokens)


def test_dropout_events_are_exclusive_at_the_configured_rates():
    n = 200_000
    text, image = map(np.asarray, dropout_masks(keys(n), drop(text=0.1, image=0.2, both=0.15)))
    freq = {"text only": np.mean(text & ~image), "image only": np.mean(image & ~text), "both": np.mean(text & image),
            "none": np.mean(~text & ~image)}
    want = {"text only": 0.1, "image only": 0.2, "both": 0.15, "none": 0.55}
    for event, p in want.items():  # 5 standard errors of a binomial frequency
        assert abs(freq[event] - p) < 5 * np.sqrt(p * (1 - p) / n), (event, freq[event], p)
    with pytest.raises(ValueError, match="sum to"):
        dropout_masks(keys(4), drop(text=0.5, image=0.4, both=0.2))
    with pytest.raises(ValueError, match="config.cond_drop.image=-0.1"):
        dropout_masks(keys(4), drop(image=-0.1))


def test_dropped_caption_becomes_the_empty_prompt():
    model, b = RecordingModel(), batch()
    null = jnp.full((1, L), 7, jnp.int32)
    run(model, b, drop(text=1.0), null)
    np.testing.assert_array_equal(model.seen["context"], model.encode_text(None, jnp.full((B, L), 7), B))
    assert np.all(np.asarray(model.seen["image_embeds"]) == 3.0)  # the image condition is kept
    run(model, b, drop(), null)
    np.testing.assert_array_equal(model.seen["context"], model.encode_text(None, b["tokens"], B))
    run(model, b, drop(both=1.0), null)  # both: empty prompt and no image
    np.testing.assert_array_equal(model.seen["context"], model.encode_text(None, jnp.full((B, L), 7), B))
    assert not np.asarray(model.seen["image_embeds"]).any()


def test_dropped_image_zeroes_given_latents_and_embedding_but_keeps_the_mask():
    model, b = RecordingModel(), batch()
    latents = model.encode_video(None, b["video"])
    run(model, b, drop())
    np.testing.assert_array_equal(model.seen["given"], latents)
    np.testing.assert_array_equal(model.seen["mask"], b["mask"])
    run(model, b, drop(image=1.0))
    assert not np.asarray(model.seen["given"]).any() and not np.asarray(model.seen["image_embeds"]).any()
    np.testing.assert_array_equal(model.seen["mask"], b["mask"])  # the model still knows which frame is given


def test_each_example_draws_from_its_own_key():
    """Example i's timestep, noise and dropout come from key i alone: the same key in another batch (or another
    micro-batch) gives the same draws."""
    model, b = RecordingModel(), batch()
    k = keys(B, seed=3)
    run(model, b, drop(image=0.5), k=k)
    full = {name: np.asarray(v) for name, v in model.seen.items()}
    half = {name: v[::2] for name, v in b.items()}
    model_half = RecordingModel()
    diffusion_loss(model_half, {}, half, k[::2], schedule.make_alphas_cumprod(), DIFFUSION, drop(image=0.5))
    for name in ("t", "x_t", "given", "image_embeds"):
        np.testing.assert_array_equal(np.asarray(model_half.seen[name]), full[name][::2], err_msg=name)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    gamma = 5.0
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                              prediction_type=prediction_type)
    t = np.arange(1000)
    snr = compute_snr(scheduler, torch.from_numpy(t))
    # diffusers' examples/text_to_image/train_text_to_image.py, the Min-SNR branch
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    ours = np.asarray(loss_weights(schedule.make_alphas_cumprod(), jnp.asarray(t), gamma, prediction_type))
    ref = weights.numpy()
    finite = np.isfinite(ref)
    # float32 on both sides: 1 - alphas_cumprod near t=0 (~1e-3) cancels, so the SNRs agree to ~5e-5 only.
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-4, atol=1e-7)
    # Zero terminal SNR: the last step's SNR is 0. diffusers' epsilon formula gives 0/0 there; ours its limit, 1.
    assert float(snr[-1]) == 0.0
    assert finite.sum() == (999 if prediction_type == "epsilon" else 1000)
    assert ours[-1] == (1.0 if prediction_type == "epsilon" else 0.0)
    assert np.all(np.asarray(loss_weights(schedule.make_alphas_cumprod(), jnp.asarray(t), 0.0,
                                          prediction_type)) == 1.0)


@pytest.mark.parametrize("sampling, mean_std", [("uniform", None), ("logit_normal", (1.0, 1.0)),
                                                ("logit_normal", (-0.5, 0.7))])
def test_training_timesteps_follow_the_configured_distribution(sampling, mean_std):
    """The timesteps the loss hands the model, over many examples, against the distribution's CDF: uniform over
    the 1000 steps, or P(t < k) = Phi((logit(k / T) - mean) / std) for logit-normal (a positive mean: noisier)."""
    diffusion = DIFFUSION.copy_and_resolve_references()
    with diffusion.unlocked():
        diffusion.timestep_sampling = sampling
        if mean_std:
            diffusion.timestep_logit_normal = mean_std
    n = 4096
    model = RecordingModel()
    b = {name: jnp.repeat(v[:1], n, axis=0) for name, v in batch().items()}
    diffusion_loss(model, {}, b, keys(n, seed=1), schedule.make_alphas_cumprod(), diffusion, drop())
    t = np.asarray(model.seen["t"])
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    k = np.arange(1, 1000)
    if sampling == "uniform":
        cdf = k / 1000
    else:
        z = (np.log(k / (1000 - k)) - mean_std[0]) / mean_std[1]
        cdf = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z])
    empirical = np.searchsorted(np.sort(t), k, side="left") / n
    # Kolmogorov-Smirnov at 1e-4 significance: 1.95 / sqrt(n)
    assert np.abs(empirical - cdf).max() < 1.95 / np.sqrt(n), np.abs(empirical - cdf).max()
