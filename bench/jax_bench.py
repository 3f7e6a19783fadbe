"""Our side of the GPU benchmark: the full-size train step and image-to-video sampling, timed on one device.

  python bench/jax_bench.py train --batch=4 --latent=32 [--frames=16] [--trainable=all|paper] --out=r.jsonl
  python bench/jax_bench.py sample --latent=64 --steps=25 --out=r.jsonl
  python bench/jax_bench.py matmul --out=r.jsonl
  python bench/jax_bench.py flops --batch=1 --latent=64 --frames=24 --trainable=paper --out=r.jsonl   # CPU host

Shapes follow the peer (DESIGN.md): 9 input channels, 16 frames (--frames: the paper trains 24), 93 context tokens,
CLIP image embedding 1024.
Latents, context and image embedding come straight in (no VAE / encoders in the timed step), as for the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from atomo_jax.models.atomo import build_model  # noqa: E402
from atomo_jax.parallel import axes  # noqa: E402
from atomo_jax.parallel.mesh import make_mesh  # noqa: E402
from atomo_jax.parallel import sharding as shd  # noqa: E402
from atomo_jax.training.packing import packer_from_config  # noqa: E402
from atomo_jax.training.setup import abstract_train_state, init_train_state, state_shardings  # noqa: E402
from atomo_jax.training.train_step import batch_shardings, jit_train_step  # noqa: E402
from bench import gate  # noqa: E402
from bench.flops import count_flops  # noqa: E402
from configs import base  # noqa: E402

CONTEXT = 93


def bench_config(args: argparse.Namespace):
    c = base.get_config()
    c.model.unet.dtype = args.dtype
    c.model.unet.attention_impl = args.attention
    c.model.unet.remat = args.remat
    # Timed steps take latents/embeddings directly: a weightless VAE stand-in and a tiny image encoder keep
    # memory for the UNet (the UNet is the full-size one).
    c.model.vae = base.ml_collections.ConfigDict(dict(kind="pixel", factor=8, scaling_factor=1.0))
    c.model.image_encoder = base.ml_collections.ConfigDict(dict(
        kind="clip_vision", image_size=32, patch_size=16, hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=2, projection_dim=1024))
    c.model.text_encoder = base.ml_collections.ConfigDict(dict(kind="none"))
    c.data.num_frames = args.frames
    c.data.resolution = args.latent * 8
    c.train.batch_size = args.batch * args.devices  # --batch is per device: scaling runs keep it fixed
    c.train.trainable = {"all": (".*",), "paper": ("temp_convs", "motion_modules", "^conv_in/"), "none": ()}[
        args.trainable]
    c.train.lora.rank = args.lora_rank  # LoRA on the spatial attention projections (configs/base.py's targets)
    c.train.ema_decay = 0.9999
    c.train.auto_layouts = not args.row_major
    if args.pack_small is not None:
        c.train.pack_small_leaves = args.pack_small
    c.mesh.data = args.devices if args.layout == "data" else 1
    c.mesh.fsdp = args.devices if args.layout == "fsdp" else 1
    if args.tiny:  # CPU smoke test of the harness itself
        from configs import demo
        c.model.unet = demo.get_config().model.unet
        c.model.unet.update(dict(cross_attention_dim=768, image_embed_dim=1024, motion_max_seq_length=32))
    return c


def timing_params(model) -> dict:
    """N(0, 0.02) parameters of the right shapes, each a window of one block of host-drawn normals (a view, no copy)
    sent to the device. Values do not change the timing; on the H100 (jax 0.11.2) both Flax's init program and a
    jitted threefry draw of 1.6 B values ran for minutes (bench/NOTES.md)."""
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0)))
    size, shift = 1 << 24, 1 << 20
    pool = 0.02 * np.random.default_rng(0).standard_normal(size + shift, dtype=np.float32)
    offset = iter(range(0, 1 << 40, 7919))  # a different window of the pool for each leaf

    def leaf(x):
        start = next(offset) % shift
        values = pool[start:start + x.size] if x.size <= size else np.resize(pool, x.size)
        return jnp.asarray(values.reshape(x.shape))

    return jax.tree.map(leaf, abstract)


def make_batch(b: int, frames: int, latent: int, rng: np.random.Generator) -> dict:
    return {"latents": jnp.asarray(rng.standard_normal((b, frames, latent, latent, 4)), jnp.float32),
            "image_embeds": jnp.asarray(rng.standard_normal((b, 1024)), jnp.float32),
            "context": jnp.asarray(rng.standard_normal((b, CONTEXT, 768)), jnp.float32),
            "mask": jnp.zeros((b, frames), jnp.float32).at[:, 0].set(1.0)}


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def pipelined(fn, n: int) -> list[float]:
    """Per-step times as training runs them: two steps always queued, each time the interval between consecutive
    completions, so host dispatch overlaps the device work as in the train loop (which waits on no step)."""
    queue = [fn(), fn()]
    jax.block_until_ready(queue[0])
    last, out = time.perf_counter(), []
    for _ in range(n):
        queue.append(fn())
        jax.block_until_ready(queue[1])
        now = time.perf_counter()
        out.append(now - last)
        last = now
        queue.pop(0)
    jax.block_until_ready(queue)
    return out


def peak_gib() -> float | None:
    """The largest per-device peak among the local devices."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p]
    return max(peaks) / 2 ** 30 if peaks else None


def use_conv3d_temporal_conv() -> None:
    """A/B baseline: the temporal convolution as the 3-D convolution it was before layers.FrameConv (same parameter
    names and shapes, same math), to time the matmul form against it in one run."""
    from atomo_jax.models import layers

    class Conv3dFrameConv(layers.FrameConv):
        @nn.compact
        def __call__(self, x):
            cin, cout = x.shape[-1], self.features
            init = nn.initializers.zeros_init() if self.zero_init else layers.torch_default_init
            kernel = self.param("kernel", init, (3, 1, 1, cin, cout), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros_init(), (cout,), jnp.float32)
            y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1, 1),
                                             ((1, 1), (0, 0), (0, 0)),
                                             dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
            return y + bias.astype(self.dtype)

    layers.FrameConv = Conv3dFrameConv


def use_one_pass_group_norm() -> None:
    """A/B candidate: GroupNorm's mean and variance from one pass (sibling reductions of x - p and its square,
    which XLA fuses into one read of x) instead of two dependent ones; p, each sample's group mean at its first
    position, keeps a mean far from zero exact. Same parameters and output (bench/NOTES.md, calls 38-40)."""
    from atomo_jax.models import layers

    class OnePassGroupNorm(layers.GroupNorm):
        @nn.compact
        def __call__(self, x):
            c, groups = x.shape[-1], self.num_groups
            names = (layers.ax.NORM,)
            scale = self.param("scale", layers._init(nn.initializers.ones_init(), names), (c,), jnp.float32)
            bias = self.param("bias", layers._init(nn.initializers.zeros_init(), names), (c,), jnp.float32)
            reduced = tuple(range(1, x.ndim - 1))

            def over_group(per_channel):
                g = jnp.mean(per_channel.reshape(-1, groups, c // groups), axis=-1, keepdims=True)
                g = jnp.broadcast_to(g, g.shape[:-1] + (c // groups,)).reshape(-1, c)
                return g.reshape((g.shape[0],) + (1,) * len(reduced) + (c,))

            xf = x.astype(jnp.float32)
            pivot = jax.lax.stop_gradient(over_group(xf[(slice(None),) + (0,) * len(reduced)]))
            shifted = xf - pivot
            m1 = over_group(jnp.mean(shifted, axis=reduced))
            m2 = over_group(jnp.mean(jnp.square(shifted), axis=reduced))
            mul = jax.lax.rsqrt(jnp.maximum(m2 - jnp.square(m1), 0.0) + self.epsilon) * scale
            out = ((shifted - m1) * mul + bias).astype(self.dtype)
            return nn.silu(out) if self.silu else out

    layers.GroupNorm = OnePassGroupNorm


def flag_tag(args: argparse.Namespace) -> str:
    """'+name=value' per --xla_flag, without the common prefix, the attention when it is not cuDNN's and the
    one-pass GroupNorm candidate: A/B rows are told apart in the report."""
    return ("".join("+" + f.lstrip("-").removeprefix("xla_gpu_") for f in args.xla_flag)
            + ("" if args.attention == "cudnn" else f"_{args.attention}") + ("_gn1pass" if args.gn_one_pass else ""))


def run_train(args: argparse.Namespace) -> dict:
    if args.conv3d:
        use_conv3d_temporal_conv()
    config = bench_config(args)
    model = build_model(config.model)
    if args.devices > len(jax.devices()):
        raise SystemExit(f"--devices={args.devices}, but this host has {len(jax.devices())}: {jax.devices()}")
    mesh = make_mesh(config.mesh, jax.devices()[:args.devices])
    b = args.batch * args.devices
    rules = axes.rules_from_config(None)
    with jax.set_mesh(mesh):
        shardings = state_shardings(config, model, mesh, rules)
        abstract = abstract_train_state(config, model)
        packer, step_sh = packer_from_config(config, abstract, shardings, shd.replicated(mesh))  # as the trainer
        if packer:
            abstract = jax.eval_shape(packer.pack_state, abstract)
            log(f"packed {packer.num_packed} of {len(packer.packed)} trainable leaves")
        auto_layouts = bool(config.train.auto_layouts)
        batches = [make_batch(b, args.frames, args.latent, np.random.default_rng(i)) for i in range(3)]
        batch_sh = batch_shardings(batches[0], mesh, rules)
        batches = [{k: jax.device_put(v, batch_sh[k]) for k, v in bt.items()} for bt in batches]
        step = jit_train_step(config, model, mesh, step_sh, batch_sh, auto_state_layouts=auto_layouts,
                              packer=packer)
        # Compiled from shapes alone, before any weight exists: the compile overlaps the peer's (bench/gate.py).
        with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        state_in = jax.tree.map(with_sh, abstract, step_sh)
        batch_in = {k: with_sh(v, batch_sh[k]) for k, v in batches[0].items()}
        log("compiling")
        t0 = time.perf_counter()
        compiled = step.lower(state_in, batch_in).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        log(f"compiled in {compile_s:.0f} s (temporaries {mem.temp_size_in_bytes / 2 ** 30:.1f} GiB)")
        gate.compiled()
        flops = args.model_flops * args.devices if args.model_flops else None  # given per device batch
        if args.count_flops and not flops:  # on the plain-XLA attention path, where attention is visible matmuls
            cfg_x = bench_config(argparse.Namespace(**{**vars(args), "attention": "xla"}))
            flops = count_flops(jit_train_step(cfg_x, build_model(cfg_x.model), mesh, step_sh, batch_sh,
                                               packer=packer), state_in, batch_in)
            log(f"model FLOPs per step (matmul + conv): {flops / 1e12:.2f} T")
        gate.wait_turn()
        log("building state")
        params = jax.block_until_ready(timing_params(model))
        log("params on the device")
        state = init_train_state(config, model, shardings, params)
        if packer:
            state = jax.device_put(packer.pack_state(state), step_sh)
        if auto_layouts:  # into the layouts the compiled step chose for its (donated) state
            state = jax.device_put(state, compiled.input_formats[0][0])
        jax.block_until_ready(state)
        trainable_params = int(sum(x.size for x in jax.tree.leaves(state.trainable)))
        log(f"state initialised ({trainable_params / 1e9:.3f} B trainable)")
        holder = {"s": state}

        def one(i=[0]):
            i[0] += 1
            holder["s"], m = compiled(holder["s"], batches[i[0] % 3])
            return m["loss"]

        first_loss = float(one())  # step 1 from the same params and batch in every variant: the A/B numerics check
        timed(one, args.warmup - 1)
        times_sync = timed(one, args.iters)  # each step waited for: adds the host's dispatch to every step
        times = pipelined(one, args.iters)
        losses = [float(one()) for _ in range(2)]
        if args.profile:
            write_profile(one, args)
    med = statistics.median(times)
    impl = ("jax" + ("_conv3d" if args.conv3d else "")
            + ("_rowmajor" if args.row_major else "") + ("_unpacked" if args.pack_small == 0 else "")
            + (f"_lora{args.lora_rank}" if args.lora_rank else "") + flag_tag(args))
    return {"kind": "train", "impl": impl, "batch": args.batch, "frames": args.frames,
            "devices": args.devices, "layout": args.layout, "latent": args.latent, "trainable": args.trainable,
            "remat": args.remat, "attention": args.attention, "dtype": args.dtype, "s_per_step": med,
            "s_per_step_sync": statistics.median(times_sync), "times": times, "times_sync": times_sync,
            "compile_s": compile_s, "temp_gib": mem.temp_size_in_bytes / 2 ** 30,
            "state_gib": mem.argument_size_in_bytes / 2 ** 30, "lora_rank": args.lora_rank,
            "trainable_params": trainable_params,
            "model_flops": flops, "tflops": flops / med / 1e12 / args.devices if flops else None,
            "peak_gib": peak_gib(), "first_loss": first_loss, "loss": losses[-1],
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": jax.devices()[0].device_kind}


def write_profile(call: Callable[[], Any], args: argparse.Namespace, calls: int = 3) -> None:
    """Trace `calls` calls under args.profile; print where the device time goes and keep it beside args.out."""
    from bench.profile_summary import profile_calls
    summary = profile_calls(call, calls, args.profile)
    print(summary, flush=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(args.out)),
                           f"profile_{os.environ.get('BENCH_NAME', 'jax')}.txt"), "w") as f:
        f.write(summary + "\n")


def run_flops(args: argparse.Namespace) -> dict:
    """Model FLOPs of the train step (matmul + conv, forward + backward) from its jaxpr alone: no compile, so a CPU
    host counts them for the device run's --model_flops (counting on the GPU beside compiles once crashed)."""
    config = bench_config(argparse.Namespace(**{**vars(args), "attention": "xla"}))
    model = build_model(config.model)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    rules = axes.rules_from_config(None)
    with jax.set_mesh(mesh):
        shardings = state_shardings(config, model, mesh, rules)
        abstract = abstract_train_state(config, model)
        packer, step_sh = packer_from_config(config, abstract, shardings, shd.replicated(mesh))
        if packer:
            abstract = jax.eval_shape(packer.pack_state, abstract)
        batch = make_batch(args.batch, args.frames, args.latent, np.random.default_rng(0))
        batch_sh = batch_shardings(batch, mesh, rules)
        with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        step = jit_train_step(config, model, mesh, step_sh, batch_sh, packer=packer)
        flops = count_flops(step, jax.tree.map(with_sh, abstract, step_sh),
                            {k: with_sh(v, batch_sh[k]) for k, v in batch.items()})
    log(f"model FLOPs per step (matmul + conv): {flops:.0f}")
    return {"kind": "flops", "impl": "jax", "batch": args.batch, "frames": args.frames, "latent": args.latent,
            "trainable": args.trainable, "model_flops": flops}


def run_sample(args: argparse.Namespace) -> dict:
    from atomo_jax.diffusion.guidance import Conditioning, GuidanceConfig
    from atomo_jax.diffusion.samplers import SamplerConfig
    from atomo_jax.pipelines import i2v
    config = bench_config(args)
    model = build_model(config.model)
    b, lat = 1, args.latent
    rng = np.random.default_rng(0)
    given = jnp.zeros((b, args.frames, lat, lat, 4)).at[:, 0].set(jnp.asarray(rng.standard_normal((b, lat, lat, 4))))
    mask = jnp.zeros((b, args.frames)).at[:, 0].set(1.0)
    cond = Conditioning(mask=mask, given_latents=given,
                        context=jnp.asarray(rng.standard_normal((b, CONTEXT, 768)), jnp.float32),
                        empty_context=jnp.asarray(rng.standard_normal((b, CONTEXT, 768)), jnp.float32),
                        image_embeds=jnp.asarray(rng.standard_normal((b, 1024)), jnp.float32))
    sampler = SamplerConfig(sampler="ddim", num_steps=args.steps)
    guidance = GuidanceConfig(image_scale=2.0, text_scale=7.5, rescale=0.7)
    denoise = jax.jit(lambda p, r, c: i2v.denoise(model, p, r, c, sampler, guidance))
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0)))
    log("compiling")
    t0 = time.perf_counter()
    compiled = denoise.lower(abstract, jax.random.key(1), cond).compile()
    compile_s = time.perf_counter() - t0
    log(f"compiled in {compile_s:.0f} s")
    gate.compiled()
    gate.wait_turn()
    params = timing_params(model)
    run = lambda: compiled(params, jax.random.key(1), cond)
    jax.block_until_ready(run())
    times = timed(run, args.iters)
    if args.profile:
        write_profile(run, args, calls=1)
    return {"kind": "sample", "impl": "jax" + flag_tag(args), "frames": args.frames, "latent": lat,
            "steps": args.steps, "guidance_batch": 3, "s_per_video": statistics.median(times), "times": times, "compile_s": compile_s, "peak_gib": peak_gib(),
            "device": jax.devices()[0].device_kind}


def run_matmul(args: argparse.Namespace) -> dict:
    n = 8192
    keys = jax.random.split(jax.random.key(0), 4)
    mats = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys]
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(mats[0], mats[1]))
    times = timed(lambda: f(mats[0], mats[1]), 20) + timed(lambda: f(mats[2], mats[3]), 20)
    return {"kind": "matmul", "impl": "jax", "tflops": 2 * n ** 3 / statistics.median(times) / 1e12,
            "device": jax.devices()[0].device_kind}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "sample", "matmul", "flops"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--trainable", choices=["all", "paper", "none"], default="all",
                   help="fully trained set: all, the paper's (temporal layers + conv_in), none (with --lora_rank)")
    p.add_argument("--lora_rank", type=int, default=0, help="LoRA of this rank on the spatial attention (0: none)")
    p.add_argument("--remat", default="none")
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--count_flops", action="store_true")
    p.add_argument("--model_flops", type=float, default=None,
                   help="FLOPs per step counted beforehand by bench/flops.py (same program, e.g. on a CPU host)")
    p.add_argument("--devices", type=int, default=1, help="GPUs in the mesh (the first N); --batch is per GPU")
    p.add_argument("--layout", choices=["data", "fsdp"], default="data", help="how the --devices are used")
    p.add_argument("--conv3d", action="store_true", help="A/B: temporal conv as a 3-D convolution (the old form)")
    p.add_argument("--gn_one_pass", action="store_true",
                   help="A/B: GroupNorm's mean and variance from one pass (the candidate of calls 38-40)")
    p.add_argument("--row_major", action="store_true",
                   help="A/B: the train state in row-major layouts (config.train.auto_layouts=False)")
    p.add_argument("--pack_small", type=int, default=None,
                   help="A/B: config.train.pack_small_leaves (0: every leaf updated on its own)")
    p.add_argument("--profile", default="", help="trace dir: profile 3 steps and print where the time goes")
    p.add_argument("--dump_hlo", default="", help="dir: XLA writes the optimized HLO of every module there")
    p.add_argument("--tiny", action="store_true", help="demo-sized UNet: a CPU smoke test of this script")
    p.add_argument("--xla_flag", action="append", default=[],
                   help="A/B: an XLA flag (--name=value) set for this process, replacing the inherited value; "
                        "the result's impl is tagged with it")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    flags = args.xla_flag + ([f"--xla_dump_to={args.dump_hlo}", "--xla_dump_hlo_as_text"] if args.dump_hlo else [])
    for flag in flags:  # XLA_FLAGS is read when the backend starts, which is after this point
        name = flag.split("=")[0]
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] != name]
        os.environ["XLA_FLAGS"] = " ".join(kept + [flag])
    import faulthandler
    faulthandler.dump_traceback_later(45, repeat=True)  # where a slow phase spends its time, in the log
    if args.gn_one_pass:
        use_one_pass_group_norm()
    result = {"train": run_train, "sample": run_sample, "matmul": run_matmul, "flops": run_flops}[args.what](args)
    result["args"] = vars(args)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("times", "args")}), flush=True)


if __name__ == "__main__":
    main()
