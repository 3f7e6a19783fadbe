"""Pure numpy transforms from decoded uint8 clips to training examples.

Every function takes and returns numpy arrays; randomness comes in as an explicit `np.random.Generator` so grain's
per-record RNG makes the whole pipeline deterministic for a seed.
"""

from __future__ import annotations

import numpy as np

# OpenAI CLIP image normalisation (transformers CLIPImageProcessor defaults).
CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)


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
