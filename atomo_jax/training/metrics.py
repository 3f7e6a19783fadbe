"""Throughput accounting (FLOPs from the compiled step, MFU) and the TensorBoard / stdout writers."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax

# Dense bf16 peak per chip (vendor figures), used for MFU when the device kind is recognised.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one execution from XLA's cost analysis (per device for SPMD programs)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


class MetricWriter:
    """TensorBoard event files (process 0 only) + one progress line per log step on stdout."""

    def __init__(self, logdir: str, enabled: bool, resumed_at: int | None = None):
        """`resumed_at`: the restored step; TensorBoard hides the points a killed run logged after it, so steps
        re-run after a restart show once."""
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter
            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(logdir, purge_step=None if resumed_at is None else resumed_at + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def video(self, step: int, tag: str, frames_uint8: Any, fps: int) -> None:
        if self.writer is not None:  # tensorboardX wants (N, T, C, H, W)
            self.writer.add_video(tag, frames_uint8[None].transpose(0, 1, 4, 2, 3), step, fps=fps)
            self.writer.flush()

    @staticmethod
    def progress(step: int, total: int, values: dict[str, float]) -> None:
        keys = ("loss", "grad_norm", "lr", "steps_per_s", "examples_per_s", "data_wait_s", "tflops_per_device", "mfu")
        parts = [f"{k}={values[k]:.4g}" for k in keys if k in values and values[k] is not None]
        print(f"[train] step {step}/{total} " + " ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
