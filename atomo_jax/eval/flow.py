"""Dense optical flow without dependencies: coarse-to-fine iterative Lucas-Kanade in JAX, and the motion score.

Method (per adjacent frame pair, grey levels in [0, 1]): an image pyramid (halving until the short side would drop
below `MIN_PYRAMID_SIDE` pixels, at most `max_levels` levels); on each level, starting from the upsampled coarser
flow, `iterations` times: warp the second frame back by the current flow (bilinear), and solve, at every pixel, the
Lucas-Kanade normal equations over a Gaussian window (sigma `window_sigma`) for the flow increment, with a small
Tikhonov term `damping` so that textureless pixels get a zero increment instead of a division by ~0. Gradients are
those of the mean of the first and the warped second frame (symmetric, converges in fewer iterations).

After the finest level, a still test zeroes the flow of every pixel where the frames give no evidence of motion
(see `_keep_moving`): the coarse levels spread a moving object's flow into the background around it, and the fine
levels, which see no gradient in a flat background, cannot take it back.

The motion score is the mean flow magnitude over all pixels and frame pairs, as RAFT-based scores are. Measured
(tests/test_eval.py): smooth textured translations within 1%; a flat disc moving 2 px/frame on black scores 1.24x
its true pixel mean (15x without the still test: its edges and a wide band of background scored the disc's
motion); a textured 16x16 patch on a still textured background 1.01x (1.83x without). Like any local method it
measures only motion it can see: inside textureless regions and along straight edges (the aperture problem) it
under-estimates, where RAFT (AIGCBench's flow network) fills motion in from context. Motion scores from this module
are therefore *not* directly comparable to RAFT-based numbers (e.g. AtomoVideo's 3.124); compare models with the
same method.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

MIN_PYRAMID_SIDE = 8
STILL_FLOOR = 1e-6  # squared grey change (0..1 scale) below a quarter of a uint8 level: no evidence
MAJORITY_SIGMA = 1.5  # neighbourhood of the still test's vote: fills ties a few px apart, keeps 2-px edges
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma
_DERIVATIVE = np.array([1.0, -8.0, 0.0, 8.0, -1.0]) / 12.0  # 5-point central difference


def _gaussian(sigma: float) -> np.ndarray:
    radius = max(1, int(3 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def _conv(x: jax.Array, kernel: np.ndarray, axis: int) -> jax.Array:
    """1-D correlation of every channel of an (H, W, C) stack along `axis` (0 or 1), edge-replicated borders."""
    r = len(kernel) // 2
    pad = [(0, 0)] * 3
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad, mode="edge")
    c = x.shape[-1]
    shape = (len(kernel), 1) if axis == 0 else (1, len(kernel))
    k = jnp.broadcast_to(jnp.asarray(kernel, jnp.float32).reshape(shape + (1, 1)), shape + (1, c))
    return jax.lax.conv_general_dilated(xp[None], k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c, precision=jax.lax.Precision.HIGHEST)[0]


def _blur(x: jax.Array, kernel: np.ndarray) -> jax.Array:
    return _conv(_conv(x, kernel, 0), kernel, 1)


def _warp(image: jax.Array, flow: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(image(x + flow(x)) bilinear with clamped coordinates, 1.0 where x + flow(x) lies inside the image)."""
    h, w = image.shape
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    y, x = yy + flow[..., 1], xx + flow[..., 0]
    inside = (y >= 0) & (y <= h - 1) & (x >= 0) & (x <= w - 1)
    return jax.scipy.ndimage.map_coordinates(image, [y, x], order=1, mode="nearest"), inside.astype(jnp.float32)


def _refine(i0: jax.Array, i1: jax.Array, flow: jax.Array, iterations: int, window: np.ndarray,
            damping: float) -> jax.Array:
    """Iterative Lucas-Kanade on one pyramid level: `iterations` warp + solve steps. Pixels whose match falls
    outside the second frame (content entering or leaving) carry no weight in the window sums."""

    def step(_, flow):
        warped, inside = _warp(i1, flow)
        mean = 0.5 * (i0 + warped)[..., None]
        gx, gy = _conv(mean, _DERIVATIVE, 1)[..., 0], _conv(mean, _DERIVATIVE, 0)[..., 0]
        gt = warped - i0
        products = jnp.stack([gx * gx, gx * gy, gy * gy, gx * gt, gy * gt], axis=-1) * inside[..., None]
        sxx, sxy, syy, sxt, syt = jnp.moveaxis(_blur(products, window), -1, 0)
        sxx, syy = sxx + damping, syy + damping
        det = sxx * syy - sxy * sxy
        du = -(syy * sxt - sxy * syt) / det
        dv = -(sxx * syt - sxy * sxt) / det
        return flow + jnp.stack([du, dv], axis=-1)

    return jax.lax.fori_loop(0, iterations, step, flow)


def _evidence(i0: jax.Array, i1: jax.Array, flow: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(moving, still) masks: the flow explains the change from i0 to i1 better than no motion does, by more than
    STILL_FLOOR, or no motion explains it better (only where the flow's match lies inside the frame: a match
    outside it is no evidence). Where neither holds (no texture, or a texture extremum), the frames cannot tell."""
    warped, inside = _warp(i1, flow)
    unmoved, moved = (i1 - i0) ** 2, (warped - i0) ** 2
    return unmoved > moved + STILL_FLOOR, (moved > unmoved + STILL_FLOOR) & (inside > 0)


def _keep_moving(raw: tuple[jax.Array, jax.Array], smooth: tuple[jax.Array, jax.Array],
                 flow: jax.Array) -> jax.Array:
    """Zero the flow where the frames give no evidence of motion. The raw frames decide wherever they can: a pixel
    is moving where the flow explains its change better than no motion, still where no motion explains it better
    (a textured still background beside a moving object). Where they cannot (flat regions, texture extrema), the
    presmoothed frames vote: a pixel is moving when the flow explains their change better over most of a Gaussian
    neighbourhood (sigma MAJORITY_SIGMA); presmoothing carries a flat object's edges a pixel or two inwards, and
    the vote fills the rest of a small flat object's interior. A textureless still background keeps no flow,
    although the coarse levels spread an object's motion into it."""
    moving, still = _evidence(*raw, flow)
    votes = _evidence(*smooth, flow)[0].astype(jnp.float32)
    majority = _blur(votes[..., None], _gaussian(MAJORITY_SIGMA))[..., 0] > 0.5
    return flow * (moving | (majority & ~still))[..., None]


def num_levels(height: int, width: int, max_levels: int) -> int:
    levels = 1
    while levels < max_levels and min(height, width) // 2 ** levels >= MIN_PYRAMID_SIDE:
        levels += 1
    return levels


def _downsample(x: jax.Array) -> jax.Array:
    h, w = x.shape
    return jax.image.resize(x, ((h + 1) // 2, (w + 1) // 2), method="linear", antialias=True)


@functools.partial(jax.jit, static_argnames=("max_levels", "iterations", "window_sigma", "damping", "still_test"))
def dense_flow(frame0: jax.Array, frame1: jax.Array, *, max_levels: int = 5, iterations: int = 6,
               window_sigma: float = 2.0, damping: float = 1e-4, still_test: bool = True) -> jax.Array:
    """Flow (H, W, 2) = (dx, dy) in pixels such that frame1(x + flow(x)) ~= frame0(x).

    Frames are (H, W, 3) in 0..255 (uint8 or float) or (H, W) grey levels in 0..255.
    """
    def grey(f):
        f = jnp.asarray(f, jnp.float32) / 255.0
        return f @ jnp.asarray(_GREY, jnp.float32) if f.ndim == 3 else f

    presmooth = _gaussian(1.0)
    raw = (grey(frame0), grey(frame1))
    pyramid = [tuple(_blur(x[..., None], presmooth)[..., 0] for x in raw)]
    for _ in range(num_levels(*pyramid[0][0].shape, max_levels) - 1):
        pyramid.append(tuple(_downsample(x) for x in pyramid[-1]))

    window = _gaussian(window_sigma)
    flow = jnp.zeros(pyramid[-1][0].shape + (2,), jnp.float32)
    for level, (i0, i1) in enumerate(reversed(pyramid)):
        if level:
            h, w = i0.shape
            scale = jnp.asarray([w / flow.shape[1], h / flow.shape[0]], jnp.float32)
            flow = jax.image.resize(flow, (h, w, 2), method="linear") * scale
        flow = _refine(i0, i1, flow, iterations, window, damping)
    if still_test:
        flow = _keep_moving(raw, pyramid[0], flow)
    return flow


@jax.jit
def _pair_magnitudes(video: jax.Array) -> jax.Array:
    flows = jax.lax.map(lambda pair: dense_flow(pair[0], pair[1]), (video[:-1], video[1:]))
    return jnp.mean(jnp.linalg.norm(flows, axis=-1), axis=(1, 2))


class LucasKanade:
    """The default motion backend: per-pair mean magnitudes of `dense_flow`, for frames on the 0..255 scale."""

    name = "lk"
    description = "pyramidal iterative Lucas-Kanade (atomo_jax.eval.flow), not RAFT"

    def __call__(self, video: np.ndarray) -> np.ndarray:
        return np.asarray(_pair_magnitudes(jnp.asarray(video)))


def motion_score(video: np.ndarray, backend: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """Mean optical-flow magnitude in pixels between adjacent frames of a (F, H, W, 3) video, uint8 (0..255) or
    float in [0, 1] (the same score for the same frames); 0.0 for a single frame. `backend` maps frames on the
    0..255 scale to (F - 1,) per-pair mean magnitudes: `LucasKanade()` (the default) or an
    `atomo_jax.eval.raft.RaftFlow`."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a (F, H, W, 3) video, got shape {video.shape}")
    if np.issubdtype(video.dtype, np.floating):
        # A float video on the 0..255 scale, or one in [-1, 1], read as [0, 1] would score wrong, silently.
        lo, hi = float(video.min()), float(video.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"a float video must hold values in [0, 1], got {lo:.4g}..{hi:.4g} (pass uint8 frames "
                             "for the 0..255 scale)")
        video = video.astype(np.float32) * 255.0
    elif video.dtype != np.uint8:
        raise ValueError(f"expected uint8 or float frames, got dtype {video.dtype}")
    if video.shape[0] < 2:
        return 0.0
    return float(np.mean((backend or LucasKanade())(video)))
