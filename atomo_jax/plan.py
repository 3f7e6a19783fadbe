"""Pod planning: the largest micro-batch that fits per device, found with few compiles, and what a step costs.

Each compile of the full-size step for a TPU topology takes 5-30 minutes on a CPU host, so the search never sweeps:
per-device memory of the train step is, to a good approximation, a line in the micro-batch (weights, optimizer state
and code do not grow with it; activations and the batch do). `largest_fitting` compiles at 1 and 2 clips per batch
shard, predicts from that line the largest that fits, confirms the prediction with one compile and refits with
every point measured until the answer is confirmed (stepping down on a refusal, up where the line was pessimistic).

The planner knows nothing of jax: `measure(b)` compiles (in atomo_jax.aot) and returns the fit check's Report, or
None when the compiler refused the program for the chip's memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


@dataclasses.dataclass
class Search:
    """Outcome of `largest_fitting`: the answer (0: not even one clip fits), its report, and every compile made."""
    best: int
    report: Any | None
    tried: dict[int, Any | None]  # micro-batch per shard -> Report (None: the compiler refused it)


def _predict(points: list[tuple[int, float]], capacity: float) -> int | None:
    """Largest b with the least-squares line through `points` (b, peak bytes) at or under `capacity`."""
    if len(points) < 2:
        return None
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mp = sum(p for _, p in points) / n
    var = sum((b - mb) ** 2 for b, _ in points)
    slope = sum((b - mb) * (p - mp) for b, p in points) / var if var else 0.0
    if slope <= 0:  # memory that does not grow with the batch: no bound from the line
        return None
    return math.floor((capacity - (mp - slope * mb)) / slope)


def largest_fitting(measure: Callable[[int], Any | None], capacity: float, max_batch: int = 1024,
                    max_compiles: int = 8, log: Callable[[str], None] = print) -> Search:
    """The largest micro-batch per shard in [1, max_batch] whose compiled step fits `capacity` bytes per device.

    Each measured point is a compile. The next guess lies strictly between the largest batch that fitted and the
    smallest that did not: on the line through the two measured points either side of the capacity (or the two
    largest that fit), bisecting where a refusal by the compiler (no peak) bounds it. The search stops when the
    line's answer is confirmed to fit (for memory linear in the batch: 3 compiles), or after `max_compiles`
    compiles with the largest confirmed; one more clip than the answer is predicted, not compiled, not to fit.
    """
    tried: dict[int, Any | None] = {}

    def fits(b: int) -> bool:
        if b not in tried:
            log(f"[plan] compiling micro-batch {b} per shard (compile {len(tried) + 1}, at most {max_compiles})")
            report = measure(b)
            tried[b] = report
            peak = "refused by the compiler" if report is None else f"{report.peak_bytes / 2 ** 30:.2f} GiB"
            log(f"[plan] micro-batch {b} per shard: {peak} per device, "
                f"{'fits' if report is not None and report.fits else 'does not fit'}")
        report = tried[b]
        return report is not None and report.fits

    if not fits(1):
        return Search(0, None, tried)
    best, refused = 1, max_batch + 1
    candidate = 2
    while candidate is not None and len(tried) < max_compiles:
        if fits(candidate):
            best = max(best, candidate)
        else:
            refused = min(refused, candidate)
        measured = sorted((b, r.peak_bytes, r.fits) for b, r in tried.items() if r is not None)
        fitting = [(b, p) for b, p, ok in measured if ok]
        over = [(b, p) for b, p, ok in measured if not ok]
        # Across the boundary where both sides are measured (the secant: exact for a line, close for a curve),
        # else extrapolated from the two largest that fit.
        guess = _predict([fitting[-1], over[0]] if over else fitting[-2:], capacity)
        if guess is None or guess >= refused:  # no line, or one that points past a refusal: bisect
            guess = (best + refused) // 2
        guess = min(guess, max_batch)
        candidate = guess if guess > best and guess not in tried else None
    return Search(best, tried[best], tried)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Roofline estimate of one optimizer step from the compiled cost analysis: per micro-batch, FLOPs at the chip's
    peak or bytes at its memory bandwidth, whichever takes longer. No communication and no kernel inefficiency: a
    lower bound on the step time, so an upper bound on throughput."""
    step_s: float
    bound: str  # "compute" or "memory"

    @classmethod
    def of(cls, flops: float, bytes_accessed: float, peak_flops: float, hbm_bytes_per_s: float,
           micro_batches: int = 1) -> "Estimate":
        """`flops` / `bytes_accessed` of one compiled step per device; XLA's cost analysis counts the body of the
        gradient-accumulation loop once, so a step of `micro_batches` costs that many times the figures."""
        compute, memory = flops / peak_flops, bytes_accessed / hbm_bytes_per_s
        return cls(max(compute, memory) * micro_batches, "compute" if compute >= memory else "memory")

    def clips_per_hour(self, global_batch: int) -> float:
        return global_batch / self.step_s * 3600

    def chip_hours(self, steps: int, chips: int) -> float:
        return self.step_s * steps * chips / 3600
