"""The train step on 8 fake CPU devices, in one child process (one start, one set of compiles for both halves):
- data-parallel, fsdp and fsdp+tensor layouts train like one device, parameters are sharded as the logical-axis
  rules say, activations keep their batch split, and a checkpoint saved on one device restores onto an 8-device fsdp
  mesh;
- gradient accumulation over 2 strided micro-batches (fsdp 8) gives the one-batch gradients and moves no data
  between devices beyond what one micro-batch step moves (the contiguous split moves the pixel batch, and the check
  sees it); the EMA update is the textbook recurrence.

Runs in a subprocess: XLA_FLAGS must set the device count before jax starts, and other tests in this pytest process
may already have started jax with one device.
Tolerances (fp32; only the order of the sums and cross-device reductions differs): relative L2 error
(||a-b||/||b||) < 1e-5 for losses and < 1e-4 for the updated parameters after two AdamW steps across layouts; loss,
gradient norm and updated parameters relative 1e-5 between accumulated and one-batch steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A collective in the compiled step, as (op, result shape): the census of what moves between devices.
COLLECTIVE = re.compile(r"= (\S+?)(?:\{[^}]*\})? (all-to-all|collective-permute|all-gather|all-reduce|reduce-scatter)"
                        r"(?:-start)?\(")
LAYOUTS = {"data8": dict(data=8, fsdp=1, tensor=1), "fsdp8": dict(data=1, fsdp=8, tensor=1),
           "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2)}


def small_config():
    # conftest's one-level TINY_DEMO (every layer kind once): the layouts and shardings are the same per layer at any
    # depth, and each of its seven compiles (the init and six train steps) takes a fraction of the demo's time.
    from tests.conftest import tiny_demo_config
    c = tiny_demo_config()
    c.train.update(dict(batch_size=8, grad_clip=0.0, weight_decay=0.0, ema_decay=0.9, warmup_steps=0))
    # Some examples dropped: the dropout path runs, and its draws must depend neither on the layout nor the split.
    c.cond_drop.image = 0.3
    return c


def census(hlo: str) -> list[list[str]]:
    return sorted({(m.group(2), m.group(1)) for m in COLLECTIVE.finditer(hlo)})


def activation_layout(lowered: str, compiled: str) -> dict:
    """What the step does with its activations: how many (B, F, H, W, C) layouts the model pins (sharding
    constraints on 5-D values with a split leading axis in the lowered program), and the op names of every
    all-gather of a value of rank >= 3 along its leading axis in the compiled one. Parameters are never split on
    their leading axis (conv kernels are split on channels), so such a gather is an activation losing its batch
    split."""
    pinned = len(re.findall(r'sdy\.sharding_constraint %\S+ <@\w+, \[\{"[^}]*\}, (?:\{[^}]*\}, ){3}\{[^}]*\}\]>',
                            lowered))
    gathers = []
    for line in compiled.splitlines():
        m = re.search(r"= \w+\[([\d,]+)\]\S* all-gather\(.*?dimensions=\{(\d+)\}", line)
        if m and m.group(1).count(",") >= 2 and m.group(2) == "0":
            op = re.search(r'op_name="([^"]+)"', line)
            gathers.append(op.group(1) if op else line.strip()[:200])
    return {"pinned_video_layouts": pinned, "batch_gathers": gathers}


def _child(workdir: str) -> dict:
    import jax
    import numpy as np
    from atomo_jax.models.atomo import build_model
    from atomo_jax.parallel import axes
    from atomo_jax.parallel.mesh import make_mesh
    from atomo_jax.training import train_step as ts
    from atomo_jax.training.checkpoint import Checkpointer
    from atomo_jax.training.setup import abstract_train_state, init_train_state, state_shardings
    from atomo_jax.training.train_step import batch_shardings, jit_train_step
    from jax.sharding import NamedSharding, PartitionSpec as P
    from data_pipelines.loader import make_loader

    config = small_config()
    model = build_model(config.model)
    rules = axes.rules_from_config(config.mesh.rules)
    loader = make_loader(config.data, global_batch_size=8, seed=0, shard_index=0, shard_count=1)
    it = iter(loader)
    batches = [{k: np.asarray(b[k]) for k in ("video", "cond_image", "mask")} for b in (next(it), next(it))]

    flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                         for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    saved = {}

    def run(devices, layout, save_initial=False):
        c = config.copy_and_resolve_references()
        c.mesh.update(layout)
        c.checkpoint.async_save = False
        mesh = make_mesh(c.mesh, devices=devices)
        sh = state_shardings(c, model, mesh, rules)
        # Every layout starts from the one-device initial state, placed with its own shardings (one init compile).
        state = init_train_state(c, model, sh) if save_initial else jax.device_put(saved["initial"], sh)
        if save_initial:  # the one-device initial state: reference for the update size and the restore below
            saved["initial"] = jax.tree.map(np.asarray, state)
            ckpt = Checkpointer(workdir, c.checkpoint)
            ckpt.save(3, state, iter(loader), c, {"skipped_samples": 7})
            ckpt.close()
        bsh = batch_shardings(batches[0], mesh, rules)
        lowered = jit_train_step(c, model, mesh, sh, bsh).lower(state, jax.device_put(batches[0], bsh))
        step = lowered.compile()
        layout = {**activation_layout(lowered.as_text(), step.as_text()), "collectives": census(step.as_text())}
        losses, norms = [], []
        for b in batches:
            state, m = step(state, jax.device_put(b, bsh))
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
        return state, losses, norms, mesh, sh, layout

    ref_state, ref_losses, ref_norms, _, _, _ = run(jax.devices()[:1], dict(data=1, fsdp=1, tensor=1), True)
    ref = flat(ref_state.trainable)
    init_ref = flat(saved["initial"].trainable)
    out = {"single": {"losses": ref_losses, "grad_norms": ref_norms,
                      "update_norm": float(np.sqrt(sum(np.sum((ref[k] - init_ref[k]) ** 2) for k in ref)))}}
    for name, layout in LAYOUTS.items():
        state, losses, norms, mesh, sh, activations = run(jax.devices(), layout)
        got = flat(state.trainable)
        num = np.sqrt(sum(np.sum((got[k] - ref[k]) ** 2) for k in ref))
        den = np.sqrt(sum(np.sum(ref[k] ** 2) for k in ref))
        upd = np.sqrt(sum(np.sum((got[k] - ref[k]) ** 2) for k in ref))
        leaves = jax.tree_util.tree_flatten_with_path(state.trainable)[0]
        specs = {"/".join(str(getattr(k, "key", k)) for k in path): [str(s) for s in v.sharding.spec]
                 for path, v in leaves}
        shard_shapes = {"/".join(str(getattr(k, "key", k)) for k in path):
                        [list(v.shape), list(v.addressable_shards[0].data.shape)] for path, v in leaves}
        mu = state.opt_state[0].mu
        mu_specs = {"/".join(str(getattr(k, "key", k)) for k in path): [str(s) for s in v.sharding.spec]
                    for path, v in jax.tree_util.tree_flatten_with_path(mu)[0]}
        out[name] = {"losses": losses, "grad_norms": norms, "param_rel": float(num / den),
                     "update_diff": float(upd), "specs": specs, "shard_shapes": shard_shapes, "mu_specs": mu_specs,
                     "mesh": dict(mesh.shape), "activations": activations}
        if name == "fsdp8":
            mesh8, sh8 = mesh, sh

    # Saved on one device (above), restored onto the 8-device fsdp mesh.
    state1 = saved["initial"]
    c8 = config.copy_and_resolve_references()
    c8.mesh.update(LAYOUTS["fsdp8"])
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_train_state(c8, model), sh8)
    restored, counters = Checkpointer(workdir, c8.checkpoint).restore(3, target, iter(loader))
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(restored)))
    placed = all(a.sharding == s for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(sh8)))
    out["restore"] = {"equal": bool(same), "placed": bool(placed),
                      "devices": len(jax.tree.leaves(restored.trainable)[0].sharding.device_set),
                      "counters": counters}

    # Gradient accumulation on the fsdp8 mesh: both batches as one of 16, in one step and in 2 micro-batches of 8.
    # What one micro-batch of 8 moves anyway (parameter all-gathers, gradient reductions, the model's own activation
    # collectives at one example per device) is the fsdp8 layout's step above: the accumulated step may move nothing
    # else.
    batch16 = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    with jax.set_mesh(mesh8):
        b16 = batch_shardings(batch16, mesh8, rules)

        def step16(accum: int):
            ca = c8.copy_and_resolve_references()
            ca.train.update(dict(batch_size=16, grad_accum=accum))
            return jit_train_step(ca, model, mesh8, sh8, b16).lower(jax.device_put(state1, sh8),
                                                                      jax.device_put(batch16, b16)).compile()

        results = {}
        for accum in (1, 2):
            step = step16(accum)
            results[accum] = step(jax.device_put(state1, sh8), jax.device_put(batch16, b16))
            if accum == 2:
                accumulated = census(step.as_text())
        # The check can fail: the contiguous split (micro-batch i = rows [i B/2, (i+1) B/2)) puts each micro-batch on
        # half the devices, so placing it as the step needs moves the pixels. Compiled alone, the split shows it
        # (and the strided one shows nothing): the census sees a batch moved between devices.
        lead = P(b16["video"].spec[0])

        def contiguous_split(tree, accum, mesh_, spec):
            return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                x.reshape((accum, x.shape[0] // accum) + x.shape[1:]),
                NamedSharding(mesh_, P(None, *spec, *([None] * (x.ndim - 1))))), tree)

        splits = {}
        for name, split in (("strided", ts.strided_micro_batches), ("contiguous", contiguous_split)):
            fn = jax.jit(lambda tree: split(tree, 2, mesh8, lead), in_shardings=(b16,))
            splits[name] = census(fn.lower(jax.device_put(batch16, b16)).compile().as_text())
    (s1, m1), (s2, m2) = results[1], results[2]
    p0, p1, p2, e0, e1 = ({k: v.astype(np.float64) for k, v in flat(t).items()}
                          for t in (state1.trainable, s1.trainable, s2.trainable, state1.ema, s1.ema))
    rel_l2 = lambda a, b: float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in b)) /
                                np.sqrt(sum(np.sum(b[k] ** 2) for k in b)))
    out["accum"] = {
        "loss": [float(m1["loss"]), float(m2["loss"])], "grad_norm": [float(m1["grad_norm"]), float(m2["grad_norm"])],
        "trainable_rel": rel_l2(p2, p1),
        "update_rel": rel_l2(p1, p0),  # how far one step moved them
        # EMA: e1 = d e0 + (1 - d) p1, by hand in float64.
        "ema_max_err": max(float(np.max(np.abs(e1[k] - (0.9 * e0[k] + 0.1 * p1[k])))) for k in e1),
        "ema_moved": max(float(np.max(np.abs(e1[k] - e0[k]))) for k in e1),
        "collectives_accum2": accumulated, "collectives_split": splits}
    return out


def rel(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_layouts_and_accumulation_on_8_devices(tmp_path):
    from tests.conftest import FAST_CPU_COMPILE  # here, not at the top: this file also runs as the child script

    # FAST_CPU_COMPILE: the child's time is compiles (four layouts, two accumulation steps); it checks values,
    # shardings and collectives, not speed.
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_CPU_COMPILE}",
           "JAX_PLATFORMS": "cpu"}
    out_file = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "ckpt"), str(out_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(out_file.read_text())
    single = out["single"]
    assert single["update_norm"] > 0
    for name in LAYOUTS:
        r = out[name]
        assert rel(r["losses"], single["losses"]) < 1e-5, (name, r["losses"], single["losses"])
        assert rel(r["grad_norms"], single["grad_norms"]) < 1e-5, (name, r["grad_norms"], single["grad_norms"])
        assert r["param_rel"] < 1e-4, (name, r["param_rel"])
        # The two steps moved the params much more than the layouts disagree.
        assert r["update_diff"] < 1e-2 * single["update_norm"], (name, r["update_diff"], single["update_norm"])

    conv = "down_blocks_0/resnets_0/conv2/kernel"  # (3, 3, 32, 32): kernel_0, kernel_1, conv_in, conv_out
    q = "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"  # (32, 32): embed, heads
    fsdp, fsdp_tp, dp = out["fsdp8"], out["fsdp4_tensor2"], out["data8"]
    assert fsdp["specs"][conv] == ["None", "None", "fsdp", "tensor"]
    assert fsdp["shard_shapes"][conv] == [[3, 3, 32, 32], [3, 3, 4, 32]]
    assert fsdp_tp["shard_shapes"][conv] == [[3, 3, 32, 32], [3, 3, 8, 16]]
    assert fsdp["specs"][q] == ["fsdp", "tensor"] and fsdp["shard_shapes"][q] == [[32, 32], [4, 32]]
    assert fsdp_tp["shard_shapes"][q] == [[32, 32], [8, 16]]
    assert dp["shard_shapes"][conv] == [[3, 3, 32, 32], [3, 3, 32, 32]]  # data parallel: replicated weights
    # Every kernel of >= 1024 weights is split 8 ways under fsdp, except conv_in: its 9 input channels (the fsdp
    # axis of a conv kernel) do not divide by 8, so the rules fall back to replicating it.
    kernels = {n: s for n, s in fsdp["shard_shapes"].items()
               if n.endswith("kernel") and len(s[0]) >= 2 and math.prod(s[0]) >= 1024}
    assert len(kernels) > 100
    for name, (shape, shard) in kernels.items():
        assert math.prod(shape) // math.prod(shard) == (1 if name == "conv_in/kernel" else 8), (name, shape, shard)
    # Adam moments follow their parameters.
    assert fsdp["mu_specs"][conv] == fsdp["specs"][conv] and fsdp_tp["mu_specs"][q] == fsdp_tp["specs"][q]

    # Activations: the model pins its (B, F, H, W, C) layouts (frame fold/unfold, temporal attention), and under
    # fsdp and fsdp x tensor no activation is gathered along its batch axis in the step (forward and backward): the
    # batch stays split through the temporal layers' reshapes and transposes. The one exception XLA makes is the
    # IP-Adapter image tokens (B, 2, C), a few KB shared by every frame of a video, which it gathers to form the
    # to_k_ip/to_v_ip weight gradients.
    for name in ("fsdp8", "fsdp4_tensor2"):
        activations = out[name]["activations"]
        assert activations["pinned_video_layouts"] >= 10, (name, activations)
        lost = [op for op in activations["batch_gathers"] if not re.search(r"/to_[kv]_ip/dot_general$", op)]
        assert lost == [], (name, lost)

    assert out["restore"] == {"equal": True, "placed": True, "devices": 8, "counters": {"skipped_samples": 7}}

    # Accumulation: the one-batch loss, gradient norm and update, and no data moved beyond one micro-batch's.
    acc = out["accum"]
    (l1, l2), (g1, g2) = acc["loss"], acc["grad_norm"]
    assert abs(l2 - l1) <= 1e-5 * abs(l1) and abs(g2 - g1) <= 1e-5 * abs(g1), acc
    assert acc["trainable_rel"] < 1e-5 and acc["update_rel"] > 1e-4, acc
    base = {tuple(c) for c in fsdp["activations"]["collectives"]}
    scalar = lambda c: "[]" in c[1]  # the loss/norm sums over the micro-batches
    extra = [c for c in map(tuple, acc["collectives_accum2"]) if c not in base and not scalar(c)]
    assert not extra, f"the strided micro-batches move data one micro-batch alone does not: {extra}"
    split = acc["collectives_split"]
    assert split["strided"] == [] and any(",16,16,3]" in shape for _, shape in split["contiguous"]), split
    # EMA after one step: e1 = 0.9 e0 + 0.1 p1 (float32 arithmetic vs float64 reference), and it moved.
    assert acc["ema_max_err"] < 1e-6 and acc["ema_moved"] > 1e-5, acc


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    result = _child(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
