"""grain DataLoader construction: source -> per-record transforms -> per-process batches.

Batches are dicts of numpy arrays (per process, b = global_batch_size // shard_count):
  "video"      float32 (b, F, H, W, 3) in [-1, 1]
  "cond_image" float32 (b, H, W, 3) in [-1, 1]   the conditioning frame (frame 0)
  "mask"       float32 (b, F)                    1 where the frame's latent is given to the model
  "caption"    str     (b,)                      raw captions
  "skipped"    int32   (b,)                      bad records replaced to produce each example

`iter(loader)` is a grain DataLoaderIterator; `get_state()` / `set_state()` give exact resume.
"""

from __future__ import annotations

from typing import Any

import grain.python as grain
import ml_collections
import numpy as np

from data_pipelines import transforms
from data_pipelines.synthetic import MovingShapesSource


class SyntheticToExample(grain.RandomMapTransform):
    """uint8 synthetic clip -> training example (scaling, conditioning frame, frame mask)."""

    def __init__(self, frame_prediction_prob: float, num_given_frames: int):
        self.frame_prediction_prob = frame_prediction_prob
        self.num_given_frames = num_given_frames

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        video = transforms.to_unit_range(element["video"])
        mask = transforms.frame_mask(
            video.shape[0],
            rng,
            frame_prediction_prob=self.frame_prediction_prob,
            num_given_frames=self.num_given_frames,
        )
        return {
            "video": video,
            "cond_image": video[0].copy(),
            "mask": mask,
            "caption": element["caption"],
            "skipped": np.int32(0),
        }


def _get(cfg: ml_collections.ConfigDict, key: str, default: Any) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def make_source_and_ops(data_config: ml_collections.ConfigDict) -> tuple[grain.RandomAccessDataSource, list]:
    """The random-access source and the per-record transforms for `data_config.kind`."""
    kind = _get(data_config, "kind", "synthetic")
    mask_ops = dict(
        frame_prediction_prob=float(_get(data_config, "frame_prediction_prob", 0.0)),
        num_given_frames=int(_get(data_config, "num_given_frames", 1)),
    )
    if kind == "synthetic":
        source = MovingShapesSource(
            num_videos=int(_get(data_config, "num_videos", 4096)),
            num_frames=int(data_config.num_frames),
            resolution=int(data_config.resolution),
            seed=int(_get(data_config, "source_seed", 0)),
        )
        return source, [SyntheticToExample(**mask_ops)]
    raise ValueError(f"data_config.kind={kind!r} is not supported; expected one of: 'synthetic'")


def make_loader(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None = None,
) -> grain.DataLoader:
    """A grain DataLoader yielding this process's share of each global batch.

    Records are shuffled globally by `seed` (the same permutation on every process), then split so process
    `shard_index` of `shard_count` sees a disjoint 1/shard_count of every epoch.
    """
    if global_batch_size % shard_count:
        raise ValueError(
            f"make_loader: global_batch_size={global_batch_size} is not divisible by shard_count={shard_count}"
        )
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"make_loader: shard_index={shard_index} must be in [0, shard_count={shard_count})")
    source, ops = make_source_and_ops(data_config)
    shard_options = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=bool(_get(data_config, "shuffle", True)),
        num_epochs=num_epochs,
        seed=seed,
    )
    per_process = global_batch_size // shard_count
    read_options = grain.ReadOptions(
        num_threads=int(_get(data_config, "read_threads", 4)),
        prefetch_buffer_size=int(_get(data_config, "prefetch", 16)),
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[*ops, grain.Batch(per_process, drop_remainder=True)],
        worker_count=int(_get(data_config, "worker_count", 0)),
        worker_buffer_size=int(_get(data_config, "worker_buffer_size", 2)),
        read_options=read_options,
    )
