"""Issue 26: where the v6e compile of the paper's config crashes. Each case compiles one splash attention call
(`layers.attention(implementation="splash")`, the block sizes the model passes) at one attention shape of the
paper's config (512 px -> 64x64 latents, 24 frames, one clip per chip, SD 1.5's 8 heads), forward or forward and
backward, under a mesh of the topology's devices, in its own subprocess: a SIGSEGV ends only that case.

    .venv/bin/python bench/v6e_splash.py [--topology=v6e-64] [--layout=data|fsdp] [--cases=self_64,cross_64]

Prints one row per case (compiled in N s with its temporaries, crashed with the signal, or the error), then a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FRAMES = 24
# name: (query tokens, key tokens, head_dim): the spatial self- and text cross-attention of each UNet level that
# takes splash (64 queries at 8x8 fall back to XLA, as do the temporal attention's 24 and the 4 image tokens).
CASES = {
    "self_64": (4096, 4096, 40), "self_32": (1024, 1024, 80), "self_16": (256, 256, 160),
    "cross_64": (4096, 77, 40), "cross_32": (1024, 77, 80), "cross_16": (256, 77, 160),
}


def compile_case(topology: str, layout: str, name: str, backward: bool) -> dict:
    """Compile one case in this process; its report."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling touches no chip
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from atomo_jax import aot, fit_check
    from atomo_jax.models import layers
    from atomo_jax.parallel.mesh import make_mesh
    from configs import base

    devices = fit_check.target_devices(aot.parse_target(topology))
    mesh_cfg = base.get_config().mesh
    with mesh_cfg.unlocked():
        mesh_cfg.data, mesh_cfg.fsdp = (-1, 1) if layout == "data" else (1, -1)
    mesh = make_mesh(mesh_cfg, devices)
    tq, tk, d = CASES[name]
    b = FRAMES * len(devices)  # one clip per chip: B*F rows, split over the batch axes
    spec = NamedSharding(mesh, P(("data", "fsdp")))
    q = jax.ShapeDtypeStruct((b, tq, 8, d), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((b, tk, 8, d), jnp.bfloat16, sharding=spec)
    fwd = lambda q, k, v: layers.attention(q, k, v, implementation="splash")
    fn = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)) if backward else fwd
    t0 = time.time()
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(q, kv, kv)
        compiled = lowered.compile()
    mem = compiled.memory_analysis()
    # The Mosaic kernels as custom calls: splash really ran, not an interpret-mode or XLA stand-in.
    kernels = lowered.as_text().count("tpu_custom_call")
    return {"compile_s": round(time.time() - t0, 1), "temp_gib": round(mem.temp_size_in_bytes / 2 ** 30, 3),
            "kernels": kernels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v6e-64")
    p.add_argument("--layout", choices=["data", "fsdp"], default="data")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--one", help=argparse.SUPPRESS)  # NAME:fwd|bwd, in the child
    p.add_argument("--timeout_s", type=int, default=900)
    args = p.parse_args()
    if args.one:
        name, mode = args.one.split(":")
        print(json.dumps(compile_case(args.topology, args.layout, name, mode == "bwd")), flush=True)
        return
    rows = []
    for name in args.cases.split(","):
        for mode in ("fwd", "bwd"):
            t0 = time.time()
            try:
                proc = subprocess.run([sys.executable, __file__, f"--topology={args.topology}",
                                       f"--layout={args.layout}", f"--one={name}:{mode}"],
                                      capture_output=True, text=True, timeout=args.timeout_s)
                if proc.returncode == 0:
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    result = (f"compiled in {r['compile_s']} s, {r['kernels']} splash kernel calls, temporaries "
                              f"{r['temp_gib']} GiB")
                elif proc.returncode < 0:
                    result = f"crashed: signal {-proc.returncode}"
                else:
                    result = "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            except subprocess.TimeoutExpired:
                result = f"no answer in {args.timeout_s} s"
            rows.append((name, mode, CASES[name], result, round(time.time() - t0)))
            print(f"[v6e_splash] {name} {mode}: {result} ({rows[-1][-1]} s)", flush=True)
    print(f"\n{args.topology}, layout {args.layout}, {FRAMES} frames x 1 clip per chip, 8 heads, bf16\n")
    print("| case | mode | queries x keys x head_dim | result | wall s |\n|---|---|---|---|---|")
    for name, mode, (tq, tk, d), result, wall in rows:
        print(f"| {name} | {mode} | {tq} x {tk} x {d} | {result} | {wall} |")


if __name__ == "__main__":
    main()
