"""Prints the benchmark table from results.jsonl (latest entry per configuration)."""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict:
    rows = {}
    for line in open(path):
        r = json.loads(line)
        key = (r["kind"], r["impl"], r.get("batch"), r.get("latent"), r.get("trainable"))
        rows[key] = r
    return rows


def main(path: str) -> None:
    rows = load(path)
    peak = max((r["tflops"] for k, r in rows.items() if k[0] == "matmul"), default=None)
    print(f"bf16 matmul peak measured: {peak and round(peak)} TFLOP/s")
    print("| kind | impl | batch x latent | trainable | s/step or s/video | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in sorted(rows.items(), key=lambda kv: str(kv[0])):
        if k[0] == "matmul":
            continue
        t = r.get("s_per_step", r.get("s_per_video"))
        tf = r.get("tflops")
        mfu = tf / peak if tf and peak else None
        print(f"| {k[0]} | {k[1]} | {k[2]} x {k[3]} | {k[4] or '-'} | {t:.3f} | {tf and round(tf, 1)} | "
              f"{mfu and round(mfu, 3)} | {r.get('peak_gib') and round(r['peak_gib'], 1)} |")


if __name__ == "__main__":
    main(sys.argv[1])
