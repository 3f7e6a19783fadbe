"""Two local processes (4 fake CPU devices each, jax.distributed on 127.0.0.1 through the ATOMO_* variables the
trainer honours) train like one process with 8 devices: same mesh, same global batches, same losses.

The dataset is exactly one global batch, unshuffled, so both runs see the same examples whatever the per-process
sharding of the sampler. Tolerance: per-step losses agree to relative 1e-5 (only collective order may differ).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from tests.conftest import FAST_CPU_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent("""
    from configs import demo

    def get_config():
        c = demo.get_config()
        c.train.num_steps = 3
        c.train.batch_size = 8
        c.train.log_every = 1
        c.data.num_frames = 4
        c.data.num_videos = 8
        c.data.shuffle = False
        c.mesh.data = -1
        c.mesh.fsdp = 4
        c.checkpoint.every_steps = 0
        c.checkpoint.async_save = False
        c.sample.at_end = False
        return c
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cfg: str, workdir: str, devices: int, extra: dict | None = None) -> subprocess.Popen:
    # FAST_CPU_COMPILE: three trainers compile at once for 3 steps; the test compares losses, not speed.
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_CPU_COMPILE}", **(extra or {})}
    return subprocess.Popen([sys.executable, "-m", "atomo_jax.train", f"--config={cfg}", f"--workdir={workdir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir: str) -> list[float]:
    return [json.loads(x)["loss"] for x in open(os.path.join(workdir, "losses.jsonl"))]


def test_two_processes_train_like_one(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    port = _free_port()
    procs = [_run(str(cfg), one, 8)]
    procs += [_run(str(cfg), two, 4, {"ATOMO_COORDINATOR": f"127.0.0.1:{port}", "ATOMO_NUM_PROCESSES": "2",
                                      "ATOMO_PROCESS_ID": str(i)}) for i in range(2)]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "devices=8 mesh={'data': 2, 'fsdp': 4, 'tensor': 1}" in outs[0]
    assert "devices=8 mesh={'data': 2, 'fsdp': 4, 'tensor': 1}" in outs[1]
    a, b = np.asarray(_losses(one)), np.asarray(_losses(two))
    assert a.shape == b.shape == (3,)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5, (a, b)
    # Both processes wrote one shared checkpoint at the end.
    assert os.listdir(os.path.join(two, "checkpoints")) == ["3"] or "3" in os.listdir(os.path.join(two, "checkpoints"))
