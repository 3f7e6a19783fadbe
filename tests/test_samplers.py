"""Schedule, samplers and guidance against diffusers (the numeric reference), on the same fake model outputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from atomo_jax.diffusion import guidance, samplers, schedule

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ZERO_SNR_V = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
SD15_EPS = dict(rescale_betas_zero_snr=False, timestep_spacing="leading", steps_offset=1, prediction_type="epsilon")
SHAPE = (2, 3, 4, 4, 4)  # (B, F, h, w, C)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


class FakeModel:
    """out = A[t] * x + B[t] * n0: a deterministic model both loops can evaluate identically in float32."""

    def __init__(self, seed=0):
        r = np.random.RandomState(seed)
        self.a = r.uniform(0.2, 0.8, 1000).astype(np.float32)
        self.b = r.uniform(-0.5, 0.5, 1000).astype(np.float32)
        self.n0 = r.randn(*SHAPE).astype(np.float32)

    def jax_fn(self, x, t):
        assert t.shape == (x.shape[0],) and t.dtype == jnp.int32
        return jnp.asarray(self.a)[t[0]] * x + jnp.asarray(self.b)[t[0]] * jnp.asarray(self.n0)

    def torch_fn(self, x, t):
        return float(self.a[int(t)]) * x + float(self.b[int(t)]) * torch.from_numpy(self.n0)


def test_schedule_matches_ddpm_and_terminal_snr_is_zero():
    ref = DDPMScheduler(**SD15, rescale_betas_zero_snr=True)
    ac = schedule.make_alphas_cumprod(rescale_zero_snr=True)
    assert rel(ac, ref.alphas_cumprod.numpy()) < 1e-6
    assert float(ac[-1]) == 0.0 and float(schedule.snr(ac, jnp.array([999]))[0]) == 0.0
    assert bool(jnp.all(jnp.diff(ac) < 0)) and float(ac[0]) == pytest.approx(1 - 0.00085, rel=1e-6)
    plain = schedule.make_alphas_cumprod(rescale_zero_snr=False)
    assert rel(plain, DDPMScheduler(**SD15).alphas_cumprod.numpy()) < 1e-6
    assert float(plain[-1]) > 0.0


def test_add_noise_and_v_target_match_ddpm():
    ref = DDPMScheduler(**SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ac = schedule.make_alphas_cumprod()
    r = np.random.RandomState(1)
    x0, noise = r.randn(*SHAPE).astype(np.float32), r.randn(*SHAPE).astype(np.float32)
    t = np.array([0, 999], np.int64)
    ours = schedule.add_noise(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    theirs = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    assert rel(ours, theirs.numpy()) < 1e-5
    np.testing.assert_array_equal(np.asarray(ours)[1], noise[1])  # zero SNR: pure noise at t = 999
    ours_v = schedule.v_target(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    theirs_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    assert rel(ours_v, theirs_v.numpy()) < 1e-5
    x0_back, eps_back = schedule.x0_eps_from_v(ac, ours, ours_v, jnp.asarray(t))
    assert rel(x0_back, x0) < 1e-5 and rel(eps_back, noise) < 1e-5


def _reference_trajectory(scheduler, fake, x_T, noises=None):
    x, traj = torch.from_numpy(np.array(x_T)), []
    for i, t in enumerate(scheduler.timesteps):
        kwargs = {} if noises is None else dict(eta=0.5, variance_noise=torch.from_numpy(noises[i]))
        x = scheduler.step(fake.torch_fn(x, t), t, x, **kwargs).prev_sample
        traj.append(x.numpy())
    return np.stack(traj)


CASES = [  # (our config, diffusers scheduler class, its kwargs)
    (samplers.SamplerConfig("ddim", 25), DDIMScheduler, dict(ZERO_SNR_V, clip_sample=False)),
    (samplers.SamplerConfig("ddim", 30), DDIMScheduler, dict(ZERO_SNR_V, clip_sample=False)),
    (samplers.SamplerConfig("dpmpp2m", 25), DPMSolverMultistepScheduler, ZERO_SNR_V),
    (samplers.SamplerConfig("dpmpp2m", 7), DPMSolverMultistepScheduler, ZERO_SNR_V),
    (samplers.sd15_epsilon_config("ddim", 20), DDIMScheduler,
     dict(SD15_EPS, clip_sample=False, set_alpha_to_one=False)),
    (samplers.sd15_epsilon_config("dpmpp2m", 20), DPMSolverMultistepScheduler, SD15_EPS),
    (dataclasses.replace(samplers.sd15_epsilon_config("ddim", 15), timestep_spacing="linspace"), DDIMScheduler,
     dict(SD15_EPS, timestep_spacing="linspace", clip_sample=False, set_alpha_to_one=False)),
    (dataclasses.replace(samplers.sd15_epsilon_config("dpmpp2m", 15), timestep_spacing="linspace"),
     DPMSolverMultistepScheduler, dict(SD15_EPS, timestep_spacing="linspace")),
]


@pytest.mark.parametrize("config,cls,kwargs", CASES, ids=lambda c: getattr(c, "__name__", None))
def test_sampler_trajectory_matches_diffusers(config, cls, kwargs):
    fake = FakeModel()
    ref = cls(**SD15, **kwargs)
    ref.set_timesteps(config.num_steps)
    np.testing.assert_array_equal(samplers.timesteps(config), ref.timesteps.numpy())
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    _, traj = jax.jit(lambda x: samplers.sample_trajectory(fake.jax_fn, x, jax.random.key(1), config))(x_T)
    theirs = _reference_trajectory(ref, fake, x_T)
    assert traj.shape == theirs.shape
    errors = [rel(a, b) for a, b in zip(np.asarray(traj), theirs)]
    assert max(errors) < 1e-5, errors


def test_ddim_eta_noise_matches_diffusers():
    # eta = 0.5: at eta = 1 the first zero-SNR step's direction weight is sqrt(0), which float32 rounding turns into
    # sqrt(+-6e-8) ~ 2e-4 differently in each implementation (checked for finiteness below instead).
    config = samplers.SamplerConfig("ddim", 10, eta=0.5)
    fake, rng = FakeModel(), jax.random.key(3)
    noises = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(rng, i), SHAPE)) for i in range(10)])
    ref = DDIMScheduler(**SD15, **ZERO_SNR_V, clip_sample=False)
    ref.set_timesteps(10)
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    _, traj = samplers.sample_trajectory(fake.jax_fn, x_T, rng, config)
    errors = [rel(a, b) for a, b in zip(np.asarray(traj), _reference_trajectory(ref, fake, x_T, noises))]
    assert max(errors) < 1e-5, errors
    full = samplers.sample(fake.jax_fn, x_T, rng, dataclasses.replace(config, eta=1.0))
    assert np.all(np.isfinite(full))


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_sampler_is_one_loop_traced_once_and_deterministic(name):
    config = samplers.SamplerConfig(name, 12, eta=0.5 if name == "ddim" else 0.0)
    fake, calls = FakeModel(), []

    def model_fn(x, t):
        calls.append(1)
        return fake.jax_fn(x, t)

    run = jax.jit(lambda x, r: samplers.sample(model_fn, x, r, config))
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    jaxpr = str(jax.make_jaxpr(lambda x, r: samplers.sample(model_fn, x, r, config))(x_T, jax.random.key(1)))
    assert "scan" in jaxpr or "while" in jaxpr
    first = run(x_T, jax.random.key(1))
    calls.clear()
    second = run(x_T, jax.random.key(1))
    assert not calls  # the cached executable ran: no retracing
    np.testing.assert_array_equal(first, second)
    assert np.all(np.isfinite(first))


def test_sampler_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sampler"):
        samplers.SamplerConfig("euler")
    with pytest.raises(ValueError, match="epsilon"):
        samplers.SamplerConfig(prediction_type="epsilon")
    with pytest.raises(ValueError, match="num_steps"):
        samplers.SamplerConfig(num_steps=0)


def test_guidance_rescale_matches_diffusers_formula():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    r = np.random.RandomState(0)
    cfg, pos = r.randn(*SHAPE).astype(np.float32) * 3, r.randn(*SHAPE).astype(np.float32)
    for phi in (0.0, 0.7, 1.0):
        ours = guidance.rescale_guidance(jnp.asarray(cfg), jnp.asarray(pos), phi)
        theirs = rescale_noise_cfg(torch.from_numpy(cfg), torch.from_numpy(pos), phi)
        assert rel(ours, theirs.numpy()) < 1e-5


def test_two_scale_combination_and_branch_batching():
    r = np.random.RandomState(0)
    u, i, it = (jnp.asarray(r.randn(*SHAPE), jnp.float32) for _ in range(3))
    out = guidance.combine(u, i, it, image_scale=2.0, text_scale=5.0)
    assert rel(out, u + 2.0 * (i - u) + 5.0 * (it - i)) < 1e-6
    cfg = guidance.GuidanceConfig(image_scale=2.0, text_scale=5.0, rescale=0.0)
    x = jnp.asarray(r.randn(*SHAPE), jnp.float32)
    mask = jnp.zeros(SHAPE[:2]).at[:, 0].set(1.0)
    given = jnp.asarray(r.randn(*SHAPE), jnp.float32)
    ctx, empty = jnp.ones((2, 5, 8)), jnp.zeros((2, 5, 8))
    emb = jnp.asarray(r.randn(2, 6), jnp.float32)
    seen = []

    def predict(x_t, t, mask_, given_, context, image_embeds):
        seen.append(x_t.shape[0])
        # A model whose output depends on every conditioning input, per sample.
        return (x_t * 0.5 + given_ * mask_[..., None, None, None] + context.mean((1, 2))[:, None, None, None, None]
                + image_embeds.sum(-1)[:, None, None, None, None])

    cond = guidance.Conditioning(mask=mask, given_latents=given, context=ctx, empty_context=empty, image_embeds=emb)
    fn = guidance.guided_model_fn(predict, cond, cfg)
    t = jnp.full((2,), 10, jnp.int32)
    got = fn(x, t)
    assert seen == [6]  # three branches, one batched call
    ref_u = predict(x, t, mask, jnp.zeros_like(given), empty, jnp.zeros_like(emb))
    ref_i = predict(x, t, mask, given, empty, emb)
    ref_it = predict(x, t, mask, given, ctx, emb)
    assert rel(got, ref_u + 2.0 * (ref_i - ref_u) + 5.0 * (ref_it - ref_i)) < 1e-6
    # Equal scales need only two branches, scales of 1 only the conditional one: same result, smaller batch.
    for scales, size in (((3.0, 3.0), 4), ((1.0, 1.0), 2)):
        seen.clear()
        got = guidance.guided_model_fn(predict, cond, guidance.GuidanceConfig(*scales, rescale=0.0))(x, t)
        assert seen == [size]
        assert rel(got, ref_u + scales[0] * (ref_i - ref_u) + scales[1] * (ref_it - ref_i)) < 1e-6
