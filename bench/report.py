"""Prints the benchmark tables from results.jsonl (latest entry per configuration): speed, then multi-GPU scaling."""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict:
    rows = {}
    for line in open(path):
        r = json.loads(line)
        if r["kind"] == "flops":  # counts for --model_flops, not timings
            continue
        trainable = r.get("trainable") or ("all" if r["kind"] == "train" else None)  # early peer rows: full
        key = (r["kind"], r["impl"], r.get("batch"), r.get("latent"), trainable, r.get("devices", 1),
               r.get("layout", "data"), r.get("frames", 16))
        rows[key] = r
    return rows


def scaling(rows: dict) -> list[str]:
    """Efficiency of each multi-GPU row: the 1-GPU step time over the N-GPU step time at the same per-GPU batch
    (1.0 = N times the throughput)."""
    lines = []
    for k, r in sorted(rows.items(), key=lambda kv: str(kv[0])):
        if k[0] != "train" or k[5] == 1:
            continue
        one = rows.get(k[:5] + (1, "data", k[7]))
        if one is None:
            continue
        eff = one["s_per_step"] / r["s_per_step"]
        lines.append(f"| {k[1]} | {k[2]} x {k[3]} per GPU | {k[5]} x {k[6]} | {r['s_per_step']:.3f} | "
                     f"{one['s_per_step']:.3f} | {eff:.3f} | {r.get('peak_gib') and round(r['peak_gib'], 1)} |")
    if lines:
        lines = ["| impl | batch x latent | GPUs x layout | s/step | 1-GPU s/step | efficiency | peak GiB/GPU |",
                 "|---|---|---|---|---|---|---|"] + lines
    return lines


def size(key: tuple) -> str:
    """batch x latent (x frames where not 16); sampling rows (one video) have no batch."""
    return f"{'-' if key[2] is None else key[2]} x {key[3]}" + ("" if key[7] == 16 else f" x {key[7]}f")


def _time(r: dict) -> float:
    return r["s_per_step"] if r["kind"] == "train" else r["s_per_video"]


def speedups(rows: dict) -> list[str]:
    """Ours (one GPU) over each PyTorch peer row of the same kind, size and trainable set: peer time / our time."""
    lines = []
    for k, r in sorted(rows.items(), key=lambda kv: str(kv[0])):
        if not k[1].startswith("torch") or k[5] != 1:
            continue
        ours = rows.get((k[0], "jax") + k[2:])
        if ours is not None:
            what = f"{k[0]} {size(k)}" + (f" {k[4]}" if k[4] else "")
            lines.append(f"speedup {what}: jax vs {k[1]} {_time(r) / _time(ours):.2f}")
    return lines


# The issue-27 headline lines: (name, kind, impl of the peer or None for a rate, batch, latent, trainable, frames)
HEADLINES = (
    ("train_speedup_paper_shape", "train", "torch_regional", 1, 64, "paper", 24),
    ("train_speedup_paper_shape_full", "train", "torch_regional", 1, 64, "all", 24),
    ("train_speedup_vs_torch_compile_b4_256", "train", "torch_regional", 4, 32, "all", 16),
    ("train_tflops_per_gpu_b4_256", "train", None, 4, 32, "all", 16),
    ("sample_speedup_vs_diffusers", "sample", "torch_eager", None, 64, None, 16),
    ("sample_speedup_vs_diffusers_compiled", "sample", "torch_regional", None, 64, None, 16),
)


def headlines(rows: dict, peak: float | None) -> list[str]:
    lines = []
    for name, kind, peer, batch, latent, trainable, frames in HEADLINES:
        ours = rows.get((kind, "jax", batch, latent, trainable, 1, "data", frames))
        if ours is None:
            continue
        if peer is None:
            if ours.get("tflops"):
                lines.append(f"{name}: {ours['tflops']:.0f}")
                if peak:
                    lines.append(f"{name.replace('tflops_per_gpu', 'mfu')}: {ours['tflops'] / peak:.2f}")
            continue
        other = rows.get((kind, peer, batch, latent, trainable, 1, "data", frames))
        if other is not None:
            lines.append(f"{name}: {_time(other) / _time(ours):.2f}")
    return lines


def main(path: str) -> None:
    rows = load(path)
    peak = max((r["tflops"] for k, r in rows.items() if k[0] == "matmul"), default=None)
    print(f"bf16 matmul peak measured: {peak and round(peak)} TFLOP/s")
    print("| kind | impl | batch x latent | GPUs | trainable | s/step or s/video | each step waited for | TFLOP/s/GPU "
          "| MFU | peak GiB | state GiB | step-1 loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, r in sorted(rows.items(), key=lambda kv: str(kv[0])):
        if k[0] == "matmul":
            continue
        t = r.get("s_per_step", r.get("s_per_video"))
        tf = r.get("tflops")
        mfu = tf / peak if tf and peak else None
        loss = r.get("first_loss", r.get("loss"))
        sync = r.get("s_per_step_sync")
        print(f"| {k[0]} | {k[1]} | {size(k)} | {k[5]} {k[6]} | {k[4] or '-'} | {t:.3f} | "
              f"{'-' if sync is None else f'{sync:.3f}'} | {tf and round(tf, 1)} | "
              f"{mfu and round(mfu, 3)} | {r.get('peak_gib') and round(r['peak_gib'], 1)} | "
              f"{r.get('state_gib') and round(r['state_gib'], 1)} | {loss and round(loss, 5)} |")
    for line in speedups(rows) + scaling(rows) + headlines(rows, peak):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
