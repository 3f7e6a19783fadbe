"""DDIM and DPM-Solver++ (2M) samplers, each one compiled loop over the denoising steps.

`sample(model_fn, x_T, rng, config)` runs every step inside a single `jax.lax.scan`: the timesteps and all per-step
coefficients are arrays computed before the loop, so `model_fn` is traced once and nothing recompiles per step.
Wrap the call in `jax.jit` (the pipelines do) to get one XLA computation for the whole trajectory.

Numerics follow diffusers' `DDIMScheduler` and `DPMSolverMultistepScheduler` (clip_sample=False, thresholding off,
DPM-Solver++ midpoint with lower_order_final and final_sigmas_type="zero"), including their quirks, so that
trajectories match to float32 precision:
- DDIM steps from t to t - T // N (not to the next listed timestep), and past t = 0 uses alpha_cumprod = 1
  (`final_alpha_one`, diffusers' set_alpha_to_one) or alphas_cumprod[0].
- DPM-Solver++ clamps the zero-SNR terminal alpha_cumprod to 2**-24 so that sigma stays finite, takes a first-order
  step first and last, and second-order (2M) steps in between.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from atomo_jax.diffusion import schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

SAMPLERS = ("ddim", "dpmpp2m")
SPACINGS = ("trailing", "leading", "linspace")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Everything that defines a sampling run except the model and the noise. Hashable: usable as a jit static arg."""
    sampler: str = "ddim"
    num_steps: int = 25
    eta: float = 0.0  # DDIM only: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
    timestep_spacing: str = "trailing"
    steps_offset: int = 0  # added to "leading" timesteps (SD 1.5 uses 1).
    prediction_type: str = "v_prediction"
    final_alpha_one: bool = True  # DDIM's alpha_cumprod past t=0 (diffusers set_alpha_to_one).
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    rescale_zero_snr: bool = True

    def __post_init__(self):
        for name, value, allowed in (("sampler", self.sampler, SAMPLERS),
                                     ("timestep_spacing", self.timestep_spacing, SPACINGS),
                                     ("prediction_type", self.prediction_type, schedule.PREDICTION_TYPES)):
            if value not in allowed:
                raise ValueError(f"SamplerConfig.{name}={value!r}: expected one of {allowed}")
        if not 1 <= self.num_steps <= self.num_train_timesteps:
            raise ValueError(f"SamplerConfig.num_steps={self.num_steps}: expected 1..{self.num_train_timesteps}")
        if self.eta < 0:
            raise ValueError(f"SamplerConfig.eta={self.eta}: expected >= 0")
        if self.prediction_type == "epsilon" and self.rescale_zero_snr:
            # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by zero at the terminal step.
            raise ValueError("prediction_type='epsilon' cannot sample a zero-terminal-SNR schedule; "
                             "use v_prediction or rescale_zero_snr=False")

    def alphas_cumprod(self) -> jax.Array:
        return schedule.make_alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end,
                                            self.beta_schedule, self.rescale_zero_snr)


def sd15_epsilon_config(sampler: str = "ddim", num_steps: int = 25, eta: float = 0.0) -> SamplerConfig:
    """The plain Stable Diffusion 1.5 setup (its scheduler_config.json): eps prediction, leading spacing + 1,
    no zero-SNR rescale, set_alpha_to_one=False. Used for the text-to-image first frame of text-to-video."""
    return SamplerConfig(sampler=sampler, num_steps=num_steps, eta=eta, timestep_spacing="leading", steps_offset=1,
                         prediction_type="epsilon", final_alpha_one=False, rescale_zero_snr=False)


def timesteps(config: SamplerConfig) -> np.ndarray:
    """The descending int timesteps visited by the sampler, exactly as diffusers' `set_timesteps` makes them."""
    t_train, n = config.num_train_timesteps, config.num_steps
    # The two diffusers schedulers space "leading" and "linspace" differently (DPM-Solver drops a final point).
    if config.timestep_spacing == "trailing":
        steps = np.round(np.arange(t_train, 0, -t_train / n)) - 1
    elif config.timestep_spacing == "leading":
        if config.sampler == "ddim":
            steps = (np.arange(0, n) * (t_train // n)).round()[::-1]
        else:
            steps = (np.arange(0, n + 1) * (t_train // (n + 1))).round()[::-1][:-1]
        steps = steps + config.steps_offset
    else:
        if config.sampler == "ddim":
            steps = np.linspace(0, t_train - 1, n).round()[::-1]
        else:
            steps = np.linspace(0, t_train - 1, n + 1).round()[::-1][:-1]
    return steps.astype(np.int32)


def _ddim_coefficients(config: SamplerConfig, ts: np.ndarray) -> dict[str, jax.Array]:
    """Per-step arrays for x_prev = a_prev^.5 x0 + (1 - a_prev - std^2)^.5 eps + std z."""
    ac = config.alphas_cumprod()
    prev = ts - config.num_train_timesteps // config.num_steps
    final = jnp.float32(1.0) if config.final_alpha_one else ac[0]
    a_t = ac[ts]
    a_prev = jnp.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = config.eta * jnp.sqrt(variance)
    return dict(a_t=a_t, a_prev=a_prev, std=std)


def _dpm_coefficients(config: SamplerConfig, ts: np.ndarray) -> dict[str, jax.Array]:
    """Per-step arrays for x_next = c_x x + c_0 D0 + c_1 (D0 - D0_prev) (DPM-Solver++ 2M, midpoint)."""
    ac = jnp.maximum(config.alphas_cumprod(), 2.0 ** -24)
    sig = jnp.sqrt((1 - ac[ts]) / ac[ts])
    sig = jnp.concatenate([sig, jnp.zeros((1,), jnp.float32)])  # final_sigmas_type="zero"
    alpha = 1 / jnp.sqrt(sig ** 2 + 1)
    sigma = sig * alpha
    lam = jnp.log(alpha) - jnp.log(sigma)  # +inf at the final sigma 0: exp(-h) -> 0, the step returns D0.
    n = config.num_steps
    h = lam[1:] - lam[:-1]
    c_x = sigma[1:] / sigma[:-1]
    c_0 = -alpha[1:] * (jnp.exp(-h) - 1.0)
    h_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), h[:-1]])  # placeholder for step 0 (first order)
    second_order = (np.arange(n) > 0) & (np.arange(n) < n - 1)
    c_1 = jnp.where(second_order, 0.5 * c_0 * h / h_prev, 0.0)
    return dict(alpha=alpha[:-1], sigma=sigma[:-1], c_x=c_x, c_0=c_0, c_1=c_1)


def sample(model_fn: ModelFn, x_T: jax.Array, rng: jax.Array, config: SamplerConfig) -> jax.Array:
    """Denoises x_T (pure noise, any shape with batch first) to x_0. `model_fn(x_t, t)` gets t as int32 (B,)."""
    return sample_trajectory(model_fn, x_T, rng, config, keep_trajectory=False)[0]


def sample_trajectory(model_fn: ModelFn, x_T: jax.Array, rng: jax.Array, config: SamplerConfig,
                      keep_trajectory: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Like `sample`, also returning every intermediate sample (num_steps, *x_T.shape) (x after each step)."""
    ts = timesteps(config)
    batch = x_T.shape[0]
    xs = dict(t=jnp.asarray(ts), i=jnp.arange(config.num_steps))

    if config.sampler == "ddim":
        xs.update(_ddim_coefficients(config, ts))

        def step(x, c):
            out = model_fn(x, jnp.full((batch,), c["t"], jnp.int32)).astype(jnp.float32)
            x0, eps = schedule.x0_eps(config.prediction_type, x, out, jnp.sqrt(c["a_t"]), jnp.sqrt(1 - c["a_t"]))
            # Clamp: at eta = 1 and zero terminal SNR the direction weight is 0 up to float32 rounding.
            direction = jnp.sqrt(jnp.maximum(1 - c["a_prev"] - c["std"] ** 2, 0.0))
            x_prev = jnp.sqrt(c["a_prev"]) * x0 + direction * eps
            if config.eta > 0:
                noise = jax.random.normal(jax.random.fold_in(rng, c["i"]), x.shape, jnp.float32)
                x_prev = x_prev + c["std"] * noise
            return x_prev, (x_prev if keep_trajectory else None)

        x0, traj = jax.lax.scan(step, x_T.astype(jnp.float32), xs)
        return x0.astype(x_T.dtype), traj

    xs.update(_dpm_coefficients(config, ts))

    def dpm_step(carry, c):
        x, d_prev = carry
        out = model_fn(x, jnp.full((batch,), c["t"], jnp.int32)).astype(jnp.float32)
        d0, _ = schedule.x0_eps(config.prediction_type, x, out, c["alpha"], c["sigma"])
        x_next = c["c_x"] * x + c["c_0"] * d0 + c["c_1"] * (d0 - d_prev)
        return (x_next, d0), (x_next if keep_trajectory else None)

    x = x_T.astype(jnp.float32)
    (x0, _), traj = jax.lax.scan(dpm_step, (x, jnp.zeros_like(x)), xs)
    return x0.astype(x_T.dtype), traj
