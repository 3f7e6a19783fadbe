"""Held-out scoring of image-to-video on moving-shapes clips: did the model animate the image the way the data moves?

Each held-out clip is one shape of one colour moving over a plain background, so the object can be found in any
frame by colour, generated or true, and compared with the true clip frame by frame:

- `first_frame_psnr`: generated frame 0 vs the conditioning image (the true frame 0), in dB over uint8 pixels
  (capped at 100: identical frames).
- `trajectory_error_px`: the mean distance (pixels) between the generated and the true object centroid over frames
  1..F-1. Two baselines are scored the same way: `frozen_baseline_px`, the first frame repeated (no motion), and
  `wrong_direction_baseline_px`, the true trajectory reflected through the first position (the true shape moving
  the opposite way at the true speed). A model that learned the motion scores well under both.
- `direction_accuracy`: the fraction of clips whose mean generated displacement points within 45 degrees of the true
  one (clips whose generated object does not move are wrong).
- `colour_error`: the mean RGB distance (0..255 units) between the generated object's mean colour and the true
  colour, over the frames. `COLOUR_THRESHOLD` is half the smallest distance between two palette colours: below it,
  the object is still nearer its own colour than any other the data uses.

An object pixel is one clearly nearer the object colour than the background: farther from the background colour (the
true first frame's border median) than `OBJECT_CUT` (0.55) of their distance. Not 0.5: a pixel of a block the shape
covers exactly half (8 of a 4x4 block's 16 pixels, 2 of a 2x2 block's 4) sits on that cut, so whether it counted
depended on the last bit of the decoder's arithmetic (the autoencoder-alone colour score of the demo's held-out clips
read 30.3 or 36.0 under sub-unit noise); 0.55 lies between the blends such blocks produce (1/2 and 9/16, 3/4). A
frame with no object pixel has its centroid at the frame centre and is counted in `empty_frames`.
"""

from __future__ import annotations

import itertools
from typing import Any

import ml_collections
import numpy as np

from atomo_jax.eval import metrics
from data_pipelines.loader import synthetic_source
from data_pipelines.synthetic import COLOURS

COLOUR_THRESHOLD = 0.5 * min(float(np.linalg.norm(np.subtract(a, b)))
                             for a, b in itertools.combinations(COLOURS.values(), 2))
# The scores metrics.json also gives for the true clips through the autoencoder alone (encode, decode): what a perfect
# model would score, since every generated frame passes through the decoder (4x4-pixel blocks cost colour at edges).
FLOOR_KEYS = ("trajectory_error_px", "direction_accuracy", "colour_error", "first_frame_psnr")
OBJECT_CUT = 0.55  # object pixels: farther from the background than this fraction of the object's distance
# Held-out clips are drawn with data.source_seed + this: never a training clip, and the same clips for every
# training seed (config.seed shuffles and initialises; it must not change what a run is scored on).
HELDOUT_SEED_OFFSET = 10_000


def heldout_videos(data_config: ml_collections.ConfigDict, count: int) -> np.ndarray:
    """The first `count` held-out clips of `data_config`'s synthetic dataset, uint8 (N, F, H, W, 3).
    training.setup.validate checks beforehand that the data is synthetic and drawn at the model's resolution. With
    buckets, all are drawn at the first bucket's shape (one sampling batch holds one shape)."""
    if data_config.buckets:
        data_config = data_config.copy_and_resolve_references()
        with data_config.unlocked():
            data_config.buckets = (tuple(data_config.buckets[0]),)
    src = synthetic_source(data_config, num_videos=count, seed=int(data_config.source_seed) + HELDOUT_SEED_OFFSET)
    return np.stack([src[i]["video"] for i in range(count)])


def _background(frame: np.ndarray) -> np.ndarray:
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).astype(np.float64)
    return np.median(border, axis=0)


def _masks(video: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    dist = np.linalg.norm(video.astype(np.float64) - background, axis=-1)
    return dist > OBJECT_CUT * np.linalg.norm(colour - background)


def _centroids(masks: np.ndarray) -> np.ndarray:
    frames, height, width = masks.shape
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    out = np.tile([width / 2, height / 2], (frames, 1)).astype(np.float64)
    for f, m in enumerate(masks):
        if m.any():
            out[f] = xs[m].mean(), ys[m].mean()
    return out


def _direction_ok(generated: np.ndarray, true: np.ndarray) -> bool:
    g, t = (generated[1:] - generated[0]).mean(0), (true[1:] - true[0]).mean(0)
    ng, nt = np.linalg.norm(g), np.linalg.norm(t)
    return bool(ng > 0.5 and nt > 0 and np.dot(g, t) / (ng * nt) >= np.cos(np.pi / 4))  # 0.5 px: it moved


def score_clip(generated: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """One clip's row: generated and true uint8 (F, H, W, 3) of the same shape, frame 0 the conditioning image."""
    if generated.shape != true.shape or generated.ndim != 4 or generated.shape[-1] != 3:
        raise ValueError(f"score_clip: generated {generated.shape} and true {true.shape} must both be (F, H, W, 3)")
    if generated.dtype != np.uint8 or true.dtype != np.uint8:
        raise ValueError(f"score_clip: expected uint8 frames, got {generated.dtype} and {true.dtype}")
    background = _background(true[0])
    first_mask = np.linalg.norm(true[0].astype(np.float64) - background, axis=-1) > 30
    colour = true[0][first_mask].astype(np.float64).mean(0)
    true_c = _centroids(_masks(true, background, colour))
    gen_masks = _masks(generated, background, colour)
    gen_c = _centroids(gen_masks)
    wrong = 2 * true_c[0] - true_c
    frozen = np.repeat(true_c[:1], len(true_c), axis=0)
    err = lambda c: float(np.linalg.norm(c[1:] - true_c[1:], axis=-1).mean())
    colours = [np.linalg.norm(generated[f][m].astype(np.float64).mean(0) - colour) if m.any() else np.nan
               for f, m in enumerate(gen_masks)]
    return {"trajectory_error_px": err(gen_c), "frozen_baseline_px": err(frozen),
            "wrong_direction_baseline_px": err(wrong), "direction_ok": _direction_ok(gen_c, true_c),
            "colour_error": float(np.nanmean(colours)) if not np.all(np.isnan(colours)) else float("nan"),
            "first_frame_psnr": metrics.psnr(generated[0], true[0]), "empty_frames": int((~gen_masks.any((1, 2))).sum()),
            "true_displacement_px": [round(float(v), 2) for v in true_c[-1] - true_c[0]],
            "generated_displacement_px": [round(float(v), 2) for v in gen_c[-1] - gen_c[0]]}


def score(generated: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """Means over clips (N, F, H, W, 3) and the per-clip rows."""
    rows = [score_clip(g, t) for g, t in zip(generated, true)]
    mean = lambda k: float(np.nanmean([r[k] for r in rows]))
    return {"clips": len(rows), "trajectory_error_px": mean("trajectory_error_px"),
            "frozen_baseline_px": mean("frozen_baseline_px"),
            "wrong_direction_baseline_px": mean("wrong_direction_baseline_px"),
            "direction_accuracy": float(np.mean([r["direction_ok"] for r in rows])),
            "colour_error": mean("colour_error"), "colour_threshold": COLOUR_THRESHOLD,
            "first_frame_psnr": mean("first_frame_psnr"), "rows": rows}
