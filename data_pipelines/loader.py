"""grain DataLoader construction: source -> per-record decode/transform (with bad-record skipping) -> batches.

Pixel batches are dicts of numpy arrays (per process, b = global_batch_size // shard_count):
  "video"      float32 (b, F, H, W, 3) in [-1, 1]
  "cond_image" float32 (b, H, W, 3) in [-1, 1]   the conditioning frame (frame 0)
  "mask"       float32 (b, F)                    1 where the frame's latent is given to the model
  "caption"    str     (b,)                      raw captions
  "skipped"    int32   (b,)                      bad records skipped to produce each example (sum it for metrics)
  "tokens"     int32   (b, 77)                   only when a `tokenize` function is given
Cached-latent batches (kind="latents") carry "latents" (b, F, h, w, 4) and "image_embeds" (b, E) instead of
"video" / "cond_image".

`iter(loader)` is a grain DataLoaderIterator; `get_state()` / `set_state()` restore the exact next batch (for the
same data_config, batch size, seed, shard and worker_count).
"""

from __future__ import annotations

import collections
import logging
import re
from typing import Callable

import grain.python as grain
import ml_collections
import numpy as np

from data_pipelines import transforms, worker_guard
from data_pipelines.errors import DataBroken, DataError
from data_pipelines.sources import LatentShardsSource, TfdsVideoSource, VideoFolderSource
from data_pipelines.synthetic import MovingShapesSource
from data_pipelines.video_decode import BadVideo, ClipSpec, call_with_timeout, decode_clip

KINDS = ("synthetic", "video_folder", "tfds", "latents")

Tokenizer = Callable[[str], np.ndarray]


class SkipLog:
    """Per-process count of skipped records; the first `log_first` paths are logged with their reason."""

    def __init__(self, log_first: int = 20):
        self.log_first = log_first
        self.count = 0
        self.first: list[str] = []

    def record(self, error: BadVideo) -> None:
        self.count += 1
        if len(self.first) < self.log_first:
            self.first.append(str(error))
            logging.warning("data: skipping bad record %d: %s", self.count, error)


class DataHealth:
    """Outcomes of the last `window` records this worker read; stops the run when at least `max_bad_fraction` of a
    full window was bad. A corpus with many bad files still trains (each good record just costs more reads), a
    missing mount or a wrong path pattern stops within `window` reads."""

    def __init__(self, window: int = 1000, max_bad_fraction: float = 0.95):
        self.window, self.max_bad_fraction = int(window), float(max_bad_fraction)
        self.outcomes: collections.deque[str | None] = collections.deque(maxlen=self.window)

    def good(self) -> None:
        self.outcomes.append(None)

    def bad(self, error: BadVideo) -> None:
        self.outcomes.append(re.sub(r"\d+", "N", error.reason))  # "too short: 3 frames" and "... 5 ..." count as one
        bad = [r for r in self.outcomes if r is not None]
        if len(self.outcomes) == self.window and len(bad) >= self.max_bad_fraction * self.window:
            common = ", ".join(f"{reason!r} x{n}" for reason, n in collections.Counter(bad).most_common(3))
            raise DataBroken(f"data: {len(bad)} of the last {self.window} records were bad (limit "
                             f"config.data.max_bad_fraction={self.max_bad_fraction:g}); most common: {common}; last: "
                             f"{error}")


# Skips seen in *this* process, for the log lines (with worker_count > 0 each worker counts its own); the batch key
# "skipped" is what reaches the trainer in every setting.
SKIPS = SkipLog()


class MakeExample(grain.RandomMapTransform):
    """Undecoded record -> training example; a bad record is replaced by a random other one and counted."""

    def __init__(
        self,
        source: grain.RandomAccessDataSource,
        spec: ClipSpec,
        *,
        frame_prediction_prob: float = 0.0,
        num_given_frames: int = 1,
        decode_timeout_s: float | None = 30.0,
        bad_window: int = 1000,
        max_bad_fraction: float = 0.95,
        tokenize: Tokenizer | None = None,
    ):
        self.source = source
        self.spec = spec
        self.frame_prediction_prob = frame_prediction_prob
        self.num_given_frames = num_given_frames
        self.decode_timeout_s = decode_timeout_s
        self.health = DataHealth(bad_window, max_bad_fraction)
        self.tokenize = tokenize

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        worker_guard.guard()
        skipped = 0
        while True:
            try:
                pixels, caption = self._load(element, rng)
                self.health.good()
                break
            except BadVideo as e:
                SKIPS.record(e)
                skipped += 1
                self.health.bad(e)
                element = self.source[int(rng.integers(len(self.source)))]
        video = transforms.to_unit_range(pixels)
        example = {
            "video": video,
            "cond_image": video[0].copy(),
            "mask": transforms.frame_mask(
                self.spec.num_frames,
                rng,
                frame_prediction_prob=self.frame_prediction_prob,
                num_given_frames=self.num_given_frames,
            ),
            "caption": caption,
            "skipped": np.int32(skipped),
        }
        if self.tokenize is not None:
            example["tokens"] = np.asarray(self.tokenize(caption), np.int32)
        return example

    def _load(self, element: dict, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        name = element.get("path") or f"record {element.get('key', '?')}"
        caption = element.get("caption")
        if not caption:
            raise BadVideo(name, "missing caption")
        if "video" in element:  # already decoded (synthetic)
            frames = element["video"][: self.spec.num_frames]
            if frames.shape[0] < self.spec.num_frames:
                raise BadVideo(name, f"too short: {frames.shape[0]} frames, need {self.spec.num_frames}")
            frames = transforms.resize_short_side(frames, self.spec.short_side or self.spec.resolution)
            return transforms.crop(frames, self.spec.resolution, rng if self.spec.random_crop else None), caption
        source = element.get("video_bytes", element.get("path"))
        frames = call_with_timeout(
            lambda: decode_clip(source, self.spec, rng, path=name), self.decode_timeout_s, name
        )
        return frames, caption


class LatentToExample(grain.RandomMapTransform):
    """Cached-latent record -> training example (latents, image embeddings, frame mask, caption tokens)."""

    def __init__(self, num_frames: int, frame_prediction_prob: float = 0.0, num_given_frames: int = 1,
                 tokenize: Tokenizer | None = None):
        self.num_frames = num_frames
        self.frame_prediction_prob = frame_prediction_prob
        self.num_given_frames = num_given_frames
        self.tokenize = tokenize

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        worker_guard.guard()
        latents = element["latents"].astype(np.float32)
        if latents.shape[0] != self.num_frames:
            raise ValueError(
                f"cached latents have {latents.shape[0]} frames but config.data.num_frames={self.num_frames}"
            )
        example = {
            "latents": latents,
            "image_embeds": element["image_embeds"].astype(np.float32),
            "mask": transforms.frame_mask(
                self.num_frames,
                rng,
                frame_prediction_prob=self.frame_prediction_prob,
                num_given_frames=self.num_given_frames,
            ),
            "caption": str(element["caption"]),
            "skipped": np.int32(0),
        }
        if self.tokenize is not None:
            example["tokens"] = np.asarray(self.tokenize(example["caption"]), np.int32)
        return example


def clip_spec(data_config: ml_collections.ConfigDict, training: bool = True) -> ClipSpec:
    """The ClipSpec described by a data config; eval (training=False) uses the first frames and a centre crop."""
    d = data_config
    return ClipSpec(
        num_frames=int(d.num_frames),
        resolution=int(d.resolution),
        stride=int(d.frame_stride),
        target_fps=float(d.target_fps) if d.target_fps else None,
        short_side=int(d.short_side) or None,
        random_start=training and bool(d.random_start),
        random_crop=training and bool(d.random_crop),
        decode_threads=int(d.decode_threads),
    )


def synthetic_source(data_config: ml_collections.ConfigDict, *, num_videos: int | None = None,
                     seed: int | None = None) -> MovingShapesSource:
    """Moving shapes as `data_config` describes them; `num_videos`/`seed` override the config's (held-out clips)."""
    d = data_config
    return MovingShapesSource(
        num_videos=int(num_videos or d.num_videos),
        num_frames=int(d.num_frames),
        resolution=int(d.source_resolution or d.resolution),
        seed=int(d.source_seed if seed is None else seed),
        radius=tuple(d.shape_radius),
        speed=tuple(d.shape_speed),
        motion=str(d.shape_motion),
        gradient_prob=float(d.gradient_prob),
        background=str(d.background),
    )


def make_source(data_config: ml_collections.ConfigDict) -> grain.RandomAccessDataSource:
    """The random-access source for `data_config.kind` (see KINDS)."""
    d = data_config
    if d.kind == "synthetic":
        return synthetic_source(d)
    if d.kind == "video_folder":
        return VideoFolderSource(d.root, d.captions, path_format=d.path_format, caption_column=d.caption_column)
    if d.kind == "tfds":
        if not d.tfds_name:
            raise DataError("config.data.kind='tfds' needs config.data.tfds_name")
        return TfdsVideoSource(d.tfds_name, d.tfds_split, d.tfds_data_dir or None)
    if d.kind == "latents":
        if not d.latents_dir:
            raise DataError("config.data.kind='latents' needs config.data.latents_dir (a folder written by "
                             "`python -m atomo_jax.cache_latents`)")
        return LatentShardsSource.from_dir(d.latents_dir)
    raise DataError(f"config.data.kind={d.kind!r} is not supported; expected one of {KINDS}")


def make_operations(
    data_config: ml_collections.ConfigDict,
    source: grain.RandomAccessDataSource,
    *,
    training: bool = True,
    tokenize: Tokenizer | None = None,
) -> list[grain.RandomMapTransform]:
    """The per-record transforms (before batching) for `data_config.kind`."""
    d = data_config
    mask = dict(frame_prediction_prob=float(d.frame_prediction_prob) if training else 0.0,
                num_given_frames=int(d.num_given_frames))
    if d.kind == "latents":
        return [LatentToExample(int(d.num_frames), tokenize=tokenize, **mask)]
    return [
        MakeExample(
            source,
            clip_spec(d, training),
            decode_timeout_s=float(d.decode_timeout_s) or None,
            bad_window=int(d.bad_window),
            max_bad_fraction=float(d.max_bad_fraction),
            tokenize=tokenize,
            **mask,
        )
    ]


def make_loader(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None = None,
    training: bool = True,
    tokenize: Tokenizer | None = None,
) -> grain.DataLoader:
    """A grain DataLoader yielding this process's share of each global batch.

    Records are shuffled globally by `seed` (the same permutation on every process), then split so process
    `shard_index` of `shard_count` sees a disjoint 1/shard_count of every epoch. `tokenize(caption) -> (77,) int32`
    adds "tokens" (it must be picklable when worker_count > 0). `training=False` gives first-frames centre crops
    and no frame-prediction masks. `data_config` is a `config.data` section as configs/base.py declares it.
    """
    if global_batch_size % shard_count:
        raise ValueError(
            f"make_loader: global_batch_size={global_batch_size} is not divisible by shard_count={shard_count}"
        )
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"make_loader: shard_index={shard_index} must be in [0, shard_count={shard_count})")
    source = make_source(data_config)
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True),
        shuffle=bool(data_config.shuffle),
        num_epochs=num_epochs,
        seed=seed,
    )
    per_process = global_batch_size // shard_count
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            *make_operations(data_config, source, training=training, tokenize=tokenize),
            grain.Batch(per_process, drop_remainder=True),
        ],
        worker_count=int(data_config.worker_count),
        worker_buffer_size=int(data_config.worker_buffer_size),
        read_options=grain.ReadOptions(
            num_threads=int(data_config.read_threads),
            prefetch_buffer_size=int(data_config.prefetch),
        ),
    )
