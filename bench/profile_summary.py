"""Where a jitted step spends its GPU time: trace a few calls with jax.profiler and sum the kernel time on the device
by kind of work and by kernel.

  from bench.profile_summary import profile_calls
  print(profile_calls(lambda: step(...), calls=3, trace_dir="/tmp/trace"))
"""

from __future__ import annotations

import collections
import glob
import re
from typing import Callable

import jax
from jax.profiler import ProfileData

KINDS = (  # first match wins; matched against the op name and its HLO text
    ("attention (cuDNN)",
     re.compile(r"cudnn.*(fmha|flash|sdpa)|__cudnn\$fmha|fmha|sdpa|dot_product_attention", re.I)),
    ("convolution", re.compile(r"conv(?!ert)|implicit_gemm", re.I)),  # not "convert"
    # cuBLAS names its Hopper kernels nvjet_* (and sm90_xmma_gemm_*, cutlass_*, splitKreduce)
    ("matmul", re.compile(r"gemm|cublas|dot|matmul|nvjet|cutlass|splitKreduce", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|nccl", re.I)),
)


def _stats(event) -> dict:
    try:
        return {k: v for k, v in event.stats}
    except Exception:  # stats are optional metadata; without them an op is classified by its name alone
        return {}


def summarize(xplane_path: str, calls: int, top: int = 60) -> str:
    data = ProfileData.from_file(xplane_path)
    by_op, by_kind = collections.Counter(), collections.Counter()
    example = None
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = [l for l in plane.lines if l.name == "XLA Ops"] or [l for l in plane.lines if "Stream" in l.name]
        for line in lines:
            for e in line.events:
                st = _stats(e)
                example = example or (e.name, st)
                ms = e.duration_ns / 1e6 / calls
                text = f"{e.name} {st.get('hlo_op', '')} {st.get('long_name', '')} {st.get('kernel_details', '')}"
                by_op[e.name] += ms
                by_kind[next((k for k, rx in KINDS if rx.search(text)), "fusion (elementwise/norm/reduce)")] += ms
    total = sum(by_op.values())
    if not by_op:  # unexpected trace layout: name what is there instead of printing an empty table
        return "no GPU kernel events; planes/lines: " + "; ".join(
            f"{p.name}: {[l.name for l in p.lines][:8]}" for p in data.planes)
    out = [f"device time per call: {total:.1f} ms (sum of kernels on the busiest lines, {calls} calls traced)"]
    for title, table in (("by kind", by_kind), ("by op", by_op)):
        out.append(f"-- {title}")
        out += [f"{ms:9.2f} ms {100 * ms / max(total, 1e-9):5.1f}%  {name[:110]}"
                for name, ms in table.most_common(top)]
    out.append(f"-- one event and its stats: {example}")
    return "\n".join(out)


def profile_calls(fn: Callable[[], object], calls: int, trace_dir: str) -> str:
    jax.block_until_ready(fn())
    with jax.profiler.trace(trace_dir):
        for _ in range(calls):
            jax.block_until_ready(fn())
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    return summarize(path, calls)
