"""Ahead-of-time checks of the real train step with abstract inputs only (nothing allocated): the demo (shrunk to
conftest's TINY_DEMO) compiled for a TPU topology from this CPU host (needs libtpu) and for fake CPU devices, the
refusal of a config that does not fit, and the full-size model traced, sharded and lowered on 8 fake CPU devices.
They run `python -m atomo_jax.aot` in subprocesses (the device count is fixed when jax starts); tests/run.sh installs
libtpu so CI runs the TPU one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from atomo_jax.aot import parse_target  # noqa: E402
from tests.conftest import FAST_CPU_COMPILE, TINY_DEMO  # noqa: E402

def _libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


def _aot(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if any(a.startswith("--topology=cpu-") for a in args):
        # The fit check never runs what it compiles: it reads the buffer sizes XLA assigns to the optimised HLO. LLVM
        # optimisation of the CPU kernels comes after that and changes none of them (memory_analysis() and the
        # FLOPs were identical with and without these flags, full-size step included), so skip it to save compile time.
        # TPU compiles keep the defaults: there the backend level may steer the passes that decide the memory.
        env["XLA_FLAGS"] = FAST_CPU_COMPILE
    return subprocess.run([sys.executable, "-m", "atomo_jax.aot", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_accelerator_names_map_to_topologies():
    got = {n: (t.topology_name, t.chips, t.chips_per_host_bounds)
           for n in ("v4-8", "v4-32", "v5p-8", "v5p-32", "v5p-128", "v5p-1024", "v5e-4", "v5e-8", "v5litepod-16",
                     "v5e-16", "v6e-64", "v6e-256", "v5p:4x4x8") for t in [parse_target(n)]}
    assert got == {
        "v4-8": ("v4:2x2x1", 4, (2, 2, 1)), "v4-32": ("v4:2x2x4", 16, (2, 2, 1)),
        "v5p-8": ("v5p:2x2x1", 4, (2, 2, 1)), "v5p-32": ("v5p:2x2x4", 16, (2, 2, 1)),
        "v5p-128": ("v5p:4x4x4", 64, (2, 2, 1)), "v5p-1024": ("v5p:8x8x8", 512, (2, 2, 1)),
        "v5e-4": ("v5e:2x2", 4, (2, 2, 1)), "v5e-8": ("v5e:2x4", 8, (2, 4, 1)),
        "v5litepod-16": ("v5e:4x4", 16, (2, 2, 1)), "v5e-16": ("v5e:4x4", 16, (2, 2, 1)),
        "v6e-64": ("v6e:8x8", 64, (2, 2, 1)), "v6e-256": ("v6e:16x16", 256, (2, 2, 1)),
        "v5p:4x4x8": ("v5p:4x4x8", 128, (2, 2, 1)),
    }
    assert parse_target("v5p-128", num_slices=2).num_slices == 2
    for bad in ("v5p-12", "v5e-12", "h100-8", "v5p", "v6e:4x4x4"):
        with pytest.raises(ValueError, match="topology"):
            parse_target(bad)


def test_config_that_does_not_fit_is_refused_with_numbers():
    """Two shape buckets: each is compiled and reported, and the refusal names the one that needs most memory. On the
    mesh of the plan test below: its first compile (1 clip per shard, 4x16x16) is this one's first bucket, served
    from the suite's compilation cache."""
    demo = (*TINY_DEMO, "--topology=cpu-2", "--config.mesh.data=2", "--config.data.buckets=((4,16,16),(4,16,32))")
    proc = _aot(*demo, "--hbm_gib=0.001", timeout=900)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[aot] bucket 4x16x16:" in proc.stdout and "[aot] bucket 4x16x32:" in proc.stdout
    assert "most memory: bucket 4x16x32" in proc.stdout
    assert "DOES NOT FIT: bucket 4x16x32" in proc.stderr and re.search(r"needs \d+\.\d+ GiB per device", proc.stderr)
    assert "temporaries" in proc.stdout and "FLOPs/step" in proc.stdout
    assert "config.model.unet.remat=full" in proc.stderr  # the demo runs without remat: advised
    # --lower_only's bytes (from the shardings, no compile) are the compiled program's argument bytes, to the byte:
    # what lets the full-size check below skip the compile.
    lowered = _aot(*demo, "--lower_only", timeout=900)
    assert lowered.returncode == 0, lowered.stdout[-2000:] + lowered.stderr[-3000:]
    assert "(bucket 4x16x16)" in lowered.stdout and "(bucket 4x16x32)" in lowered.stdout
    compiled_bytes = re.search(r"arguments \d+\.\d+ GiB \(([\d,]+) B\)", proc.stdout).group(1)
    assert re.search(r"arguments \d+\.\d+ GiB \(([\d,]+) B\) per device", lowered.stdout).group(1) == compiled_bytes


def test_advice_leaves_out_what_the_config_already_does():
    from atomo_jax.aot import _advice
    from configs import demo
    c = demo.get_config()
    c.model.unet.remat = "dots"
    assert "remat=full" in _advice(c)
    c.model.unet.remat = "full"
    assert "remat=full" not in _advice(c) and "--sweep" in _advice(c)
    # A plan that refused one clip per shard with remat full and fsdp over every chip: none of those again.
    c.model.unet.remat = "dots"
    refused = _advice(c, remats=("full",), fsdp_is_every_chip=True, one_clip_tried=True)
    assert "remat=full" not in refused and "more fsdp" not in refused and "batch_size" not in refused, refused
    assert "config.mesh.tensor=2" in refused and "fewer frames" in refused, refused


@pytest.mark.skipif(not _libtpu(), reason="libtpu is not installed (pip install 'libtpu==0.0.42.*' for jax 0.10.2); "
                    "it is what compiles for TPU on a CPU host")
def test_demo_compiles_for_a_small_tpu_topology():
    proc = _aot(*TINY_DEMO, "--topology=v5e-4", "--config.train.batch_size=4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "v5e:2x2" in proc.stdout and "fits on v5e-4" in proc.stdout
    # Before the compile, what the host has: a paper-size TPU compile can outgrow it and be killed without a word.
    assert re.search(r"host memory: \d+\.\d GiB available \+ \d+\.\d GiB swap", proc.stdout), proc.stdout[-2000:]
    assert re.search(r"peak +\d+\.\d+ GiB per device vs 15\.20 GiB usable", proc.stdout)


@pytest.mark.skipif(not _libtpu(), reason="libtpu is not installed (pip install 'libtpu==0.0.42.*' for jax 0.10.2); "
                    "it is what compiles for TPU on a CPU host")
def test_mesh_axis_that_is_no_product_of_torus_axes_still_builds():
    """fsdp 8 on v5e-16's 4x4 torus (and fsdp 16 on v5e-64's 8x8) takes part of a physical axis: the mesh builds and
    the step lowers, where jax's default assignment raised NotImplementedError through our CLI."""
    proc = _aot(*TINY_DEMO, "--topology=v5e-16", "--config.mesh.data=2", "--config.mesh.fsdp=8",
                "--config.train.batch_size=16", "--lower_only", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "lowered for v5e-16: mesh {'data': 2, 'fsdp': 8, 'tensor': 1}" in proc.stdout, proc.stdout[-2000:]


def test_full_size_step_lowers_on_8_fake_devices_with_fsdp():
    """SD 1.5 + temporal layers + IP-Adapter (with the frozen VAE and CLIP encoders inside the step) at 256 px x 16
    frames, fsdp=8: traced, sharded and lowered without allocating weights. The XLA compile of this program adds
    7-10 minutes of one core here and no check the demo-size compiles above do not make (the byte count is the
    compiled one, see the test above); `atomo-aot` without --lower_only compiles it."""
    proc = _aot("--config=configs/base.py", "--topology=cpu-8", "--config.mesh.data=1", "--config.mesh.fsdp=8",
                "--config.train.batch_size=8", "--config.data.num_frames=16", "--config.data.resolution=256",
                "--lower_only")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "{'data': 1, 'fsdp': 8, 'tensor': 1}" in proc.stdout
    args = float(re.search(r"arguments (\d+\.\d+) GiB", proc.stdout).group(1))
    # ~2.2 B parameters (UNet + VAE + CLIP ViT-H + text encoder) in fp32 plus Adam/EMA for the trainable part, split
    # 8 ways: far below the unsharded total.
    assert 0.5 < args < 8, proc.stdout


def test_tpu_compiler_refusal_becomes_compiler_out_of_memory(monkeypatch):
    """XLA:TPU refuses a program whose temporaries exceed HBM with a RESOURCE_EXHAUSTED error (message as seen from
    libtpu for the paper config on v5p-32); compile_train_step turns it into CompilerOutOfMemory with both numbers,
    and other compile errors pass through unchanged."""
    import jax
    from jax._src import stages

    from atomo_jax.fit_check import CompilerOutOfMemory, compile_train_step
    from configs import demo

    config = demo.get_config()
    config.data.num_frames = 2
    config.train.batch_size = 1
    config.mesh.data = 1
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(161.84G) exceeds available HBM (95.74G).")

    def refuse(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError(message)

    monkeypatch.setattr(stages.Lowered, "compile", refuse)
    with pytest.raises(CompilerOutOfMemory) as err:
        compile_train_step(config, jax.devices()[:1])
    assert (err.value.needed, err.value.available) == ("161.84G", "95.74G")

    def other(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(stages.Lowered, "compile", other)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        compile_train_step(config, jax.devices()[:1])


class _Peak:
    """A stand-in for fit_check.Report: what the planner reads of a compile."""

    def __init__(self, peak: float, capacity: float):
        self.peak_bytes, self.fits = peak, peak <= capacity


def _search(memory, capacity: float, refused_from: int | None = None, **kw):
    from atomo_jax.plan import largest_fitting
    calls = []

    def measure(b):
        calls.append(b)
        return None if refused_from and b >= refused_from else _Peak(memory(b), capacity)

    return largest_fitting(measure, capacity, log=lambda line: None, **kw), calls


def test_plan_search_fits_a_line_and_steps_down_where_it_overshoots_or_is_refused():
    # Memory linear in the batch: compile at 1 and 2, predict, confirm: 3 compiles, the exact answer.
    search, calls = _search(lambda b: 10 + 3 * b, 40)
    assert (search.best, calls) == (10, [1, 2, 10])
    assert search.report.peak_bytes == 40
    # Memory growing faster than the line (activations plus a quadratic term): the first guess (11) does not fit,
    # the search steps down across the boundary and lands on the true largest, 7.
    memory = lambda b: 10 + 3 * b + 0.5 * b * b
    search, calls = _search(memory, 60)
    assert search.best == max(b for b in range(1, 100) if memory(b) <= 60) == 7
    assert calls[:3] == [1, 2, 11] and len(calls) <= 6 and all(memory(b) > 60 for b in calls if b > 7)
    # The compiler refuses from 50 on (no peak to fit): bisection, every answer confirmed, within the budget.
    search, calls = _search(lambda b: 10 + 3 * b, 400, refused_from=50, max_compiles=10)
    assert search.best == 49 and len(calls) <= 10 and search.tried[50] is None
    # Not even one clip: one compile, answer 0.
    search, calls = _search(lambda b: 10 + 3 * b, 12)
    assert (search.best, calls, search.report) == (0, [1], None)
    # The batch cap holds when memory does not bound it.
    search, _ = _search(lambda b: 10.0, 40, max_batch=16)
    assert search.best == 16


def test_roofline_estimate_takes_the_binding_limit():
    from atomo_jax.plan import Estimate
    compute = Estimate.of(flops=4e12, bytes_accessed=1e9, peak_flops=1e12, hbm_bytes_per_s=1e12, micro_batches=2)
    assert (compute.step_s, compute.bound) == (8.0, "compute")  # 4 s per micro-batch, two of them
    memory = Estimate.of(flops=1e12, bytes_accessed=3e12, peak_flops=1e12, hbm_bytes_per_s=1e12)
    assert (memory.step_s, memory.bound) == (3.0, "memory")
    assert memory.clips_per_hour(6) == 6 / 3.0 * 3600 and memory.chip_hours(steps=1200, chips=16) == 3.0 * 1200 * 16 / 3600


def test_plan_finds_the_largest_batch_per_device_on_fake_devices():
    """`--plan` as a user runs it, on 2 fake CPU devices with a made-up capacity: the search's compiles, one table
    row per remat policy asked for, the roofline columns from the assumed peaks, and the answer as flags."""
    proc = _aot(*TINY_DEMO, "--topology=cpu-2", "--config.mesh.data=2", "--plan", "--hbm_gib=0.05",
                "--peak_tflops=1", "--hbm_gbps=50", "--price_per_chip_hour=2.5", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tried = [(int(b), float(gib), ok == "fits") for b, gib, ok in
             re.findall(r"micro-batch (\d+) per shard: ([\d.]+) GiB per device, (fits|does not fit)", proc.stdout)]
    assert [b for b, _, _ in tried[:2]] == [1, 2] and len(tried) <= 5, proc.stdout
    best = int(re.search(r"answer for cpu-2: remat=none, (\d+) clips per batch shard", proc.stdout).group(1))
    assert best >= 3 and (best, True) in [(b, ok) for b, _, ok in tried], proc.stdout  # confirmed by a compile
    assert all(not ok for b, _, ok in tried if b > best)
    assert f"--config.train.batch_size={2 * best} --config.model.unet.remat=none" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| data 2 fsdp 1 tensor 1 | none"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == str(best) and cells[3] == str(2 * best)  # clips per chip (2 chips, 2 shards), global batch
    assert re.fullmatch(r"[\d.]+ \((compute|memory)\)", cells[6]) and float(cells[9]) > 0, row  # estimate, cost
    assert "roofline estimate, not a measurement" in proc.stdout


def test_plan_refuses_flags_it_cannot_honour_in_one_line():
    for extra, message in ((["--sweep"], "--plan compiles its own batch sizes"), (["--max_clips=0"], "--max_clips=0")):
        proc = _aot(*TINY_DEMO, "--topology=cpu-2", "--plan", "--hbm_gib=1", *extra, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_plan_that_fits_not_one_clip_says_so_and_advises_only_what_it_did_not_try():
    """One clip per shard over the capacity: exit 1, the table's row says so, and the advice names neither the remat
    policy the plan compiled nor a smaller batch (one clip per shard is the smallest): one compile of the tiny demo."""
    proc = _aot(*TINY_DEMO, "--topology=cpu-2", "--config.mesh.data=2", "--plan", "--plan_remat=full",
                "--hbm_gib=0.001", timeout=1500)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| data 2 fsdp 1 tensor 1 | full | 0 (1 does not fit) |" in proc.stdout, proc.stdout[-3000:]
    assert "DOES NOT FIT: not one clip per batch shard fits on cpu-2 with remat full" in proc.stderr, proc.stderr
    assert "remat=full" not in proc.stderr.split("Try ")[1] and "batch_size" not in proc.stderr, proc.stderr
    assert "more fsdp" in proc.stderr and "config.mesh.tensor=2" in proc.stderr, proc.stderr  # data 2: fsdp can grow
