"""PyAV clip decoding: frame sampling by stride or target fps, random start, short-side resize, crop.

Containers are opened inside the call (so inside each grain worker) and closed before returning; nothing
unpicklable is held between records. Every failure raises `BadVideo` with the path and a reason, which the loader
turns into a skipped-and-counted record instead of a crash.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import threading
from typing import Callable, TypeVar

import av
import numpy as np

T = TypeVar("T")

# Start positions further than this many frames into the file are reached by seeking to the previous keyframe
# instead of decoding from the beginning.
_SEEK_MIN_FRAMES = 32


class BadVideo(Exception):
    """A record that cannot give a clip (unreadable, truncated, too short, missing file or caption, timeout)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """How to cut a clip. Exactly one of `stride` / `target_fps` is used (`target_fps` wins when set)."""

    num_frames: int
    resolution: int  # square crop size in pixels
    stride: int = 1
    target_fps: float | None = None
    short_side: int | None = None  # resize the short side to this before cropping; default: resolution
    random_start: bool = True
    random_crop: bool = True
    decode_threads: int = 1  # codec threads per decode; parallelism normally comes from grain workers

    def __post_init__(self):
        if self.num_frames < 1 or self.resolution < 1 or self.stride < 1:
            raise ValueError(f"ClipSpec: num_frames, resolution and stride must be >= 1, got {self}")
        if self.target_fps is not None and self.target_fps <= 0:
            raise ValueError(f"ClipSpec: target_fps must be > 0, got {self.target_fps}")
        if self.short_side is not None and self.short_side < self.resolution:
            raise ValueError(f"ClipSpec: short_side={self.short_side} is smaller than resolution={self.resolution}")


def sample_indices(
    total_frames: int, source_fps: float, spec: ClipSpec, rng: np.random.Generator, path: str = "<video>"
) -> np.ndarray:
    """Source frame indices (num_frames,) for one clip; raises BadVideo when the video is too short."""
    if spec.target_fps is not None:
        if not source_fps or source_fps <= 0:
            raise BadVideo(path, "unknown frame rate, cannot sample at target_fps")
        step = source_fps / spec.target_fps
    else:
        step = float(spec.stride)
    offsets = np.floor(np.arange(spec.num_frames) * step + 1e-6).astype(np.int64)
    span = int(offsets[-1]) + 1
    if total_frames < span:
        raise BadVideo(path, f"too short: {total_frames} frames, need {span} for {spec.num_frames} frames at step {step:g}")
    start = int(rng.integers(0, total_frames - span + 1)) if spec.random_start else 0
    return start + offsets


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side equal to `short_side`, aspect ratio kept (rounded)."""
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def crop_offsets(height: int, width: int, size: int, rng: np.random.Generator, random_crop: bool) -> tuple[int, int]:
    """Top-left corner of a size x size crop: uniform at random for training, centred for eval."""
    if random_crop:
        return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    return (height - size) // 2, (width - size) // 2


def _frame_count(stream: av.video.stream.VideoStream, container: av.container.InputContainer, fps: float) -> int:
    if stream.frames:
        return int(stream.frames)
    if stream.duration is not None and stream.time_base is not None and fps:
        return int(math.floor(float(stream.duration * stream.time_base) * fps + 1e-3))
    if container.duration is not None and fps:
        return int(math.floor(container.duration / av.time_base * fps + 1e-3))
    return 0


def _is_empty_file(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:  # missing files are reported by av.open below
        return False


def decode_clip(source: str | bytes, spec: ClipSpec, rng: np.random.Generator, path: str | None = None) -> np.ndarray:
    """Decodes one clip to uint8 (num_frames, resolution, resolution, 3).

    `source` is a file path or the encoded file's bytes (TFDS records); `path` names it in errors.
    """
    path = path or (source if isinstance(source, str) else "<bytes>")
    if (isinstance(source, bytes) and not source) or (isinstance(source, str) and _is_empty_file(source)):
        raise BadVideo(path, "zero-length file")
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r")
    except FileNotFoundError:
        raise BadVideo(path, "missing file") from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadVideo(path, f"unreadable: {type(e).__name__}: {e}") from None
    try:
        return _decode_open(container, spec, rng, path)
    except BadVideo:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, IndexError) as e:
        raise BadVideo(path, f"decode error: {type(e).__name__}: {e}") from None
    finally:
        container.close()


def _decode_open(container: av.container.InputContainer, spec: ClipSpec, rng: np.random.Generator, path: str):
    if not container.streams.video:
        raise BadVideo(path, "no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = spec.decode_threads
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    total = _frame_count(stream, container, fps)
    if total <= 0:
        raise BadVideo(path, "no frames (zero-length or unknown duration)")
    height, width = stream.codec_context.height, stream.codec_context.width
    if not height or not width:
        raise BadVideo(path, "unknown frame size")
    indices = sample_indices(total, fps, spec, rng, path)
    rh, rw = resized_size(height, width, spec.short_side or spec.resolution)
    top, left = crop_offsets(rh, rw, spec.resolution, rng, spec.random_crop)

    time_base = float(stream.time_base) if stream.time_base else 0.0
    start_pts = stream.start_time or 0
    use_pts = bool(fps and time_base)
    if use_pts and indices[0] >= _SEEK_MIN_FRAMES:
        container.seek(start_pts + int(indices[0] / fps / time_base), stream=stream, backward=True, any_frame=False)

    out = np.empty((spec.num_frames, spec.resolution, spec.resolution, 3), np.uint8)
    filled, counter = 0, -1
    for frame in container.decode(stream):
        counter += 1
        index = round((frame.pts - start_pts) * time_base * fps) if use_pts and frame.pts is not None else counter
        if index < indices[filled]:
            continue
        rgb = frame.reformat(width=rw, height=rh, format="rgb24", interpolation="BILINEAR").to_ndarray()
        # A frame fills every wanted index it reaches (duplicates when target_fps > source fps).
        while filled < spec.num_frames and indices[filled] <= index:
            out[filled] = rgb[top : top + spec.resolution, left : left + spec.resolution]
            filled += 1
        if filled == spec.num_frames:
            return out
    raise BadVideo(path, f"truncated: decoded {filled} of {spec.num_frames} wanted frames (header says {total})")


def call_with_timeout(fn: Callable[[], T], timeout_s: float | None, path: str) -> T:
    """Runs fn() in a daemon thread and gives up after timeout_s (the stuck thread is abandoned, not joined)."""
    if not timeout_s:
        return fn()
    result: list = []
    error: list = []

    def target():
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    thread = threading.Thread(target=target, daemon=True, name=f"decode:{path}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise BadVideo(path, f"decode timed out after {timeout_s:g} s")
    if error:
        raise error[0]
    return result[0]
