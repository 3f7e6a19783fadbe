"""The pure training step: gradient accumulation over micro-batches, AdamW update, non-finite guard, EMA."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from atomo_jax.diffusion.loss import diffusion_loss
from atomo_jax.training.state import TrainState, merge


def train_step(state: TrainState, batch: dict, *, model: Any, tx: optax.GradientTransformation,
               alphas_cumprod: jax.Array, config: ml_collections.ConfigDict,
               null_tokens: jax.Array | None = None) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch; `config.train.grad_accum` splits it into sequential micro-batches."""
    accum = int(config.train.grad_accum)
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

    def loss_fn(trainable, micro, r):
        params = {**state.frozen, "unet": merge(trainable, state.frozen["unet"])}
        return diffusion_loss(model, params, micro, r, alphas_cumprod, config.diffusion, config.cond_drop,
                              null_tokens)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, aux), grads = grad_fn(state.trainable, batch, step_rng)
    else:
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

        def body(carry, xs):
            g_sum, l_sum, m_sum = carry
            mb, r = xs
            (l, a), g = grad_fn(state.trainable, mb, r)
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, m_sum + a["mse"]), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (grads, loss, mse), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, jax.random.split(step_rng, accum)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss, aux = loss / accum, {"mse": mse / accum}

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    trainable, opt_state = keep(trainable, state.trainable), keep(opt_state, state.opt_state)
    decay = float(config.train.ema_decay)
    ema = jax.tree.map(lambda e, p: jnp.where(finite, decay * e + (1.0 - decay) * p, e), state.ema, trainable)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema,
                              rng=jax.random.key_data(rng),
                              skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "mse": aux["mse"], "grad_norm": grad_norm, "finite": finite}
    return new_state, metrics


def make_train_step(**kwargs: Any):
    return functools.partial(train_step, **kwargs)
