"""optax AdamW with warmup + cosine/constant learning rate.

Global-norm clipping (config.train.grad_clip) happens in the train step, which computes the norm once for clipping,
logging and the non-finite guard (see `train_step.clip_by_norm`)."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    warmup = int(train.warmup_steps)
    peak = float(train.learning_rate)
    if train.lr_schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                                    [max(warmup, 1)])
    if train.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(int(train.num_steps), warmup + 1),
                                                  end_value=peak * 0.01)
    raise ValueError(f"config.train.lr_schedule={train.lr_schedule!r}: expected 'constant' or 'cosine'")


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adamw(learning_rate_schedule(train), b1=float(train.adam_b1), b2=float(train.adam_b2),
                       eps=float(train.adam_eps), weight_decay=float(train.weight_decay))
