"""Noise schedule of the training process: SD 1.5 betas, optionally rescaled to zero terminal SNR, and v-prediction.

Formulas follow diffusers (the numeric reference): betas "scaled_linear" = linspace(sqrt(b0), sqrt(b1), T)^2;
zero-SNR rescale (Lin et al. 2023) shifts and scales sqrt(alphas_cumprod) so the last step has signal 0 exactly.
The schedule is computed in float32 with numpy, as diffusers computes it in torch (float32 linspace, cumprod).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def make_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
               beta_schedule: str = "scaled_linear") -> np.ndarray:
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float32) ** 2
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    raise ValueError(f"beta_schedule={beta_schedule!r}: expected 'scaled_linear' or 'linear'")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales betas so that the final timestep has SNR exactly 0 (signal coefficient 0)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, axis=0))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(betas.dtype)


def make_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                        beta_schedule: str = "scaled_linear", rescale_zero_snr: bool = True) -> jnp.ndarray:
    """alphas_cumprod[t] = prod_{s<=t} (1 - beta_s), shape (T,), float32."""
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
    if rescale_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return jnp.asarray(np.cumprod(1.0 - betas, axis=0), dtype=jnp.float32)


def _coeffs(alphas_cumprod: jax.Array, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    abar = alphas_cumprod[t].astype(jnp.float32)
    shape = abar.shape + (1,) * (ndim - abar.ndim)
    return jnp.sqrt(abar).reshape(shape), jnp.sqrt(1.0 - abar).reshape(shape)


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; t is an int array of shape (B,)."""
    a, s = _coeffs(alphas_cumprod, t, x0.ndim)
    return a * x0 + s * noise


def v_target(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    a, s = _coeffs(alphas_cumprod, t, x0.ndim)
    return a * noise - s * x0


PREDICTION_TYPES = ("v_prediction", "epsilon")


def x0_eps(prediction_type: str, x_t: jax.Array, out: jax.Array, a: jax.Array,
           s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model output, given the signal and noise coefficients a = sqrt(abar_t), s = sqrt(1 - abar_t).

    v: x0 = a x_t - s v, eps = s x_t + a v (the inverse of `v_target`); epsilon: x0 = (x_t - s eps) / a."""
    if prediction_type == "v_prediction":
        return a * x_t - s * out, a * out + s * x_t
    if prediction_type == "epsilon":
        return (x_t - s * out) / a, out
    raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")


def x0_eps_from_v(alphas_cumprod: jax.Array, x_t: jax.Array, v: jax.Array,
                  t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x0_eps` for a v output at integer timesteps t (B,)."""
    return x0_eps("v_prediction", x_t, v, *_coeffs(alphas_cumprod, t, x_t.ndim))


def snr(alphas_cumprod: jax.Array, t: jax.Array) -> jax.Array:
    abar = alphas_cumprod[t]
    return abar / (1.0 - abar)
