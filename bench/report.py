"""Prints the benchmark tables from results.jsonl (latest entry per configuration): speed, then multi-GPU scaling."""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict:
    rows = {}
    for line in open(path):
        r = json.loads(line)
        key = (r["kind"], r["impl"], r.get("batch"), r.get("latent"), r.get("trainable"), r.get("devices", 1),
               r.get("layout", "data"))
        rows[key] = r
    return rows


def scaling(rows: dict) -> list[str]:
    """Efficiency of each multi-GPU row: the 1-GPU step time over the N-GPU step time at the same per-GPU batch
    (1.0 = N times the throughput)."""
    lines = []
    for k, r in sorted(rows.items(), key=lambda kv: str(kv[0])):
        if k[0] != "train" or k[5] == 1:
            continue
        one = rows.get(k[:5] + (1, "data"))
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
    """batch x latent; sampling rows (one video) have no batch."""
    return f"{'-' if key[2] is None else key[2]} x {key[3]}"


def speedups(rows: dict) -> list[str]:
    """Ours (full fine-tune, one GPU) over each PyTorch peer row of the same kind and size: peer time / our time."""
    lines = []
    for k, r in sorted(rows.items(), key=lambda kv: str(kv[0])):
        if not k[1].startswith("torch") or k[5] != 1:
            continue
        ours = rows.get((k[0], "jax", k[2], k[3], "all" if k[0] == "train" else None, 1, "data"))
        if ours is not None:
            field = "s_per_step" if k[0] == "train" else "s_per_video"
            lines.append(f"speedup {k[0]} {size(k)}: jax vs {k[1]} {r[field] / ours[field]:.2f}")
    return lines


def main(path: str) -> None:
    rows = load(path)
    peak = max((r["tflops"] for k, r in rows.items() if k[0] == "matmul"), default=None)
    print(f"bf16 matmul peak measured: {peak and round(peak)} TFLOP/s")
    print("| kind | impl | batch x latent | GPUs | trainable | s/step or s/video | each step waited for | TFLOP/s/GPU "
          "| MFU | peak GiB | step-1 loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
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
              f"{loss and round(loss, 5)} |")
    for line in speedups(rows) + scaling(rows):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
