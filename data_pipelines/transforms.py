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


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (..., H, W, 3) -> (..., height, width, 3); bilinear (PIL), per frame."""
    h, w = frames.shape[-3:-1]
    if (h, w) == (height, width):
        return frames
    flat = frames.reshape(-1, h, w, 3)
    out = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in flat])
    return out.reshape(*frames.shape[:-3], height, width, 3)


def crop(frames: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """The height x width window of (..., H, W, C) at (top, left)."""
    h, w = frames.shape[-3:-1]
    if top < 0 or left < 0 or top + height > h or left + width > w:
        raise ValueError(f"crop: a {height}x{width} window at ({top}, {left}) does not fit frames of {h}x{w}")
    return frames[..., top : top + height, left : left + width, :]
