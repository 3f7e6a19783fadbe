"""The train step on 8 fake CPU devices (fsdp 8): gradient accumulation over 2 strided micro-batches gives the
one-batch gradients and moves no data between devices beyond what one micro-batch step moves (the contiguous split
moves the pixel batch, and the check sees it); the EMA update is the textbook recurrence.

Runs in a subprocess: XLA_FLAGS must set the device count before jax starts. Tolerances: loss and gradient norm
relative 1e-5, updated parameters relative 1e-5 (fp32; only the order of the sums differs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ops that move array data between devices other than the parameter all-gathers / gradient reductions of fsdp.
# A collective in the compiled step, as (op, result shape): the census of what moves between devices.
COLLECTIVE = re.compile(r"= (\S+?)(?:\{[^}]*\})? (all-to-all|collective-permute|all-gather|all-reduce|reduce-scatter)"
                        r"(?:-start)?\(")


def census(hlo: str) -> list[list[str]]:
    return sorted({(m.group(2), m.group(1)) for m in COLLECTIVE.finditer(hlo)})


def _child() -> dict:
    import jax
    import numpy as np
    from atomo_jax.models.atomo import build_model
    from atomo_jax.parallel import axes
    from atomo_jax.parallel.mesh import make_mesh
    from atomo_jax.training import train_step as ts
    from atomo_jax.training.setup import init_train_state, state_shardings
    from configs import demo
    from data_pipelines.loader import make_loader

    c = demo.get_config()
    # One UNet level: every layer kind once (resnet, spatial + IP attention, temporal conv, motion module). The test
    # is about what micro-batches move, not depth, and an 8-device compile takes 20 s instead of the demo's 48 s.
    c.model.unet.update(dict(block_out_channels=(32,), down_attention=(True,)))
    c.data.update(dict(num_frames=2, resolution=16, num_videos=64))
    c.train.update(dict(batch_size=16, grad_clip=0.0, weight_decay=0.0, ema_decay=0.9, warmup_steps=0))
    c.cond_drop.image = 0.3  # some examples dropped: their dropout draws must not depend on the split either
    c.mesh.update(dict(data=1, fsdp=8))
    model = build_model(c.model)
    rules = axes.rules_from_config(c.mesh.rules)
    mesh = make_mesh(c.mesh)
    batch = next(iter(make_loader(c.data, global_batch_size=16, seed=0, shard_index=0, shard_count=1)))
    batch = {k: np.asarray(batch[k]) for k in ("video", "cond_image", "mask")}
    flat = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    out = {}
    with jax.set_mesh(mesh):
        sh = state_shardings(c, model, mesh, rules)
        bsh = ts.batch_shardings(batch, mesh, rules)
        state0 = jax.tree.map(np.asarray, init_train_state(c, model, sh))
        device_batch = jax.device_put(batch, bsh)
        results = {}
        for accum in (1, 2):
            ca = c.copy_and_resolve_references()
            ca.train.grad_accum = accum
            step = ts.jit_train_step(ca, model, mesh, sh, bsh).lower(jax.device_put(state0, sh),
                                                                     device_batch).compile()
            results[accum] = step(jax.device_put(state0, sh), device_batch)
            if accum == 2:
                out["collectives_accum2"] = census(step.as_text())

        def compiled(micro_batch: int, accum: int) -> str:
            ca = c.copy_and_resolve_references()
            ca.train.update(dict(batch_size=micro_batch * accum, grad_accum=accum))
            half = {k: v[:micro_batch * accum] for k, v in batch.items()}
            hb = ts.batch_shardings(half, mesh, rules)
            return ts.jit_train_step(ca, model, mesh, sh, hb).lower(jax.device_put(state0, sh),
                                                                     jax.device_put(half, hb)).compile().as_text()

        # What one micro-batch of 8 moves anyway (parameter all-gathers, gradient reductions, the model's own
        # activation collectives at one example per device): the accumulated step may move nothing else.
        out["collectives_one_micro_batch"] = census(compiled(8, 1))
        # The check can fail: the contiguous split (micro-batch i = rows [i B/2, (i+1) B/2)) reshards every step.
        strided = ts.strided_micro_batches
        ts.strided_micro_batches = lambda tree, accum, mesh_, spec: jax.tree.map(
            lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), tree)
        try:
            out["collectives_contiguous"] = census(compiled(8, 2))
        finally:
            ts.strided_micro_batches = strided

    (s1, m1), (s2, m2) = results[1], results[2]
    rel = lambda a, b: float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b)))
                             / np.sqrt(sum(np.sum(y ** 2) for y in b)))
    out["loss"] = [float(m1["loss"]), float(m2["loss"])]
    out["grad_norm"] = [float(m1["grad_norm"]), float(m2["grad_norm"])]
    out["trainable_rel"] = rel(flat(s2.trainable), flat(s1.trainable))
    out["update_rel"] = rel(flat(s1.trainable), flat(state0.trainable))  # how far one step moved them
    # EMA: e1 = d e0 + (1 - d) p1, by hand in float64.
    want = [0.9 * e + 0.1 * p for e, p in zip(flat(state0.ema), flat(s1.trainable))]
    out["ema_max_err"] = max(float(np.max(np.abs(g - w))) for g, w in zip(flat(s1.ema), want))
    out["ema_moved"] = max(float(np.max(np.abs(g - e))) for g, e in zip(flat(s1.ema), flat(state0.ema)))
    return out


def test_grad_accum_strided_matches_one_batch_and_keeps_batch_on_devices(tmp_path):
    from tests.conftest import cli_env  # here, not at the top: this file also runs as the child script

    out_file = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, __file__, str(out_file)], cwd=ROOT, env=cli_env(8),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(out_file.read_text())
    (l1, l2), (g1, g2) = out["loss"], out["grad_norm"]
    assert abs(l2 - l1) <= 1e-5 * abs(l1), out
    assert abs(g2 - g1) <= 1e-5 * abs(g1), out
    assert out["trainable_rel"] < 1e-5 and out["update_rel"] > 1e-4, out
    base = {tuple(c) for c in out["collectives_one_micro_batch"]}
    scalar = lambda c: "[]" in c[1]  # the loss/norm sums over the micro-batches
    extra = [c for c in map(tuple, out["collectives_accum2"]) if c not in base and not scalar(c)]
    assert not extra, f"the strided micro-batches move data one micro-batch alone does not: {extra}"
    moved = [c for c in map(tuple, out["collectives_contiguous"]) if c not in base and not scalar(c)]
    assert any(",16,16,3]" in shape for _, shape in moved), moved  # the check sees the contiguous split's pixels
    # EMA after one step: e1 = 0.9 e0 + 0.1 p1 (float32 arithmetic vs float64 reference), and it moved.
    assert out["ema_max_err"] < 1e-6 and out["ema_moved"] > 1e-5, out


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    with open(sys.argv[1], "w") as f:
        json.dump(_child(), f)
