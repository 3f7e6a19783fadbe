"""Pixel metrics of AIGCBench's "control-video alignment": SSIM and MSE (and PSNR, from the MSE) of a video's first
frame to the input image.

Both work on uint8-range values (0..255), as AIGCBench (skimage on uint8 arrays), in float64 numpy: SSIM subtracts
products of local means, which loses digits in float32 at this scale.

SSIM windows:
- "gaussian" (default): Wang et al. 2004 / `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`: 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma), population covariances.
- "uniform": skimage's defaults with `win_size=7`, i.e. exactly what AIGCBench's eval.py calls: a 7x7 box window and
  sample covariances (N / (N - 1)). Use this one to compare with numbers published in the AIGCBench setting.
Both: K1=0.01, K2=0.03, data range 255, SSIM map averaged over the pixels whose window lies inside the image (skimage
crops the filtered borders the same way) and over the colour channels.
"""

from __future__ import annotations

import numpy as np

SSIM_WINDOWS = ("gaussian", "uniform")
DATA_RANGE = 255.0
_K1, _K2 = 0.01, 0.03


def _as_image(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) image, got shape {x.shape}")
    return x.astype(np.float64)


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_image(a, "first image"), _as_image(b, "second image")
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}; resize one to the other first")
    return a, b


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of two (H, W, 3) images on the 0..255 scale (skimage's `mean_squared_error` on uint8)."""
    a, b = _check_pair(a, b)
    return float(np.mean((a - b) ** 2))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two (H, W, 3) images on the 0..255 scale, capped at 100 (identical images
    stay finite, so means over images stay numbers)."""
    return min(100.0, float(10 * np.log10(DATA_RANGE ** 2 / max(mse(a, b), 1e-30))))


def ssim_window(kind: str) -> np.ndarray:
    """The 1-D separable SSIM window (weights summing to 1)."""
    if kind == "gaussian":
        sigma, truncate = 1.5, 3.5
        radius = int(truncate * sigma + 0.5)  # scipy.ndimage.gaussian_filter's radius: 5 -> 11 taps
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        w = np.exp(-0.5 * (x / sigma) ** 2)
        return w / w.sum()
    if kind == "uniform":
        return np.full(7, 1.0 / 7.0)
    raise ValueError(f"unknown SSIM window {kind!r}; expected one of {SSIM_WINDOWS}")


def _valid_filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (H, W, C) over H and W: only windows fully inside the image."""
    k = len(w)
    h, wd = x.shape[0] - k + 1, x.shape[1] - k + 1
    rows = sum(w[i] * x[i:i + h] for i in range(k))
    return sum(w[j] * rows[:, j:j + wd] for j in range(k))


def ssim(a: np.ndarray, b: np.ndarray, *, window: str = "gaussian") -> float:
    """Mean structural similarity of two (H, W, 3) images on the 0..255 scale (see the module docstring)."""
    a, b = _check_pair(a, b)
    w = ssim_window(window)
    if min(a.shape[:2]) < len(w):
        raise ValueError(f"SSIM with the {window} window needs images of at least {len(w)}x{len(w)} pixels, "
                         f"got {a.shape[0]}x{a.shape[1]}")
    n = len(w) ** 2
    cov_norm = n / (n - 1.0) if window == "uniform" else 1.0
    mu_a, mu_b = _valid_filter(a, w), _valid_filter(b, w)
    var_a = cov_norm * (_valid_filter(a * a, w) - mu_a * mu_a)
    var_b = cov_norm * (_valid_filter(b * b, w) - mu_b * mu_b)
    cov = cov_norm * (_valid_filter(a * b, w) - mu_a * mu_b)
    c1, c2 = (_K1 * DATA_RANGE) ** 2, (_K2 * DATA_RANGE) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) embeddings (broadcasting (1, D) against (N, D))."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)
