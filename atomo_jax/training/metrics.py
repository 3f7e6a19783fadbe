"""Throughput accounting (FLOPs from the compiled step, MFU) and the TensorBoard / stdout writers."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
# TensorBoard's own event writer and protos: tensorboardX's SummaryWriter imports torch (2.5 CPU-seconds and 220 MB
# in every trainer process) for features we do not use.
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

# Dense bf16 peak per chip (vendor figures), used for MFU when the device kind is recognised.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device(configured: float = 0.0) -> float | None:
    """Peak dense FLOP/s of one device for MFU: `configured` (config.train.peak_flops) when > 0, else the table's
    entry for this device kind, else None (no MFU)."""
    if configured > 0:
        return float(configured)
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def compiled_cost(compiled: Any, key: str = "flops") -> float | None:
    """One figure of XLA's cost analysis of one execution (per device for SPMD programs): "flops" or
    "bytes accessed"; None where the backend does not report it."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost[key]) if cost and key in cost else None


def format_duration(seconds: float) -> str:
    """12345.6 -> '3:25:46'; 75 -> '1:15'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MetricWriter:
    """TensorBoard event files (process 0 only) + one progress line per log step on stdout."""

    def __init__(self, logdir: str, enabled: bool, resumed_at: int | None = None):
        """`resumed_at`: the restored step; TensorBoard hides the points a killed run logged after it, so steps
        re-run after a restart show once."""
        self.writer = None
        if enabled:
            os.makedirs(logdir, exist_ok=True)
            self.writer = EventFileWriter(logdir)
            if resumed_at is not None:  # TensorBoard drops the points at steps >= a START's step written before it
                self.writer.add_event(Event(wall_time=time.time(), step=resumed_at + 1,
                                            session_log=SessionLog(status=SessionLog.START)))

    def _write(self, step: int, values: list[Summary.Value]) -> None:
        if self.writer is not None:
            self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
            self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(step, [Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])

    def image(self, step: int, tag: str, encoded: bytes, height: int, width: int) -> None:
        """An already encoded PNG or GIF: TensorBoard's image dashboard shows an animated GIF as a moving picture."""
        self._write(step, [Summary.Value(tag=tag, image=Summary.Image(height=height, width=width, colorspace=3,
                                                                      encoded_image_string=encoded))])

    @staticmethod
    def progress(step: int, total: int, values: dict[str, float]) -> None:
        keys = ("loss", "grad_norm", "lr", "steps_per_s", "examples_per_s", "data_wait_s", "tflops_per_device", "mfu")
        parts = [f"{k}={values[k]:.4g}" for k in keys if k in values and values[k] is not None]
        if values.get("steps_per_s"):  # at the rate since the last line
            parts.append(f"eta={format_duration((total - step) / values['steps_per_s'])}")
        print(f"[train] step {step}/{total} " + " ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
