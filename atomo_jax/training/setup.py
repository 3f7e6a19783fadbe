"""Builds the train state abstractly (no allocation), its shardings on a mesh, and the state itself."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from atomo_jax.parallel import sharding as shd
from atomo_jax.training.optimizer import make_optimizer
from atomo_jax.training.state import TrainState, split_trainable


def boxed_abstract_params(model: Any) -> dict:
    """Shapes + logical axis names of every parameter, without allocating any. Parameter shapes do not depend on the
    input size, so the model is initialised at its smallest input (AtomoVideo.init says why)."""
    return jax.eval_shape(model.init, jax.random.key(0))


def _state_from_params(params: dict, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
    trainable, frozen_unet = split_trainable(params["unet"], config.train.trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen={**params, "unet": frozen_unet},
                      opt_state=tx.init(trainable), ema=jax.tree.map(jnp.copy, trainable),
                      rng=jax.random.key_data(rng), skipped_steps=jnp.zeros((), jnp.int32))


def abstract_train_state(config: ml_collections.ConfigDict, model: Any) -> TrainState:
    tx = make_optimizer(config.train)
    params = nn.unbox(boxed_abstract_params(model))
    return jax.eval_shape(lambda p: _state_from_params(p, config, tx, jax.random.key(0)), params)


def state_shardings(config: ml_collections.ConfigDict, model: Any, mesh: Mesh, rules) -> TrainState:
    tx = make_optimizer(config.train)
    param_sh = shd.param_shardings(boxed_abstract_params(model), mesh, rules)
    trainable_sh, frozen_unet_sh = split_trainable(param_sh["unet"], config.train.trainable)
    abstract = abstract_train_state(config, model)
    rep = shd.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, trainable_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, trainable=trainable_sh, frozen={**param_sh, "unet": frozen_unet_sh},
                      opt_state=opt_sh, ema=trainable_sh, rng=rep, skipped_steps=rep)


def init_train_state(config: ml_collections.ConfigDict, model: Any, shardings: TrainState,
                     init_params: dict | None = None) -> TrainState:
    """Random init (or `init_params`, e.g. a composed pretrained checkpoint) placed directly with `shardings`."""
    tx = make_optimizer(config.train)
    rng = jax.random.key(int(config.seed))
    r_init, r_state = jax.random.split(rng)
    if init_params is None:
        def create(r1, r2):
            params = nn.unbox(model.init(r1))
            return _state_from_params(params, config, tx, r2)
        return jax.jit(create, out_shardings=shardings)(r_init, r_state)
    return jax.jit(lambda p, r: _state_from_params(p, config, tx, r), out_shardings=shardings)(init_params, r_state)


def validate(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Values that must agree with each other and with the mesh; the trainer and the AOT fit check both call it."""
    b = int(config.train.batch_size)
    accum = int(config.train.grad_accum)
    if accum < 1:
        raise ValueError(f"config.train.grad_accum={accum}: expected >= 1")
    frames, limit = int(config.data.num_frames), int(config.model.unet.motion_max_seq_length)
    if not 1 <= frames <= limit:
        raise ValueError(f"config.data.num_frames={frames}: expected 1..{limit} (the temporal position table, "
                         "config.model.unet.motion_max_seq_length)")
    vae = config.model.vae
    factor = int(vae.factor) if vae.kind == "pixel" else 2 ** (len(vae.block_out_channels) - 1)
    multiple = factor * 2 ** (len(config.model.unet.block_out_channels) - 1)
    if int(config.data.resolution) < multiple or int(config.data.resolution) % multiple:
        raise ValueError(f"config.data.resolution={config.data.resolution}: expected a multiple of {multiple} "
                         f"(autoencoder factor {factor} x 2^UNet down-samplings)")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if b <= 0 or b % accum:
        raise ValueError(f"config.train.batch_size={b} must be positive and divisible by grad_accum={accum}")
    if (b // accum) % shards:
        raise ValueError(f"config.train.batch_size={b} (per micro-batch {b // accum}) must be divisible by the "
                         f"data x fsdp mesh size {shards}")
    if b % jax.process_count():
        raise ValueError(f"config.train.batch_size={b} must be divisible by the process count {jax.process_count()}")
    if config.train.nonfinite not in ("skip", "stop"):
        raise ValueError(f"config.train.nonfinite={config.train.nonfinite!r}: expected 'skip' or 'stop'")
    if int(config.checkpoint.every_steps) < 0:
        raise ValueError("config.checkpoint.every_steps must be >= 0")
