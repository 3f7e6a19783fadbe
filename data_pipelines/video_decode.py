"""PyAV clip decoding: frame sampling by stride or target fps, random start, aspect-kept resize, crop; header probes.

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
    height: int  # crop height in pixels
    width: int = 0  # crop width in pixels; 0: height (square)
    stride: int = 1
    target_fps: float | None = None
    short_side: int | None = None  # resize the short side to at least this before cropping
    random_start: bool = True
    random_crop: bool = True
    decode_threads: int = 1  # codec threads per decode; parallelism normally comes from grain workers

    def __post_init__(self):
        if not self.width:
            object.__setattr__(self, "width", self.height)
        if self.num_frames < 1 or self.height < 1 or self.width < 1 or self.stride < 1:
            raise ValueError(f"ClipSpec: num_frames, height, width and stride must be >= 1, got {self}")
        if self.target_fps is not None and self.target_fps <= 0:
            raise ValueError(f"ClipSpec: target_fps must be > 0, got {self.target_fps}")
        if self.short_side is not None and self.short_side < min(self.height, self.width):
            raise ValueError(f"ClipSpec: short_side={self.short_side} is smaller than the crop "
                             f"{self.height}x{self.width}")

    def frames_needed(self, source_fps: float) -> int:
        """Source frames a clip spans: num_frames at the stride, or at target_fps from `source_fps` (0 when the
        rate is unknown and target_fps is set: no clip can be cut)."""
        if self.target_fps is not None:
            if not source_fps or source_fps <= 0:
                return 0
            step = source_fps / self.target_fps
        else:
            step = float(self.stride)
        return int(math.floor((self.num_frames - 1) * step + 1e-6)) + 1


def sample_indices(
    total_frames: int, source_fps: float, spec: ClipSpec, rng: np.random.Generator, path: str = "<video>"
) -> np.ndarray:
    """Source frame indices (num_frames,) for one clip; raises BadVideo when the video is too short."""
    span = spec.frames_needed(source_fps)
    if not span:
        raise BadVideo(path, "unknown frame rate, cannot sample at target_fps")
    step = source_fps / spec.target_fps if spec.target_fps is not None else float(spec.stride)
    offsets = np.floor(np.arange(spec.num_frames) * step + 1e-6).astype(np.int64)
    if total_frames < span:
        raise BadVideo(path, f"too short: {total_frames} frames, need {span} for {spec.num_frames} frames at step {step:g}")
    start = int(rng.integers(0, total_frames - span + 1)) if spec.random_start else 0
    return start + offsets


def resized_size(height: int, width: int, spec: ClipSpec) -> tuple[int, int]:
    """(h, w) of a frame resized, aspect ratio kept, to the smallest size that covers the crop (and has a short side
    of at least `spec.short_side`); rounded, never below the crop."""
    scale = max(spec.height / height, spec.width / width, (spec.short_side or 0) / min(height, width))
    return max(spec.height, round(height * scale)), max(spec.width, round(width * scale))


def crop_offsets(height: int, width: int, spec: ClipSpec, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of the spec's crop in a height x width frame: uniform at random for training, centred for
    eval."""
    if spec.random_crop:
        return int(rng.integers(0, height - spec.height + 1)), int(rng.integers(0, width - spec.width + 1))
    return (height - spec.height) // 2, (width - spec.width) // 2


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


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a container's header says of its first video stream."""

    width: int
    height: int
    frames: int
    fps: float  # 0.0 when unknown


def _open(source: str | bytes, path: str) -> av.container.InputContainer:
    if (isinstance(source, bytes) and not source) or (isinstance(source, str) and _is_empty_file(source)):
        raise BadVideo(path, "zero-length file")
    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r")
    except FileNotFoundError:
        raise BadVideo(path, "missing file") from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadVideo(path, f"unreadable: {type(e).__name__}: {e}") from None


def _header(container: av.container.InputContainer, path: str) -> tuple[av.video.stream.VideoStream, VideoInfo]:
    if not container.streams.video:
        raise BadVideo(path, "no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    total = _frame_count(stream, container, fps)
    if total <= 0:
        raise BadVideo(path, "no frames (zero-length or unknown duration)")
    height, width = stream.codec_context.height, stream.codec_context.width
    if not height or not width:
        raise BadVideo(path, "unknown frame size")
    return stream, VideoInfo(int(width), int(height), total, fps)


def probe(source: str | bytes, path: str | None = None) -> VideoInfo:
    """Frame size, frame count and rate from the container header (no frame is decoded); raises BadVideo."""
    path = path or (source if isinstance(source, str) else "<bytes>")
    container = _open(source, path)
    try:
        return _header(container, path)[1]
    except BadVideo:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise BadVideo(path, f"unreadable header: {type(e).__name__}: {e}") from None
    finally:
        container.close()


def decode_clip(source: str | bytes, spec: ClipSpec, rng: np.random.Generator, path: str | None = None) -> np.ndarray:
    """Decodes one clip to uint8 (num_frames, height, width, 3).

    `source` is a file path or the encoded file's bytes (TFDS records); `path` names it in errors.
    """
    path = path or (source if isinstance(source, str) else "<bytes>")
    container = _open(source, path)
    try:
        return _decode_open(container, spec, rng, path)
    except BadVideo:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, IndexError) as e:
        raise BadVideo(path, f"decode error: {type(e).__name__}: {e}") from None
    finally:
        container.close()


def _decode_open(container: av.container.InputContainer, spec: ClipSpec, rng: np.random.Generator, path: str):
    stream, info = _header(container, path)
    stream.codec_context.thread_count = spec.decode_threads
    fps, total = info.fps, info.frames
    indices = sample_indices(total, fps, spec, rng, path)
    rh, rw = resized_size(info.height, info.width, spec)
    top, left = crop_offsets(rh, rw, spec, rng)

    time_base = float(stream.time_base) if stream.time_base else 0.0
    start_pts = stream.start_time or 0
    use_pts = bool(fps and time_base)
    if use_pts and indices[0] >= _SEEK_MIN_FRAMES:
        container.seek(start_pts + int(indices[0] / fps / time_base), stream=stream, backward=True, any_frame=False)

    out = np.empty((spec.num_frames, spec.height, spec.width, 3), np.uint8)
    filled, counter = 0, -1
    for frame in container.decode(stream):
        counter += 1
        index = round((frame.pts - start_pts) * time_base * fps) if use_pts and frame.pts is not None else counter
        if index < indices[filled]:
            continue
        rgb = frame.reformat(width=rw, height=rh, format="rgb24", interpolation="BILINEAR").to_ndarray()
        # A frame fills every wanted index it reaches (duplicates when target_fps > source fps).
        while filled < spec.num_frames and indices[filled] <= index:
            out[filled] = rgb[top : top + spec.height, left : left + spec.width]
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
