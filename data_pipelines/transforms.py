"""Pure numpy transforms from decoded uint8 clips to training examples.

Every function takes and returns numpy arrays; randomness comes in as an explicit `np.random.Generator` so grain's
per-record RNG makes the whole pipeline deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_unit_range(video: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return video.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def frame_mask(
    num_frames: int, rng: np.random.Generator, *, frame_prediction_prob: float = 0.0, num_given_frames: int = 1
) -> np.ndarray:
    """Float32 (F,) mask of frames whose latents are given to the model.

    I2V (default): only frame 0. With probability `frame_prediction_prob` the first `num_given_frames` frames are
    given instead (frame prediction for long-video extension, paper: L=8 of T=24).
    """
    if not 1 <= num_given_frames <= num_frames:
        raise ValueError(f"frame_mask: num_given_frames={num_given_frames} must be in [1, num_frames={num_frames}]")
    given = num_given_frames if (frame_prediction_prob > 0 and rng.random() < frame_prediction_prob) else 1
    mask = np.zeros((num_frames,), np.float32)
    mask[:given] = 1.0
    return mask


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 (..., H, W, 3) -> short side `short_side`, aspect kept; bilinear (PIL), per frame."""

    h, w = frames.shape[-3:-1]
    if min(h, w) == short_side:
        return frames
    scale = short_side / min(h, w)
    nh, nw = max(short_side, round(h * scale)), max(short_side, round(w * scale))
    flat = frames.reshape(-1, h, w, 3)
    out = np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.BILINEAR)) for f in flat])
    return out.reshape(*frames.shape[:-3], nh, nw, 3)


def crop(frames: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """size x size crop of (..., H, W, C): uniform random position given an rng, centred without one."""
    h, w = frames.shape[-3:-1]
    if h < size or w < size:
        raise ValueError(f"crop: frames of {h}x{w} are smaller than the crop size {size}")
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return frames[..., top : top + size, left : left + size, :]
