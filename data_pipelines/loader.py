"""grain DataLoader construction: source -> per-record decode/transform (with bad-record skipping) -> batches.

Pixel batches are dicts of numpy arrays (per process, b = global_batch_size // shard_count):
  "video"      float32 (b, F, H, W, 3) in [-1, 1]
  "cond_image" float32 (b, H, W, 3) in [-1, 1]   the conditioning frame (frame 0)
  "mask"       float32 (b, F)                    1 where the frame's latent is given to the model
  "caption"    str     (b,)                      raw captions
  "skipped"    int32   (b,)                      bad records skipped to produce each example (sum it for metrics)
  "tokens"     int32   (b, 77)                   only when a `tokenize` function is given
  "clip_image" float32 (b, 224, 224, 3)          only with data_config.clip_image=True (CLIP-normalised)
Cached-latent batches (kind="latents") carry "latents" (b, F, h, w, 4) and "image_embeds" (b, E) instead of
"video" / "cond_image" / "clip_image".

`iter(loader)` is a grain DataLoaderIterator; `get_state()` / `set_state()` restore the exact next batch (for the
same data_config, batch size, seed, shard and worker_count).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import grain.python as grain
import ml_collections
import numpy as np

from data_pipelines import transforms
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


# Skips seen in *this* process (with worker_count > 0 the workers count their own; the batch key "skipped" is what
# reaches the trainer in every setting).
SKIPS = SkipLog()


def skipped_count() -> int:
    """Records skipped so far in this process (exact only for worker_count=0; use batch["skipped"] otherwise)."""
    return SKIPS.count


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
        max_retries: int = 16,
        clip_image: bool = False,
        tokenize: Tokenizer | None = None,
    ):
        self.source = source
        self.spec = spec
        self.frame_prediction_prob = frame_prediction_prob
        self.num_given_frames = num_given_frames
        self.decode_timeout_s = decode_timeout_s
        self.max_retries = max_retries
        self.clip_image = clip_image
        self.tokenize = tokenize

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        skipped = 0
        while True:
            try:
                pixels, caption = self._load(element, rng)
                break
            except BadVideo as e:
                SKIPS.record(e)
                skipped += 1
                if skipped > self.max_retries:
                    raise RuntimeError(
                        f"data: {skipped} bad records in a row (last: {e}); the dataset looks broken"
                    ) from e
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
        if self.clip_image:
            example["clip_image"] = transforms.clip_preprocess(example["cond_image"])
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
    """Cached-latent record -> training example (latents, image embeddings, frame mask, tokens)."""

    def __init__(self, num_frames: int, frame_prediction_prob: float = 0.0, num_given_frames: int = 1):
        self.num_frames = num_frames
        self.frame_prediction_prob = frame_prediction_prob
        self.num_given_frames = num_given_frames

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        latents = element["latents"].astype(np.float32)
        if latents.shape[0] != self.num_frames:
            raise ValueError(
                f"cached latents have {latents.shape[0]} frames but data_config.num_frames={self.num_frames}"
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
        if "tokens" in element:
            example["tokens"] = element["tokens"].astype(np.int32)
        return example


class CaptionTokenizer:
    """Picklable caption -> (77,) int32 CLIP ids; the tokenizer files are loaded lazily (once per worker)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_tokenizer": None}

    def __call__(self, caption: str) -> np.ndarray:
        from atomo_jax.models import tokenizer as tok  # pylint: disable=g-import-not-at-top

        if self._tokenizer is None:
            self._tokenizer = tok.load_clip_tokenizer(self.folder)
        return tok.tokenize(self._tokenizer, [caption])[0]


def _get(cfg: Any, key: str, default: Any) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def clip_spec(data_config: ml_collections.ConfigDict, training: bool = True) -> ClipSpec:
    """The ClipSpec described by a data config; eval (training=False) uses the first frames and a centre crop."""
    target_fps = _get(data_config, "target_fps", None)
    return ClipSpec(
        num_frames=int(data_config.num_frames),
        resolution=int(data_config.resolution),
        stride=int(_get(data_config, "frame_stride", 1)),
        target_fps=float(target_fps) if target_fps else None,
        short_side=_get(data_config, "short_side", None),
        random_start=training and bool(_get(data_config, "random_start", True)),
        random_crop=training and bool(_get(data_config, "random_crop", True)),
        decode_threads=int(_get(data_config, "decode_threads", 1)),
    )


def synthetic_source(data_config: ml_collections.ConfigDict, *, num_videos: int | None = None,
                     seed: int | None = None) -> MovingShapesSource:
    """Moving shapes as `data_config` describes them; `num_videos`/`seed` override the config's (held-out clips)."""
    return MovingShapesSource(
        num_videos=int(num_videos or _get(data_config, "num_videos", 4096)),
        num_frames=int(data_config.num_frames),
        resolution=int(_get(data_config, "source_resolution", None) or data_config.resolution),
        seed=int(_get(data_config, "source_seed", 0) if seed is None else seed),
        radius=tuple(_get(data_config, "shape_radius", (0.1, 0.22))),
        speed=tuple(_get(data_config, "shape_speed", (0.04, 0.12))),
        motion=str(_get(data_config, "shape_motion", "random")),
        gradient_prob=float(_get(data_config, "gradient_prob", 0.5)),
        background=str(_get(data_config, "background", "random")),
    )


def make_source(data_config: ml_collections.ConfigDict) -> grain.RandomAccessDataSource:
    """The random-access source for `data_config.kind` (see KINDS)."""
    kind = _get(data_config, "kind", "synthetic")
    if kind == "synthetic":
        return synthetic_source(data_config)
    if kind == "video_folder":
        return VideoFolderSource(
            data_config.root,
            data_config.captions,
            path_format=_get(data_config, "path_format", "{path}"),
            caption_column=_get(data_config, "caption_column", "caption"),
        )
    if kind == "tfds":
        return TfdsVideoSource(
            data_config.tfds_name, _get(data_config, "tfds_split", "train"), _get(data_config, "tfds_data_dir", None)
        )
    if kind == "latents":
        return LatentShardsSource.from_dir(data_config.latents_dir)
    raise ValueError(f"data_config.kind={kind!r} is not supported; expected one of {KINDS}")


def make_operations(
    data_config: ml_collections.ConfigDict,
    source: grain.RandomAccessDataSource,
    *,
    training: bool = True,
    tokenize: Tokenizer | None = None,
) -> list[grain.RandomMapTransform]:
    """The per-record transforms (before batching) for `data_config.kind`."""
    mask = dict(
        frame_prediction_prob=float(_get(data_config, "frame_prediction_prob", 0.0)) if training else 0.0,
        num_given_frames=int(_get(data_config, "num_given_frames", 1)),
    )
    if _get(data_config, "kind", "synthetic") == "latents":
        return [LatentToExample(int(data_config.num_frames), **mask)]
    return [
        MakeExample(
            source,
            clip_spec(data_config, training),
            decode_timeout_s=_get(data_config, "decode_timeout_s", 30.0),
            max_retries=int(_get(data_config, "max_retries", 16)),
            clip_image=bool(_get(data_config, "clip_image", False)),
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
    adds "tokens" (it must be picklable when worker_count > 0); without it, data_config.tokenizer_dir (a CLIP
    tokenizer folder) does the same. `training=False` gives first-frames centre crops
    and no frame-prediction masks.
    """
    if global_batch_size % shard_count:
        raise ValueError(
            f"make_loader: global_batch_size={global_batch_size} is not divisible by shard_count={shard_count}"
        )
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"make_loader: shard_index={shard_index} must be in [0, shard_count={shard_count})")
    source = make_source(data_config)
    if tokenize is None and _get(data_config, "tokenizer_dir", None):
        tokenize = CaptionTokenizer(data_config.tokenizer_dir)
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True),
        shuffle=bool(_get(data_config, "shuffle", True)),
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
        worker_count=int(_get(data_config, "worker_count", 0)),
        worker_buffer_size=int(_get(data_config, "worker_buffer_size", 2)),
        read_options=grain.ReadOptions(
            num_threads=int(_get(data_config, "read_threads", 4)),
            prefetch_buffer_size=int(_get(data_config, "prefetch", 16)),
        ),
    )
