"""Input-pipeline throughput: decoded + transformed frames per second per CPU core, and from cached latents.

    python bench/data_throughput.py [--clips 24] [--out FILE.md]

Pixels: H.264 files written here (moving textured content, 25 fps, 6 s), 16-frame clips at stride 4 with a random
start, short-side resize + random crop to 256 (from 640x360, WebVid-like) and 512 (from 1280x720), scaled to
[-1, 1] with the conditioning frame: exactly the loader's per-record transform (`MakeExample`), run in one process
with one decode thread, timed with CPU time (so the figure is per core even on a busy host) and wall time.
Latents: the loader's `LatentToExample` over ArrayRecord shards written by the cache format (float16 latents).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from array_record.python.array_record_module import ArrayRecordWriter  # noqa: E402

from data_pipelines.loader import LatentToExample, MakeExample  # noqa: E402
from data_pipelines.sources import LatentShardsSource, encode_record  # noqa: E402
from data_pipelines.video_decode import ClipSpec  # noqa: E402

NUM_FRAMES, STRIDE, FPS, SECONDS = 16, 4, 25, 6
STEP_S, BATCH = 0.4, 4  # the peer's training step (DESIGN.md: 0.400 s/step, batch 4 x 16 frames)


def write_video(path: str, width: int, height: int, seed: int) -> None:
    """Moving blurred-noise texture + a moving gradient: compressible like real footage, not trivially."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    texture = np.kron(texture, np.ones((8, 8, 1), np.uint8))
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "g": "50"}
        for i in range(FPS * SECONDS):
            shifted = np.roll(texture, (i, 2 * i), axis=(0, 1))[:height, :width]
            grad = ((xs + 3 * i) % 256).astype(np.uint8)[..., None]
            frame = (shifted // 2 + grad // 2).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class ListSource:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def time_pixels(paths: list[str], resolution: int, clips: int) -> dict:
    source = ListSource([{"path": p, "caption": "bench", "key": str(i)} for i, p in enumerate(paths)])
    transform = MakeExample(source, [ClipSpec(NUM_FRAMES, resolution, stride=STRIDE)], decode_timeout_s=None)
    transform.random_map(source[0], np.random.default_rng(0))  # warm-up (codec init, page cache)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(clips):
        example = transform.random_map(source[i % len(source)], np.random.default_rng(i))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert example["video"].shape == (NUM_FRAMES, resolution, resolution, 3)
    frames = clips * NUM_FRAMES
    return {"frames_per_cpu_s": frames / cpu, "frames_per_wall_s": frames / wall, "clips": clips}


def time_latents(tmp: str, latent_size: int, records: int) -> dict:
    path = os.path.join(tmp, f"latents-{latent_size}.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    rng = np.random.default_rng(0)
    for i in range(records):
        writer.write(encode_record({
            "latents": rng.standard_normal((NUM_FRAMES, latent_size, latent_size, 4)).astype(np.float16),
            "image_embeds": rng.standard_normal(1024).astype(np.float32), "tokens": np.zeros(77, np.int32),
            "caption": "bench", "key": str(i)}))
    writer.close()
    source = LatentShardsSource([path])
    transform = LatentToExample([NUM_FRAMES])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(records):
        example = transform.random_map(source[i], np.random.default_rng(i))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert example["latents"].shape == (NUM_FRAMES, latent_size, latent_size, 4)
    frames = records * NUM_FRAMES
    return {"frames_per_cpu_s": frames / cpu, "frames_per_wall_s": frames / wall, "clips": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24, help="clips timed per pixel setting")
    parser.add_argument("--out", default=None, help="write a markdown report here")
    args = parser.parse_args()
    need = BATCH * NUM_FRAMES / STEP_S  # frames per second one accelerator consumes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for resolution, (w, h) in ((256, (640, 360)), (512, (1280, 720))):
            paths = [os.path.join(tmp, f"{resolution}-{k}.mp4") for k in range(2)]
            for k, p in enumerate(paths):
                write_video(p, w, h, seed=k)
            r = time_pixels(paths, resolution, args.clips)
            rows.append((f"pixels {resolution} px (H.264 {w}x{h} -> decode, resize, crop, [-1,1])", r))
        for resolution in (256, 512):
            r = time_latents(tmp, resolution // 8, 200)
            rows.append((f"cached latents {resolution} px ({resolution // 8}x{resolution // 8}x4 fp16)", r))
    lines = [
        f"Host: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores (shared), "
        f"python {platform.python_version()}, av {av.__version__}.",
        "",
        "| input | frames/s per core (CPU time) | frames/s (wall) | clips timed | cores per accelerator at "
        f"{STEP_S} s/step, batch {BATCH} x {NUM_FRAMES} ({need:.0f} frames/s) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        cores = need / r["frames_per_cpu_s"]
        lines.append(f"| {name} | {r['frames_per_cpu_s']:.0f} | {r['frames_per_wall_s']:.0f} | {r['clips']} "
                     f"| {cores:.2f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
