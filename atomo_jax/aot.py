"""Ahead-of-time fit check: compile the real train step for a TPU topology (or N fake CPU devices) on this host.

  python -m atomo_jax.aot --config=configs/base.py --topology=v5p-128 --num_slices=2 --config.mesh.fsdp=-1 ...
  python -m atomo_jax.aot --config=configs/base.py --topology=v6e-64 --sweep
  python -m atomo_jax.aot --config=configs/base.py --topology=cpu-8 --config.mesh.fsdp=8 --config.mesh.data=1

Nothing is allocated: the train state and the batch are `jax.ShapeDtypeStruct`s carrying the shardings the trainer
would use, and `jit(train_step).lower(...).compile()` runs XLA for the target. TPU targets need `libtpu` (the version
`jax[tpu]` pins for the installed jax; for jax 0.10.2: `pip install libtpu==0.0.42.1`). Prints per-chip HBM (arguments,
temporaries, outputs) against the chip's capacity and FLOPs per step; exits 1 with the numbers when it does not fit.
`--sweep` compiles every mesh layout x remat policy the config allows and prints a table; `--lower_only` stops
before the compile (mesh, shardings and bytes of state + batch per device in seconds). `--plan` finds the largest
batch that fits per chip with a few compiles (atomo_jax/plan.py) and estimates step time, clips per hour and
chip-hours (cost with --price_per_chip_hour) from the compiled cost analysis:

  python -m atomo_jax.aot --config=configs/base.py --topology=v5e-16 --plan --plan_remat=dots,full \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --config.data.kind=latents --price_per_chip_hour=1.2
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any, Sequence

import ml_collections

from atomo_jax import plan
from atomo_jax.configuration import add_log_level, cli_parser, parse_cli

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float  # per chip
    peak_flops: float  # dense bf16 per chip
    dims: int  # torus dimensions of the topology name
    cores_named: bool  # accelerator-type numbers count TensorCores (2 per chip), not chips
    hbm_bytes_per_s: float  # HBM bandwidth per chip


# Google Cloud's published per-chip figures.
CHIPS = {
    "v4": Chip(32, 275e12, 3, True, 1228e9),
    "v5p": Chip(95, 459e12, 3, True, 2765e9),
    "v5e": Chip(16, 197e12, 2, False, 819e9),
    "v6e": Chip(32, 918e12, 2, False, 1640e9),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to compile: a TPU topology (chips per slice, its torus shape) or fake CPU devices."""
    name: str
    generation: str  # v4 v5p v5e v6e, or "cpu"
    chips: int  # per slice (CPU: devices)
    topology_name: str = ""  # e.g. "v5p:4x4x4"
    chips_per_host_bounds: tuple[int, int, int] = (1, 1, 1)
    num_slices: int = 1

    @property
    def chip(self) -> Chip | None:
        return CHIPS.get(self.generation)


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """Standard slice shapes: 3-D doubles z, y, x in turn from 2x2x1 (v4/v5p); 2-D doubles y, x from 1x1."""
    if dims == 3:
        if chips < 4:
            raise ValueError(f"3-D TPU slices have at least 4 chips, got {chips}")
        shape = [2, 2, 1]
    else:
        shape = [1, 1]
    while math.prod(shape) < chips:
        i = max(k for k in range(dims) if shape[k] == min(shape))
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise ValueError(f"{chips} chips is not a power-of-two slice size")
    return tuple(shape)


def parse_target(name: str, num_slices: int = 1) -> Target:
    """`v5p-128` -> 64 chips as v5p:4x4x4 with 4 chips per host; `v5e-16`/`v5litepod-16` -> v5e:4x4; `cpu-8`."""
    if num_slices < 1:
        raise ValueError(f"--num_slices={num_slices}: must be >= 1")
    m = re.fullmatch(r"cpu-(\d+)", name)
    if m:
        return Target(name, "cpu", int(m.group(1)), num_slices=num_slices)
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name)
    if m:
        gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        chips = math.prod(dims)
    else:
        m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
        if not m:
            raise ValueError(f"--topology={name}: expected a TPU type like v4-32, v5e-16 (v5litepod-16), v5p-128, "
                             f"v6e-64, a topology name like v5p:4x4x4, or cpu-N")
        gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        n = int(m.group(2))
        chips = n // 2 if CHIPS[gen].cores_named else n
        if CHIPS[gen].cores_named and n % 2:
            raise ValueError(f"--topology={name}: {gen} sizes count TensorCores (2 per chip), so they are even")
        try:
            dims = _torus(chips, CHIPS[gen].dims)
        except ValueError as e:
            raise ValueError(f"--topology={name}: {e}") from None
    if len(dims) != CHIPS[gen].dims:
        raise ValueError(f"--topology={name}: {gen} topologies have {CHIPS[gen].dims} dimensions")
    # Hosts carry 4 chips (2x2), except single-host v5e/v6e slices of up to 8 chips.
    if CHIPS[gen].dims == 2 and chips <= 8:
        bounds = (dims[0], dims[1], 1)
    else:
        bounds = (min(2, dims[0]), min(2, dims[1]), 1)
    return Target(name, gen, chips, f"{gen}:{'x'.join(map(str, dims))}", bounds, num_slices)


def capacity(target: Target, num_devices: int, hbm_gib: float | None = None,
             usable_fraction: float = 0.95) -> float | None:
    """Usable bytes per device (a chip may show as several devices, e.g. v4 TensorCores without megacore)."""
    hbm = hbm_gib if hbm_gib is not None else (target.chip.hbm_gib if target.chip else None)
    if hbm is None:
        return None
    per_chip_devices = max(1, num_devices // (target.chips * target.num_slices))
    return hbm * GIB * usable_fraction / per_chip_devices


def describe(report: Any, target: Target, usable_fraction: float = 0.95) -> str:
    gib = lambda x: f"{x / GIB:.2f} GiB"
    cap = "n/a (no capacity for this target; pass --hbm_gib)" if report.capacity_bytes is None else \
        f"{gib(report.capacity_bytes)} usable ({usable_fraction:.0%} of {report.capacity_bytes / usable_fraction / GIB:.1f})"
    lines = [
        f"target        {target.name}" + (f" = {target.topology_name} x {target.num_slices} slice(s)"
                                          if target.topology_name else "") + f", {report.devices} devices",
        f"mesh          {report.layout}   remat={report.remat}   compile {report.compile_s:.1f} s",
        f"per device    arguments {gib(report.argument_bytes)} ({report.argument_bytes:,} B)   temporaries {gib(report.temp_bytes)}   "
        f"outputs {gib(report.output_bytes)} (in place over donated inputs: {gib(report.alias_bytes)})   "
        f"code {gib(report.code_bytes)}",
        f"peak          {gib(report.peak_bytes)} per device vs {cap}",
        f"FLOPs/step    {report.flops / 1e12:.2f} TFLOP per device, {report.flops * report.devices / 1e15:.3f} PFLOP "
        f"total" + (f"; {report.flops / target.chip.peak_flops * 1e3:.0f} ms at 100% of the "
                    f"{target.chip.peak_flops / 1e12:.0f} TFLOP/s bf16 peak" if target.chip else ""),
    ]
    return "\n".join(lines)


def sweep_layouts(config: Any, n: int) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) layouts over n devices: tensor in {1, 2, 4}, fsdp powers of two, batch-divisible."""
    b = int(config.train.batch_size) // int(config.train.grad_accum)
    dcn = int(config.mesh.dcn_data)
    out = []
    for tensor in (1, 2, 4):
        fsdp = 1
        while fsdp * tensor <= n:
            data = n // (fsdp * tensor)
            three_axes = data > 1 and fsdp > 1 and tensor > 1  # refused by training.setup.validate (Shardy)
            if data * fsdp * tensor == n and b % (data * fsdp) == 0 and data % dcn == 0 and not three_axes:
                out.append((data, fsdp, tensor))
            fsdp *= 2
    return out


def host_memory_note() -> str | None:
    """This host's free memory and swap, printed before compiling for a TPU: a paper-size compile can take more than
    24 GiB of host memory (docs/scaling.md), and when the kernel's OOM killer ends it, nothing of ours is printed.
    None where /proc/meminfo does not exist or lacks those fields."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        gib = lambda key: int(info[key].split()[0]) * 1024 / GIB  # "MemAvailable:   22904448 kB"
        available, swap = gib("MemAvailable"), gib("SwapFree")
    except (OSError, KeyError, ValueError, IndexError):  # no such file, or a kernel without these fields
        return None
    return (f"[aot] host memory: {available:.1f} GiB available + {swap:.1f} GiB "
            f"swap; a full-size TPU compile can take more than 24 GiB (if this ends in 'Killed', see docs/scaling.md)")


def _advice(config: ml_collections.ConfigDict, remats: Sequence[str] = (), fsdp_is_every_chip: bool = False,
            one_clip_tried: bool = False) -> str:
    """What to try next, leaving out what the config, or a plan that refused it, already did: the remat policies
    it compiled, fsdp over every chip, one clip per batch shard (the smallest batch there is)."""
    tries = ["--sweep"] + ([] if fsdp_is_every_chip else ["more fsdp"])
    if "full" not in {str(config.model.unet.remat), *remats}:
        tries.append("config.model.unet.remat=full")
    if one_clip_tried:
        tries.append("config.mesh.tensor=2 (each clip split over 2 chips), fewer frames or a lower resolution "
                     "(or a TPU with more memory per chip)")
    else:
        tries.append("a smaller config.train.batch_size or grad_accum (or a larger TPU)")
    return "Try " + ", ".join(tries) + "."


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli_parser("atomo-aot", __doc__)
    parser.add_argument("--config", required=True, help="config file with get_config() (+ --config.a.b=value)")
    parser.add_argument("--topology", required=True,
                        help="TPU accelerator type (v4-32, v5e-16 / v5litepod-16, v5p-128, v6e-64), a topology name "
                             "(v5p:4x4x4), or cpu-N for N fake CPU devices")
    parser.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (multi-slice jobs)")
    parser.add_argument("--sweep", action="store_true", help="try mesh layouts x remat policies and print a table")
    parser.add_argument("--lower_only", action="store_true",
                        help="trace, shard and lower the step without compiling it (seconds, not minutes): checks "
                             "the mesh and shardings and prints the state + batch bytes per device, not temporaries")
    parser.add_argument("--plan", action="store_true",
                        help="find the largest micro-batch per chip that fits (config.train.batch_size is replaced) "
                             "and estimate step time, clips per hour and chip-hours for config.train.num_steps")
    parser.add_argument("--plan_remat", default="",
                        help="--plan: comma-separated remat policies to plan, each a row (default: the config's)")
    parser.add_argument("--max_clips", type=int, default=256, help="--plan: the largest micro-batch per shard tried")
    parser.add_argument("--price_per_chip_hour", type=float, help="--plan: price of one chip-hour, for the cost column")
    parser.add_argument("--peak_tflops", type=float,
                        help="--plan: dense bf16 TFLOP/s per chip assumed by the step-time estimate (default: the "
                             "chip's published peak; needed for cpu-N)")
    parser.add_argument("--hbm_gbps", type=float,
                        help="--plan: HBM GB/s per chip assumed by the estimate (default: the chip's published "
                             "figure; needed for cpu-N)")
    parser.add_argument("--compile_cache", default="",
                        help="directory of JAX's persistent compilation cache: a repeated plan, sweep or check for "
                             "cpu-N loads each program it compiled before (TPU-topology compiles are not served "
                             "from it with jax 0.10.2 / libtpu 0.0.42.1: docs/scaling.md)")
    parser.add_argument("--hbm_gib", type=float, help="override the per-chip memory capacity (GiB)")
    parser.add_argument("--usable_fraction", type=float, default=0.95,
                        help="fraction of the capacity a program may use (the runtime keeps the rest)")
    add_log_level(parser)
    args, config = parse_cli(parser, argv)
    try:
        target = parse_target(args.topology, args.num_slices)
    except ValueError as e:
        parser.error(str(e))
    if args.plan and (args.sweep or args.lower_only):
        parser.error("--plan compiles its own batch sizes: use it without --sweep / --lower_only")
    if args.max_clips < 1:
        parser.error(f"--max_clips={args.max_clips}: must be at least 1")
    if args.compile_cache:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(args.compile_cache)
    # Compiling touches no chip: let libtpu load while other jax processes on this host hold its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if target.generation == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={target.chips * target.num_slices}")
    if target.num_slices > 1 and int(config.mesh.dcn_data) == 1:
        with config.unlocked():
            config.mesh.dcn_data = target.num_slices
        print(f"[aot] {target.num_slices} slices: data parallelism across slices, config.mesh.dcn_data="
              f"{target.num_slices}", flush=True)
    # Only now, with the environment above set: jax reads it when it starts, on the first of these imports.
    from atomo_jax import fit_check
    from atomo_jax.models.unet import REMAT_POLICIES
    from atomo_jax.parallel.mesh import mesh_shape

    devices = fit_check.target_devices(target)
    cap = capacity(target, len(devices), args.hbm_gib, args.usable_fraction)
    note = host_memory_note() if target.generation != "cpu" and not args.lower_only else None
    if note:
        print(note, flush=True)

    # Every bucket is its own compiled step (the trainer's): each is checked, the one needing most memory named.
    buckets = fit_check.per_bucket(config)
    if args.lower_only:
        for bucket, c in buckets:
            try:
                _, mesh, inputs = fit_check.lower_train_step(c, devices)
            except ValueError as e:
                print(f"[aot] error: {e}", file=sys.stderr)
                return 2
            placed = fit_check.placed_bytes(inputs)
            print(f"[aot] lowered for {target.name}{f' (bucket {bucket})' if len(buckets) > 1 else ''}: mesh "
                  f"{dict(mesh.shape)}, arguments {placed / GIB:.2f} GiB ({placed:,} B) per device (state + batch; "
                  f"not compiled, so no temporaries)", flush=True)
        return 0
    if args.plan:
        answers = []
        for bucket, c in buckets:
            if len(buckets) > 1:
                print(f"[plan] bucket {bucket}", flush=True)
            rc, answer = _plan(args, c, target, devices, cap)
            if rc:
                return rc
            answers.append((answer, bucket))
        if len(buckets) > 1:  # one global batch for every bucket: the smallest answer
            (batch, remat), bucket = min(answers)
            print(f"[plan] answer for every bucket: --config.train.batch_size={batch} "
                  f"--config.model.unet.remat={remat} (bucket {bucket} binds)", flush=True)
        return 0
    if not args.sweep:
        reports = []
        for bucket, c in buckets:
            try:
                report = fit_check.compile_train_step(c, devices, cap)
            except ValueError as e:  # bad mesh/batch combination: the config's own error
                print(f"[aot] error: {e}", file=sys.stderr)
                return 2
            except fit_check.CompilerOutOfMemory as e:
                data, fsdp, tensor = mesh_shape(config.mesh, len(devices))
                print(f"[aot] DOES NOT FIT: bucket {bucket}: the {target.generation} compiler needs {e.needed} of "
                      f"temporaries per device, {e.available} available on {target.name} (mesh data={data} "
                      f"fsdp={fsdp} tensor={tensor}, remat={config.model.unet.remat}). {_advice(config)}",
                      file=sys.stderr, flush=True)
                return 1
            print(f"[aot] bucket {bucket}: " + describe(report, target, args.usable_fraction), flush=True)
            reports.append((report.peak_bytes, str(bucket), report))
        _, worst, report = max(reports)
        if len(reports) > 1:
            print(f"[aot] most memory: bucket {worst}, {report.peak_bytes / GIB:.2f} GiB per device", flush=True)
        if not report.fits:
            print(f"[aot] DOES NOT FIT: bucket {worst} needs {report.peak_bytes / GIB:.2f} GiB per device, "
                  f"{report.capacity_bytes / GIB:.2f} GiB usable on {target.name}. {_advice(config)}",
                  file=sys.stderr, flush=True)
            return 1
        print(f"[aot] fits on {target.name}", flush=True)
        return 0

    rows = []
    # A row is the layout's bucket that needs most memory (all of them when there are no buckets: one).
    print(f"{'data':>5} {'fsdp':>5} {'tensor':>6} {'remat':>13} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9} "
          f"{'TFLOP/dev':>9} {'fits':>5}{'  bucket' if len(buckets) > 1 else ''}", flush=True)
    for data, fsdp, tensor in sweep_layouts(config, len(devices)):
        for remat in REMAT_POLICIES:
            try:
                worst = None
                for bucket, bc in buckets:
                    c = bc.copy_and_resolve_references()
                    with c.unlocked():
                        c.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
                        c.model.unet.remat = remat
                    r = fit_check.compile_train_step(c, devices, cap)
                    if worst is None or r.peak_bytes > worst[1].peak_bytes:
                        worst = (bucket, r)
                bucket, r = worst
                row = (f"{data:>5} {fsdp:>5} {tensor:>6} {remat:>13} {r.argument_bytes / GIB:>9.2f} "
                       f"{r.temp_bytes / GIB:>9.2f} {r.peak_bytes / GIB:>9.2f} {r.flops / 1e12:>9.2f} "
                       f"{'yes' if r.fits else 'no':>5}{f'  {bucket}' if len(buckets) > 1 else ''}")
                rows.append(r)
            except fit_check.CompilerOutOfMemory as e:
                row = (f"{data:>5} {fsdp:>5} {tensor:>6} {remat:>13} {'-':>9} {e.needed:>9} {'-':>9} {'-':>9} "
                       f"{'no':>5}  (compiler: temporaries {e.needed} > {e.available})")
            except Exception as e:  # one failing layout should not end the sweep
                row = f"{data:>5} {fsdp:>5} {tensor:>6} {remat:>13} failed: {type(e).__name__}: {str(e)[:120]}"
            print(row, flush=True)
    fitting = [r for r in rows if r.fits]
    if not fitting:
        print(f"[aot] no layout fits on {target.name}", file=sys.stderr)
        return 1
    best = min(fitting, key=lambda r: (r.flops, r.peak_bytes))
    print(f"[aot] {len(fitting)}/{len(rows)} fit; least compute per step: mesh {best.layout} remat={best.remat}")
    return 0


def _plan(args: Any, config: ml_collections.ConfigDict, target: Target, devices: list,
          cap: float | None) -> tuple[int, tuple[int, str] | None]:
    """--plan: one `plan.largest_fitting` search per remat policy, then one table and the answer: (exit code,
    (global batch, remat) of the answer)."""
    from atomo_jax import fit_check
    from atomo_jax.models.unet import REMAT_POLICIES
    from atomo_jax.parallel.mesh import mesh_shape

    policies = [p for p in args.plan_remat.split(",") if p] or [str(config.model.unet.remat)]
    unknown = [p for p in policies if p not in REMAT_POLICIES]
    if unknown:
        print(f"[aot] error: --plan_remat: unknown policy {unknown}; expected some of {list(REMAT_POLICIES)}",
              file=sys.stderr)
        return 2, None
    if cap is None:
        print(f"[aot] error: --plan needs a memory capacity; {target.name} has none: pass --hbm_gib", file=sys.stderr)
        return 2, None
    chip = target.chip
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (chip.peak_flops if chip else None)
    bandwidth = args.hbm_gbps * 1e9 if args.hbm_gbps else (chip.hbm_bytes_per_s if chip else None)
    try:
        data, fsdp, tensor = mesh_shape(config.mesh, len(devices))
    except ValueError as e:
        print(f"[aot] error: {e}", file=sys.stderr)
        return 2, None
    shards, accum = data * fsdp, int(config.train.grad_accum)
    chips = target.chips * target.num_slices
    steps = int(config.train.num_steps)
    print(f"[plan] {target.name}: mesh data={data} fsdp={fsdp} tensor={tensor} ({shards} batch shards), grad_accum="
          f"{accum}; capacity {cap / GIB:.2f} GiB per device", flush=True)

    results = []
    for remat in policies:
        def measure(b: int, remat: str = remat):
            c = config.copy_and_resolve_references()
            with c.unlocked():
                c.train.batch_size = b * shards * accum
                c.model.unet.remat = remat
            try:
                return fit_check.compile_train_step(c, devices, cap)
            except fit_check.CompilerOutOfMemory:
                return None

        print(f"[plan] remat={remat}", flush=True)
        try:
            search = plan.largest_fitting(measure, cap, max_batch=args.max_clips,
                                          log=lambda line: print(line, flush=True))
        except ValueError as e:  # a config the trainer would refuse (e.g. a batch the mesh cannot split)
            print(f"[aot] error: {e}", file=sys.stderr)
            return 2, None
        results.append((remat, search))

    gib = lambda x: f"{x / GIB:.2f}"
    head = ["layout", "remat", "clips/chip", "global batch", "HBM/chip GiB: args / temps / out = peak (of usable)",
            "TFLOP/step/chip", "est. step s", "clips/hour", f"chip-hours ({steps} steps)"]
    if args.price_per_chip_hour:
        head.append("est. cost")
    head.append("compiles")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    best_row = None
    for remat, search in results:
        layout = f"data {data} fsdp {fsdp} tensor {tensor}"
        if not search.best:
            cells = [layout, remat, "0 (1 does not fit)"] + ["-"] * (len(head) - 4) + [str(len(search.tried))]
            print("| " + " | ".join(cells) + " |")
            continue
        r = search.report
        batch = search.best * shards * accum
        cells = [layout, remat, f"{search.best * shards / chips:g}", str(batch),
                 f"{gib(r.argument_bytes)} / {gib(r.temp_bytes)} / {gib(r.output_bytes)} = {gib(r.peak_bytes)} "
                 f"({gib(cap)})", f"{r.flops * accum / 1e12:.4g}"]
        est = None
        if peak and bandwidth:
            est = plan.Estimate.of(r.flops, r.bytes_accessed, peak, bandwidth, micro_batches=accum)
            chip_hours = est.chip_hours(steps, chips)
            cells += [f"{est.step_s:.4g} ({est.bound})", f"{est.clips_per_hour(batch):,.0f}", f"{chip_hours:,.4g}"]
            if args.price_per_chip_hour:
                cells.append(f"{chip_hours * args.price_per_chip_hour:,.2f}")
        else:
            cells += ["-", "-", "-"] + (["-"] if args.price_per_chip_hour else [])
        cells.append(str(len(search.tried)))
        print("| " + " | ".join(cells) + " |", flush=True)
        score = est.clips_per_hour(batch) if est else batch
        if best_row is None or score > best_row[0]:
            best_row = (score, remat, search.best, batch)
    if peak and bandwidth:
        print(f"[plan] step time is a roofline estimate, not a measurement: per micro-batch, max(FLOPs / "
              f"{peak / 1e12:.0f} TFLOP/s, bytes accessed / {bandwidth / 1e9:.0f} GB/s) per chip; no communication, "
              f"no kernel inefficiency (a lower bound on time)", flush=True)
    if best_row is None:
        print(f"[aot] DOES NOT FIT: not one clip per batch shard fits on {target.name} with remat "
              f"{'/'.join(policies)}. {_advice(config, policies, data * tensor == 1, one_clip_tried=True)}",
              file=sys.stderr, flush=True)
        return 1, None
    _, remat, b, batch = best_row
    print(f"[plan] answer for {target.name}: remat={remat}, {b} clips per batch shard, "
          f"--config.train.batch_size={batch} --config.model.unet.remat={remat}", flush=True)
    return 0, (batch, remat)


def run() -> None:
    """The `atomo-aot` console script and `python -m atomo_jax.aot`."""
    sys.exit(main())


if __name__ == "__main__":
    run()
