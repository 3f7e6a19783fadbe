"""grain DataLoader construction: source -> per-record decode/transform (with bad-record skipping) -> batches.

Pixel batches are dicts of numpy arrays (per process, b = global_batch_size // shard_count; F, H, W: the batch's
bucket, see data_pipelines/buckets.py, or num_frames x resolution x resolution without buckets):
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
import concurrent.futures
import dataclasses
import logging
import re
from typing import Callable, Sequence

import grain.python as grain
import ml_collections
import numpy as np
import tqdm

from data_pipelines import transforms, worker_guard
from data_pipelines.buckets import Bucket, BucketedSource, BucketSampler, BucketSchedule, assign, parse_buckets
from data_pipelines.errors import DataBroken, DataError
from data_pipelines.sources import LatentShardsSource, TfdsVideoSource, VideoFolderSource
from data_pipelines.synthetic import MovingShapesSource
from data_pipelines.video_decode import BadVideo, ClipSpec, call_with_timeout, crop_offsets, decode_clip, resized_size

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


def load_clip(element: dict, spec: ClipSpec, rng: np.random.Generator,
              timeout_s: float | None = None) -> tuple[np.ndarray, str]:
    """An undecoded record -> (uint8 clip (F, H, W, 3) as `spec` cuts it, caption); raises BadVideo."""
    name = element.get("path") or f"record {element.get('key', '?')}"
    caption = element.get("caption")
    if not caption:
        raise BadVideo(name, "missing caption")
    if "video" in element:  # already decoded (synthetic)
        frames = element["video"][: spec.num_frames]
        if frames.shape[0] < spec.num_frames:
            raise BadVideo(name, f"too short: {frames.shape[0]} frames, need {spec.num_frames}")
        height, width = resized_size(*frames.shape[1:3], spec)
        frames = transforms.resize(frames, height, width)
        return transforms.crop(frames, *crop_offsets(height, width, spec, rng), spec.height, spec.width), caption
    source = element.get("video_bytes", element.get("path"))
    return call_with_timeout(lambda: decode_clip(source, spec, rng, path=name), timeout_s, name), caption


class MakeExample(grain.RandomMapTransform):
    """Undecoded record -> training example at its bucket's spec (`specs[record["bucket"]]`, the one spec without
    buckets); a bad record is replaced by a random other one of the same bucket and counted."""

    def __init__(
        self,
        source: grain.RandomAccessDataSource,
        specs: Sequence[ClipSpec],
        *,
        frame_prediction_prob: float = 0.0,
        num_given_frames: int = 1,
        decode_timeout_s: float | None = 30.0,
        bad_window: int = 1000,
        max_bad_fraction: float = 0.95,
        tokenize: Tokenizer | None = None,
    ):
        self.source = source
        self.specs = tuple(specs)
        self.frame_prediction_prob = frame_prediction_prob
        self.num_given_frames = num_given_frames
        self.decode_timeout_s = decode_timeout_s
        self.health = DataHealth(bad_window, max_bad_fraction)
        self.tokenize = tokenize

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        worker_guard.guard()
        skipped = 0
        bucket = int(element.get("bucket", 0))
        spec = self.specs[bucket]
        while True:
            try:
                pixels, caption = load_clip(element, spec, rng, self.decode_timeout_s)
                self.health.good()
                break
            except BadVideo as e:
                SKIPS.record(e)
                skipped += 1
                self.health.bad(e)
                if isinstance(self.source, BucketedSource):
                    element = self.source.replacement(bucket, rng)
                else:
                    element = self.source[int(rng.integers(len(self.source)))]
        video = transforms.to_unit_range(pixels)
        example = {
            "video": video,
            "cond_image": video[0].copy(),
            "mask": transforms.frame_mask(
                spec.num_frames,
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


class LatentToExample(grain.RandomMapTransform):
    """Cached-latent record -> training example (latents, image embeddings, frame mask, caption tokens).
    `frames[b]`: the frame count of bucket b (the record's "bucket"; 0 without buckets)."""

    def __init__(self, frames: Sequence[int], frame_prediction_prob: float = 0.0, num_given_frames: int = 1,
                 tokenize: Tokenizer | None = None):
        self.frames = tuple(frames)
        self.frame_prediction_prob = frame_prediction_prob
        self.num_given_frames = num_given_frames
        self.tokenize = tokenize

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        worker_guard.guard()
        latents = element["latents"].astype(np.float32)
        num_frames = self.frames[int(element.get("bucket", 0))]
        if latents.shape[0] != num_frames:
            raise ValueError(
                f"cached latents have {latents.shape[0]} frames but their bucket has {num_frames} "
                f"(config.data.num_frames / config.data.buckets); re-cache the latents with this data config"
            )
        example = {
            "latents": latents,
            "image_embeds": element["image_embeds"].astype(np.float32),
            "mask": transforms.frame_mask(
                num_frames,
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


def clip_spec(data_config: ml_collections.ConfigDict, training: bool = True, bucket: Bucket | None = None) -> ClipSpec:
    """The ClipSpec described by a data config, at `bucket`'s shape (default: num_frames x resolution x resolution);
    eval (training=False) uses the first frames and a centre crop."""
    d = data_config
    bucket = bucket or Bucket(int(d.num_frames), int(d.resolution), int(d.resolution))
    return ClipSpec(
        num_frames=bucket.frames,
        height=bucket.height,
        width=bucket.width,
        stride=int(d.frame_stride),
        target_fps=float(d.target_fps) if d.target_fps else None,
        short_side=int(d.short_side) or None,
        random_start=training and bool(d.random_start),
        random_crop=training and bool(d.random_crop),
        decode_threads=int(d.decode_threads),
    )


def synthetic_source(data_config: ml_collections.ConfigDict, *, num_videos: int | None = None,
                     seed: int | None = None) -> MovingShapesSource:
    """Moving shapes as `data_config` describes them; `num_videos`/`seed` override the config's (held-out clips).
    With buckets, clip i is drawn at bucket i % len(buckets)'s shape (times source_resolution / resolution)."""
    d = data_config
    scale = (int(d.source_resolution) or int(d.resolution)) / int(d.resolution)
    sizes = [(b.frames, round(b.height * scale), round(b.width * scale))
             for b in parse_buckets(d.buckets, d.num_frames, d.resolution)] if d.buckets else ()
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
        sizes=sizes,
    )


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """The source and which bucket each of its records trains in (None without `config.data.buckets`: every
    record in the one bucket, ordered by grain's IndexSampler)."""

    source: grain.RandomAccessDataSource
    buckets: tuple[Bucket, ...]
    record_buckets: np.ndarray | None = None
    left_out: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> clips in no bucket

    def counts(self) -> list[int]:
        if self.record_buckets is None:
            return [len(self.source)]
        return np.bincount(self.record_buckets[self.record_buckets >= 0], minlength=len(self.buckets)).tolist()

    def summary(self) -> str:
        """One line: clips per bucket and the clips left out, by reason."""
        parts = ", ".join(f"{b}: {n} clips" for b, n in zip(self.buckets, self.counts()))
        out = sum(self.left_out.values())
        if out:
            parts += f"; {out} left out (" + ", ".join(f"{n} {r}" for r, n in sorted(self.left_out.items())) + ")"
        return parts


def plan_buckets(data_config: ml_collections.ConfigDict) -> BucketPlan:
    """The source of `data_config` and each record's bucket: from cached latents' sidecars, else from each clip's
    header (size, length, rate; read in `read_threads` threads); clips that fill no bucket or cannot be read are
    left out and counted. Every process computes the same plan from the same data."""
    d = data_config
    source = make_source(d)
    buckets = parse_buckets(d.buckets, d.num_frames, d.resolution)
    if not d.buckets:
        return BucketPlan(source, buckets)
    if d.kind == "latents":
        return BucketPlan(source, buckets, source.record_buckets(buckets))
    specs = [clip_spec(d, True, b) for b in buckets]
    left_out: collections.Counter = collections.Counter()

    def bucket_of(index: int) -> int:
        try:
            info = source.header(index)
        except BadVideo as e:
            logging.warning("data: leaving out %s", e)
            return -2
        # drawn clips are cut frame by frame (load_clip), files at the stride or target fps
        needed = [s.num_frames if d.kind == "synthetic" else s.frames_needed(info.fps) for s in specs]
        return assign(info.width, info.height, [info.frames >= n for n in needed], buckets)

    # Files are opened one by one unless the caption file has the header columns: a bar for large folders.
    with concurrent.futures.ThreadPoolExecutor(max(1, int(d.read_threads))) as pool, \
            tqdm.tqdm(total=len(source), desc="data: reading clip sizes", unit="clip", mininterval=5,
                      disable=d.kind == "synthetic" or len(source) < 1000) as bar:
        def counted(index: int) -> int:
            bar.update(1)
            return bucket_of(index)

        record_buckets = np.fromiter(pool.map(counted, range(len(source))), np.int32, len(source))
    left_out["too short for every bucket"] = int(np.sum(record_buckets == -1))
    left_out["unreadable"] = int(np.sum(record_buckets == -2))
    record_buckets[record_buckets < 0] = -1
    return BucketPlan(source, buckets, record_buckets, {k: v for k, v in left_out.items() if v})


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
    plan: BucketPlan,
    *,
    training: bool = True,
    tokenize: Tokenizer | None = None,
) -> list[grain.RandomMapTransform]:
    """The per-record transforms (before batching) for `data_config.kind`."""
    d = data_config
    mask = dict(frame_prediction_prob=float(d.frame_prediction_prob) if training else 0.0,
                num_given_frames=int(d.num_given_frames))
    if d.kind == "latents":
        return [LatentToExample([b.frames for b in plan.buckets], tokenize=tokenize, **mask)]
    return [
        MakeExample(
            plan.source,
            [clip_spec(d, training, b) for b in plan.buckets],
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
    plan: BucketPlan | None = None,
) -> grain.DataLoader:
    """A grain DataLoader yielding this process's share of each global batch.

    Records are shuffled globally by `seed` (the same permutation on every process), then split so process
    `shard_index` of `shard_count` sees a disjoint 1/shard_count of every epoch. With `config.data.buckets` every
    global batch is one bucket's (buckets.BucketSchedule) and each process gets its consecutive rows of it.
    `tokenize(caption) -> (77,) int32` adds "tokens" (it must be picklable when worker_count > 0). `training=False`
    gives first-frames centre crops and no frame-prediction masks. `data_config` is a `config.data` section as
    configs/base.py declares it; `plan` is `plan_buckets(data_config)` when the caller has one already.
    """
    if global_batch_size % shard_count:
        raise ValueError(
            f"make_loader: global_batch_size={global_batch_size} is not divisible by shard_count={shard_count}"
        )
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"make_loader: shard_index={shard_index} must be in [0, shard_count={shard_count})")
    plan = plan or plan_buckets(data_config)
    source = plan.source
    if plan.record_buckets is None:
        sampler = grain.IndexSampler(
            num_records=len(source),
            shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True),
            shuffle=bool(data_config.shuffle),
            num_epochs=num_epochs,
            seed=seed,
        )
    else:
        source = BucketedSource(source, plan.record_buckets)
        schedule = BucketSchedule(plan.record_buckets, len(plan.buckets), global_batch_size, seed,
                                  bool(data_config.shuffle))
        sampler = BucketSampler(schedule, shard_index=shard_index, shard_count=shard_count,
                                worker_count=int(data_config.worker_count), seed=seed, num_epochs=num_epochs)
    plan = dataclasses.replace(plan, source=source)
    per_process = global_batch_size // shard_count
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            *make_operations(data_config, plan, training=training, tokenize=tokenize),
            grain.Batch(per_process, drop_remainder=True),
        ],
        worker_count=int(data_config.worker_count),
        worker_buffer_size=int(data_config.worker_buffer_size),
        read_options=grain.ReadOptions(
            num_threads=int(data_config.read_threads),
            prefetch_buffer_size=int(data_config.prefetch),
        ),
    )
