"""Synthetic moving-shapes videos: a deterministic, download-free data source for demos and tests.

Each video shows one coloured shape (circle, square or triangle) moving at constant velocity and bouncing off the
frame edges, over a plain or gradient background. With `motion="by_shape"` each kind of shape starts in its own fixed
direction (DIRECTIONS), so one frame determines the whole clip: a tiny model learns that in minutes, while random
directions leave the future ambiguous and take far longer to learn. Everything is drawn from
`np.random.default_rng((seed, index))`, so `source[i]` is the same video in every process, worker and run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import grain.python as grain

from data_pipelines.video_decode import VideoInfo

SHAPES = ("circle", "square", "triangle")
# Initial direction per shape for motion="by_shape", in radians (image y grows downwards): right, down, up-left.
DIRECTIONS = {"circle": 0.0, "square": 0.5 * np.pi, "triangle": 1.25 * np.pi}
# Initial direction per colour for motion="by_colour": seven colours 2*pi/7 apart. Colour is in every pixel of the
# shape (and of a 4x-pooled latent), so it is a cue a tiny model reads sooner than the outline.
COLOUR_DIRECTIONS = {name: 2 * np.pi * i / 7 for i, name in
                     enumerate(("red", "green", "blue", "yellow", "purple", "orange", "white"))}
MOTIONS = ("random", "by_shape", "by_colour")
BACKGROUNDS = ("random", "black")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


def _direction_word(vx: float, vy: float) -> str:
    """Names the dominant direction of the initial velocity (image y grows downwards)."""
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _shape_mask(shape: str, cx: float, cy: float, r: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of a shape of half-size r centred at (cx, cy)."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    # Upward triangle: apex at (cx, cy - r), base at y = cy + r; half-width grows linearly with depth.
    depth = (ys - (cy - r)) / (2 * r)
    return (depth >= 0) & (depth <= 1) & (np.abs(xs - cx) <= depth * r)


class MovingShapesSource(grain.RandomAccessDataSource):
    """Random-access source of `{"video": uint8 (F, H, W, 3), "caption": str}` moving-shape clips."""

    def __init__(self, num_videos: int = 4096, num_frames: int = 8, resolution: int = 32, seed: int = 0, *,
                 radius: tuple[float, float] = (0.1, 0.22), speed: tuple[float, float] = (0.04, 0.12),
                 motion: str = "random", gradient_prob: float = 0.5, background: str = "random",
                 sizes: Sequence[tuple[int, int, int]] = ()):
        """`radius` (half-size) and `speed` (per frame) are ranges in fractions of the frame's short side. `sizes`:
        (frames, height, width) of clip i is sizes[i % len(sizes)] (clips of several shapes, for bucketed runs);
        empty: every clip is num_frames x resolution x resolution."""
        if num_videos <= 0 or num_frames <= 0 or resolution < 8:
            raise ValueError(
                f"MovingShapesSource: need num_videos > 0, num_frames > 0, resolution >= 8; got "
                f"num_videos={num_videos}, num_frames={num_frames}, resolution={resolution}"
            )
        for name, pair, top in (("radius", radius, 0.5), ("speed", speed, 1.0)):
            if len(pair) != 2:
                raise ValueError(f"MovingShapesSource: {name}={tuple(pair)} must be a (low, high) pair")
            lo, hi = pair
            if not 0 < lo <= hi < top:
                raise ValueError(f"MovingShapesSource: {name}={(lo, hi)} must satisfy 0 < low <= high < {top}")
        if motion not in MOTIONS:
            raise ValueError(f"MovingShapesSource: motion={motion!r}; expected one of {MOTIONS}")
        if background not in BACKGROUNDS:
            raise ValueError(f"MovingShapesSource: background={background!r}; expected one of {BACKGROUNDS}")
        if motion == "by_colour" and background != "black":  # only on black is the black shape never drawn
            raise ValueError("MovingShapesSource: motion='by_colour' needs background='black' (a black shape has "
                             f"no direction), got background={background!r}")
        if not 0.0 <= gradient_prob <= 1.0:
            raise ValueError(f"MovingShapesSource: gradient_prob={gradient_prob} must be in [0, 1]")
        self.num_videos = num_videos
        self.num_frames = num_frames
        self.resolution = resolution
        self.seed = seed
        self.radius = (float(radius[0]), float(radius[1]))
        self.speed = (float(speed[0]), float(speed[1]))
        self.motion = motion
        self.gradient_prob = float(gradient_prob)
        self.background = background
        self.sizes = tuple((int(f), int(h), int(w)) for f, h, w in sizes) or ((num_frames, resolution, resolution),)
        if any(min(size) < 1 or min(size[1:]) < 8 for size in self.sizes):
            raise ValueError(f"MovingShapesSource: sizes={self.sizes} need frames >= 1 and height, width >= 8")

    def __len__(self) -> int:
        return self.num_videos

    def __repr__(self) -> str:
        return (
            f"MovingShapesSource(num_videos={self.num_videos}, num_frames={self.num_frames}, "
            f"resolution={self.resolution}, seed={self.seed}, radius={self.radius}, speed={self.speed}, "
            f"motion={self.motion!r}, gradient_prob={self.gradient_prob}, background={self.background!r}, "
            f"sizes={self.sizes})"
        )

    def header(self, index: int) -> VideoInfo:
        """The clip's size and length without drawing it."""
        frames, height, width = self.sizes[int(index) % len(self.sizes)]
        return VideoInfo(width=width, height=height, frames=frames, fps=0.0)

    def _background(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        c0 = rng.integers(0, 256, size=3).astype(np.float32)
        if self.background == "black":
            return np.zeros((height, width, 3), np.float32)
        if rng.random() < 1.0 - self.gradient_prob:  # plain background
            return np.broadcast_to(c0, (height, width, 3)).copy()
        c1 = rng.integers(0, 256, size=3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ys, xs = ys / max(height - 1, 1), xs / max(width - 1, 1)
        t = (np.cos(angle) * xs + np.sin(angle) * ys)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return c0 + (c1 - c0) * t[..., None]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_videos:
            raise IndexError(f"MovingShapesSource: index {index} out of range [0, {self.num_videos})")
        rng = np.random.default_rng((self.seed, index))
        frames, height, width = self.sizes[index % len(self.sizes)]
        size = min(height, width)
        shape = SHAPES[rng.integers(len(SHAPES))]
        names = [n for n in COLOURS if not (self.background == "black" and n == "black")]  # never invisible
        colour_name = names[rng.integers(len(names))]
        colour = np.asarray(COLOURS[colour_name], np.float32)
        r = rng.uniform(*self.radius) * size
        cx, cy = rng.uniform(r, np.array([width - r, height - r]))
        speed = rng.uniform(*self.speed) * size
        angle = rng.uniform(0, 2 * np.pi)
        if self.motion == "by_shape":
            angle = DIRECTIONS[shape]
        elif self.motion == "by_colour":
            angle = COLOUR_DIRECTIONS[colour_name]
        vx, vy = speed * np.cos(angle), speed * np.sin(angle)
        article = "an" if colour_name[0] in "aeiou" else "a"
        caption = f"{article} {colour_name} {shape} moving {_direction_word(vx, vy)}"

        background = self._background(rng, height, width)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
        video = np.empty((frames, height, width, 3), np.uint8)
        for f in range(frames):
            mask = _shape_mask(shape, cx, cy, r, ys, xs)
            frame = np.where(mask[..., None], colour, background)
            video[f] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
            # Bounce: reflect the centre back inside [r, width - r] x [r, height - r] and flip the velocity.
            cx, cy = cx + vx, cy + vy
            if cx < r or cx > width - r:
                vx = -vx
                cx = np.clip(2 * np.clip(cx, r, width - r) - cx, r, width - r)
            if cy < r or cy > height - r:
                vy = -vy
                cy = np.clip(2 * np.clip(cy, r, height - r) - cy, r, height - r)
        return {"video": video, "caption": caption}
