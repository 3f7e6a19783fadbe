"""optax AdamW with warmup + cosine/constant learning rate.

Global-norm clipping (config.train.grad_clip) happens in the train step, which computes the norm once for clipping,
logging and the non-finite guard (see `train_step.clip_by_norm`)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Learning rate of optimizer step `count` (0-based): linear warmup reaching the peak at step `warmup_steps`
    (step 1 already trains, at peak / warmup_steps; warmup_steps=0: the peak from step 1), then constant or cosine
    decay to 1% of the peak at `num_steps`. The values are checked by `training.setup.validate`."""
    warmup = int(train.warmup_steps)
    peak = float(train.learning_rate)
    decay = optax.cosine_decay_schedule(peak, max(int(train.num_steps) - warmup, 1), alpha=0.01)

    def schedule(count):
        ramp = jnp.minimum(1.0, (count + 1) / warmup) if warmup else 1.0
        if train.lr_schedule == "constant":
            return peak * ramp
        return jnp.where(count < warmup, peak * ramp, decay(count - warmup))

    return schedule


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adamw(learning_rate_schedule(train), b1=float(train.adam_b1), b2=float(train.adam_b2),
                       eps=float(train.adam_eps), weight_decay=float(train.weight_decay))
