"""The pure training step: gradient accumulation over strided micro-batches, clipped AdamW update, non-finite guard,
EMA; and `jit_train_step`, the one place it is jitted with explicit shardings (the trainer and the AOT check share it)."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atomo_jax.diffusion import schedule
from atomo_jax.diffusion.loss import diffusion_loss
from atomo_jax.models import lora
from atomo_jax.parallel import axes
from atomo_jax.parallel import sharding as shd
from atomo_jax.training.optimizer import make_optimizer
from atomo_jax.training.packing import LeafPacker
from atomo_jax.training.state import TrainState, merge


def sharded_global_norm(tree: Any, shardings: Any, mesh: Mesh) -> jax.Array:
    """Global L2 norm of a sharded tree as one explicit scalar all-reduce (shard_map + psum).

    Each device sums the squares of its own shards of every leaf, divided by how many devices hold a copy of that
    shard, then one psum over the whole mesh adds the partial sums. The result is exact for any layout and costs a
    single scalar collective, where the implicit form reduces leaf by leaf.
    """
    specs = jax.tree.map(lambda s: s.spec, shardings, is_leaf=lambda s: isinstance(s, NamedSharding))

    def copies(spec: P) -> int:
        used = {a for part in spec if part for a in (part if isinstance(part, tuple) else (part,))}
        return math.prod(n for a, n in mesh.shape.items() if a not in used)

    def local(t):
        parts = [jnp.sum(jnp.square(x.astype(jnp.float32))) / copies(s)
                 for x, s in zip(jax.tree.leaves(t), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)))]
        return jax.lax.psum(sum(parts, jnp.zeros((), jnp.float32)), mesh.axis_names)

    # check_vma=False: the psum deliberately spans axes a leaf is replicated over (each copy adds its share).
    return jnp.sqrt(jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False)(tree))


def clip_by_norm(grads: Any, norm: jax.Array, max_norm: float) -> Any:
    """optax.clip_by_global_norm's rule, given the norm (computed once for clipping, logging and the guard)."""
    if max_norm <= 0:
        return grads
    return jax.tree.map(lambda g: jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), grads)


def strided_micro_batches(tree: Any, accum: int, mesh: Mesh, batch_spec: P) -> Any:
    """(B, ...) leaves -> (accum, B/accum, ...): micro-batch i holds rows i, i + accum, i + 2 accum, ... (as
    MaxText's gradient accumulation), so with the batch split over devices in contiguous blocks every micro-batch
    keeps 1/accum of each device's rows and stays on every device. The contiguous split (reshape to (accum, B/accum))
    would put micro-batch i on 1/accum of the devices and move the batch between devices every step."""

    def split(x):
        y = jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
        spec = P(None, *batch_spec, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

    return jax.tree.map(split, tree)


def train_step(state: TrainState, batch: dict, *, model: Any, tx: optax.GradientTransformation,
               alphas_cumprod: jax.Array, config: ml_collections.ConfigDict, mesh: Mesh, grad_shardings: Any,
               batch_spec: P, null_tokens: jax.Array | None = None,
               packer: LeafPacker | None = None) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch; `config.train.grad_accum` splits it into sequential micro-batches
    (strided: see `strided_micro_batches`). Every example draws its randomness from its own key, so the gradient
    does not depend on the split. Only `state.trainable` is differentiated: frozen parameters get no weight
    gradients and no optimizer state. With `packer`, the state is in its packed form (training/packing.py) and
    `grad_shardings` are the packed ones. `batch_spec`: P(mesh axes of the batch's leading axis)."""
    accum = int(config.train.grad_accum)
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    b = jax.tree.leaves(batch)[0].shape[0]
    keys = jax.lax.with_sharding_constraint(jax.random.split(step_rng, b), NamedSharding(mesh, batch_spec))
    # The gradient is taken with respect to the ordinary tree, then packed by one concatenation: differentiating
    # the slices of the packed vector would add ~1,000 padded copies of it.
    trainable_tree = packer.unpack(state.trainable) if packer else state.trainable

    rules = axes.rules_from_config(config.mesh.rules)
    lora_spec = lora.LoraSpec.from_config(config.train.lora)

    def loss_fn(trainable, micro, k):
        params = {**state.frozen, "unet": merge(trainable, state.frozen["unet"])}
        # LoRA factors (if any) are applied on the fly: the frozen kernels' weight gradients are never formed.
        with shd.activation_layout(mesh, rules), lora.applied(lora_spec, keys=k):
            return diffusion_loss(model, params, micro, k, alphas_cumprod, config.diffusion, config.cond_drop,
                                  null_tokens)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, aux), grads = grad_fn(trainable_tree, batch, keys)
    else:
        micro = strided_micro_batches((batch, keys), accum, mesh, batch_spec)

        def body(carry, xs):
            g_sum, l_sum, m_sum = carry
            # The loop body's slice keeps the batch split (sharding propagation into a while loop may lose it).
            xs = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, P(*batch_spec, *([None] * (x.ndim - 1))))), xs)
            (l, a), g = grad_fn(trainable_tree, *xs)
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, m_sum + a["mse"]), None

        zeros = jax.tree.map(jnp.zeros_like, trainable_tree)
        (grads, loss, mse), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss, aux = loss / accum, {"mse": mse / accum}
    if packer:
        grads = packer.pack(grads)

    grad_norm = sharded_global_norm(grads, grad_shardings, mesh)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    grads = clip_by_norm(grads, grad_norm, float(config.train.grad_clip))
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


def batch_shardings(batch: dict, mesh: Mesh, rules: Any) -> dict:
    """Every batch entry split on its leading axis as the rules map `batch`."""
    return {k: shd.batch_sharding(mesh, rules, len(v.shape)) for k, v in batch.items()}


def alphas_cumprod_from(config: ml_collections.ConfigDict) -> jax.Array:
    d = config.diffusion
    return schedule.make_alphas_cumprod(int(d.num_train_timesteps), float(d.beta_start), float(d.beta_end),
                                        d.beta_schedule, bool(d.rescale_zero_snr))


def jit_train_step(config: ml_collections.ConfigDict, model: Any, mesh: Mesh, state_sh: TrainState,
                   batch_sh: dict, null_tokens: jax.Array | None = None, auto_state_layouts: bool = False,
                   packer: LeafPacker | None = None, state_formats: Any = None):
    """`train_step` under jit with explicit in/out shardings; the incoming state is donated (updated in place).

    `auto_state_layouts`: the compiler picks the state's memory layouts (the same on the way in and out, so the
    donation holds), e.g. the layouts cuDNN/cuBLAS give weight gradients, instead of transposing the state to and
    from row-major every step. Such a step must be compiled ahead (`.lower(...).compile()`) and the state placed
    with `jax.device_put(state, compiled.input_formats[0][0])`, as the trainer does (`config.train.auto_layouts`).
    `packer`: the state (and `state_sh`) are in packed form (training/packing.py). `state_formats`: the state's
    formats as another compiled step chose them (`compiled.input_formats[0][0]`), so steps of several batch shapes
    (buckets) share one state layout.
    """
    batch_spec = P(next(iter(batch_sh.values())).spec[0])  # the leading (batch) axis's mesh axes
    fn = functools.partial(train_step, model=model, tx=make_optimizer(config.train),
                           alphas_cumprod=alphas_cumprod_from(config), config=config, mesh=mesh,
                           grad_shardings=state_sh.trainable, batch_spec=batch_spec, null_tokens=null_tokens,
                           packer=packer)
    state_in = state_sh
    if state_formats is not None:
        state_in = state_formats
    elif auto_state_layouts:
        state_in = jax.tree.map(lambda s: Format(Layout.AUTO, s), state_sh,
                                is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    return jax.jit(fn, in_shardings=(state_in, batch_sh), out_shardings=(state_in, shd.replicated(mesh)),
                   donate_argnums=(0,))


def canonical_formats(state: Any) -> Any:
    """Row-major formats with each leaf's own sharding: where a state in compiler-chosen layouts goes back to before
    it is saved or sampled from."""
    return jax.tree.map(lambda x: Format(Layout(tuple(range(x.ndim))), x.sharding), state)
