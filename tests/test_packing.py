"""Small trainable leaves packed into one vector (training/packing.py): which leaves are packed, the exact round trip
of the whole train state, and the packed train step against the leaf-by-leaf one on conftest's one-level TINY_DEMO
model (1 CPU device).

Tolerance for the step comparison: losses and gradient norms to 1e-6 relative, parameters / Adam moments / EMA to
1e-6 relative L2 after three AdamW steps (fp32; the packed form sums the gradient norm in another order, otherwise
the same elementwise arithmetic).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atomo_jax.models.atomo import build_model
from atomo_jax.parallel import axes
from atomo_jax.parallel.mesh import make_mesh
from atomo_jax.parallel.sharding import replicated
from atomo_jax.training.packing import LeafPacker, Packed, packer_from_config
from atomo_jax.training.setup import abstract_train_state, init_train_state, state_shardings
from atomo_jax.training.train_step import batch_shardings, jit_train_step
from tests.conftest import tiny_demo_config


def _config():
    c = tiny_demo_config()  # one UNet level: every layer kind once
    c.mesh.data = 1
    c.cond_drop.image = 0.5  # both dropout branches within three steps
    return c


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_packs_small_replicated_float32_leaves_only():
    tree = {"bias": jnp.zeros((8,)), "kernel": jnp.zeros((64, 64)), "norm": {"scale": jnp.ones((4, 2))},
            "sharded_bias": jnp.zeros((8,)), "step_count": jnp.zeros((3,), jnp.int32)}
    rep = types.SimpleNamespace(is_fully_replicated=True)
    sharded = types.SimpleNamespace(is_fully_replicated=False)
    shardings = {"bias": rep, "kernel": rep, "norm": {"scale": rep}, "sharded_bias": sharded, "step_count": rep}
    packer = LeafPacker.for_trainable(tree, shardings, max_size=100)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert {n for n, p in zip(names, packer.packed) if p} == {"['bias']", "['norm']['scale']"}
    packed = packer.pack(tree)
    assert packed.small.shape == (16,) and len(packed.large) == 3
    assert not any(LeafPacker.for_trainable(tree, shardings, max_size=0).packed)


def test_train_state_round_trip_is_exact_and_keeps_large_leaves():
    c = _config()
    model = build_model(c.model)
    mesh = make_mesh(c.mesh, devices=jax.devices()[:1])
    sh = state_shardings(c, model, mesh, axes.rules_from_config(None))
    state = init_train_state(c, model, sh)
    packer, step_sh = packer_from_config(c, abstract_train_state(c, model), sh, replicated(mesh))
    assert packer is not None and 0 < packer.num_packed < len(packer.packed)
    packed = jax.device_put(packer.pack_state(state), step_sh)
    assert isinstance(packed.trainable, Packed) and isinstance(packed.ema, Packed)
    assert isinstance(packed.opt_state[0].mu, Packed) and isinstance(packed.opt_state[0].nu, Packed)
    back = packer.unpack_state(packed)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    a, b = _flat(back), _flat(state)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Large leaves are handed on, not copied (no second copy of a 1.4 B-parameter state at checkpoint time).
    large = [x for x, p in zip(jax.tree.leaves(state.trainable), packer.packed) if not p]
    assert all(x is y for x, y in zip(large, packed.trainable.large))


def test_packed_step_matches_leaf_by_leaf_step():
    from data_pipelines.loader import make_loader
    c = _config()
    model = build_model(c.model)
    rules = axes.rules_from_config(None)
    mesh = make_mesh(c.mesh, devices=jax.devices()[:1])
    it = iter(make_loader(c.data, global_batch_size=2, seed=0, shard_index=0, shard_count=1))
    batches = [{k: np.asarray(b[k]) for k in ("video", "cond_image", "mask")} for b in (next(it) for _ in range(3))]
    bsh = batch_shardings(batches[0], mesh, rules)
    sh = state_shardings(c, model, mesh, rules)
    initial = jax.tree.map(np.asarray, init_train_state(c, model, sh))

    def run(pack: bool):
        c.train.pack_small_leaves = 16384 if pack else 0
        packer, step_sh = packer_from_config(c, abstract_train_state(c, model), sh, replicated(mesh))
        state = jax.device_put(initial, sh)
        if packer:
            state = jax.device_put(packer.pack_state(state), step_sh)
        step = jit_train_step(c, model, mesh, step_sh, bsh, packer=packer)
        metrics = []
        for b in batches:
            state, m = step(state, jax.device_put(b, bsh))
            metrics.append((float(m["loss"]), float(m["grad_norm"])))
        return (packer.unpack_state(state) if packer else state), metrics

    ref, ref_m = run(False)
    got, got_m = run(True)
    np.testing.assert_allclose(got_m, ref_m, rtol=1e-6)
    for part in ("trainable", "ema", "opt_state"):
        a, b = _flat(getattr(got, part)), _flat(getattr(ref, part))
        assert a.keys() == b.keys()
        num = np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a))
        den = np.sqrt(sum(np.sum(b[k].astype(np.float64) ** 2) for k in a))
        assert num / den < 1e-6, (part, num / den)
    moved = _flat(got.trainable)
    start = _flat(initial.trainable)
    assert sum(not np.array_equal(moved[k], start[k]) for k in moved) > len(moved) // 2  # the steps did update


@pytest.mark.parametrize("value", [0, -1])
def test_packing_off(value):
    c = _config()
    c.train.pack_small_leaves = value
    model = build_model(c.model)
    mesh = make_mesh(c.mesh, devices=jax.devices()[:1])
    sh = state_shardings(c, model, mesh, axes.rules_from_config(None))
    packer, step_sh = packer_from_config(c, abstract_train_state(c, model), sh, replicated(mesh))
    assert packer is None and step_sh is sh
