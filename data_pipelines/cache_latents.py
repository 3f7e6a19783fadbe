"""Encode a video dataset once into ArrayRecord shards of latents + CLIP image embeddings (+ caption tokens).

    python -m data_pipelines.cache_latents --checkpoint=WORKDIR --output_dir=latents/ \
        [--config=configs/base.py --config.data.root=... --config.data.captions=...] \
        [--records_per_shard=256 --batch_size=16]

Uses the model's `encode_video` / `encode_image` (AtomoVideo interface) from `load_inference(--checkpoint)`; the data
comes from `--config`'s `data` (default: the checkpoint's config). Clips are cut deterministically (first frames,
centre crop). Shard k holds source records [k*R, (k+1)*R); process p of P writes shards k with k % P == p, and
within a process each batch is split over the local devices. A shard is written to a temporary name and renamed
when complete, so a killed run resumes by skipping finished shards. Bad videos are skipped and listed in the
shard's `.json` sidecar. Train on the result with data.kind="latents", data.latents_dir=OUTPUT_DIR.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines.loader import Tokenizer, clip_spec, make_source
from data_pipelines.sources import encode_record
from data_pipelines.transforms import to_unit_range
from data_pipelines.video_decode import BadVideo, call_with_timeout, decode_clip


def shard_name(shard: int, num_shards: int) -> str:
    return f"latents-{shard:05d}-of-{num_shards:05d}.array_record"


def _load(source, index: int, spec, timeout_s: float | None) -> tuple[np.ndarray, str]:
    """Decoded uint8 clip + caption of one record; raises BadVideo."""
    record = source[index]
    name = record.get("path") or f"record {record.get('key', index)}"
    caption = record.get("caption")
    if not caption:
        raise BadVideo(name, "missing caption")
    if "video" in record:  # synthetic: already pixels
        video = record["video"][: spec.num_frames]
        if video.shape[0] < spec.num_frames:
            raise BadVideo(name, f"too short: {video.shape[0]} frames, need {spec.num_frames}")
        return video, caption
    src = record.get("video_bytes", record.get("path"))
    rng = np.random.default_rng(index)  # unused by a deterministic spec, but decode_clip takes one
    return call_with_timeout(lambda: decode_clip(src, spec, rng, path=name), timeout_s, name), caption


def make_encoder(model: Any, params: dict, devices: list) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """jit(video -> (latents, image_embeds)) with the batch split over `devices` (padded to a multiple)."""
    mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)

    @jax.jit
    def encode(p, video):
        return model.encode_video(p, video), model.encode_image(p, video[:, 0])

    def run(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = video.shape[0]
        pad = (-n) % len(devices)
        if pad:
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        latents, embeds = encode(params, jax.device_put(video, batch_sharding))
        return np.asarray(latents)[:n], np.asarray(embeds)[:n]

    return run


def cache_latents(
    model: Any,
    params: dict,
    data_config: ml_collections.ConfigDict,
    output_dir: str,
    *,
    records_per_shard: int = 256,
    batch_size: int = 8,
    process_index: int = 0,
    process_count: int = 1,
    tokenize: Tokenizer | None = None,
    latent_dtype: str = "float16",
    decode_threads: int = 4,
    progress: bool = True,
) -> dict[str, int]:
    """Writes this process's shards; returns {"written", "skipped", "shards_done", "shards_skipped_existing"}."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    os.makedirs(output_dir, exist_ok=True)
    source = make_source(data_config)
    spec = clip_spec(data_config, training=False)
    timeout_s = data_config.get("decode_timeout_s", 30.0)
    num_shards = math.ceil(len(source) / records_per_shard)
    mine = [s for s in range(num_shards) if s % process_count == process_index]
    todo = [s for s in mine if not os.path.exists(os.path.join(output_dir, shard_name(s, num_shards)))]
    encode = make_encoder(model, params, jax.local_devices())
    stats = {"written": 0, "skipped": 0, "shards_done": 0, "shards_skipped_existing": len(mine) - len(todo)}
    total = sum(min(records_per_shard, len(source) - s * records_per_shard) for s in todo)
    bar = tqdm(total=total, desc=f"cache_latents[{process_index}]", unit="video", disable=not progress)
    with concurrent.futures.ThreadPoolExecutor(decode_threads) as pool:
        for shard in todo:
            indices = range(shard * records_per_shard, min((shard + 1) * records_per_shard, len(source)))
            final = os.path.join(output_dir, shard_name(shard, num_shards))
            tmp = final + f".tmp-{process_index}"
            writer = ArrayRecordWriter(tmp, "group_size:1")
            skipped: list[str] = []

            def flush(batch: list[tuple[int, np.ndarray, str]]) -> None:
                video = to_unit_range(np.stack([clip for _, clip, _ in batch]))
                latents, embeds = encode(video)
                for (index, _, caption), lat, emb in zip(batch, latents, embeds):
                    record = {"latents": lat.astype(latent_dtype), "image_embeds": emb.astype(np.float32),
                              "caption": caption, "key": str(index)}
                    if tokenize is not None:
                        record["tokens"] = np.asarray(tokenize(caption), np.int32)
                    writer.write(encode_record(record))
                stats["written"] += len(batch)

            pending: list[tuple[int, np.ndarray, str]] = []
            futures = {i: pool.submit(_load, source, i, spec, timeout_s) for i in indices}
            for index in indices:
                try:
                    clip, caption = futures.pop(index).result()
                    pending.append((index, clip, caption))
                except BadVideo as e:
                    skipped.append(str(e))
                    logging.warning("cache_latents: skipping %s", e)
                if len(pending) == batch_size:
                    flush(pending)
                    pending = []
                bar.update(1)
            if pending:
                flush(pending)
            writer.close()
            with open(final + ".json", "w") as f:
                json.dump({"shard": shard, "records": len(indices) - len(skipped), "skipped": skipped}, f)
            os.replace(tmp, final)  # atomic: a shard file exists only when complete
            stats["skipped"] += len(skipped)
            stats["shards_done"] += 1
    bar.close()
    return stats


def main(argv):
    del argv
    from absl import flags  # pylint: disable=g-import-not-at-top
    from atomo_jax.training.checkpoint import load_inference  # pylint: disable=g-import-not-at-top

    FLAGS = flags.FLAGS
    if FLAGS.multiprocess:
        jax.distributed.initialize()
    ckpt_config, model, params = load_inference(FLAGS.checkpoint, use_ema=FLAGS.use_ema)
    config = FLAGS.config if FLAGS.config is not None else ckpt_config
    stats = cache_latents(
        model,
        params,
        config.data,
        FLAGS.output_dir,
        records_per_shard=FLAGS.records_per_shard,
        batch_size=FLAGS.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        progress=jax.process_index() == 0 or FLAGS.all_progress_bars,
    )
    print(json.dumps(stats))


if __name__ == "__main__":
    from absl import app, flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    config_flags.DEFINE_config_file("config", None, "Config whose .data to encode (default: the checkpoint's).")
    flags.DEFINE_string("checkpoint", None, "Training workdir or checkpoint dir for load_inference.", required=True)
    flags.DEFINE_string("output_dir", None, "Where the ArrayRecord shards go.", required=True)
    flags.DEFINE_integer("records_per_shard", 256, "Source records per shard (the unit of resumption).")
    flags.DEFINE_integer("batch_size", 8, "Videos per encoder call (split over this process's devices).")
    flags.DEFINE_bool("use_ema", True, "Encode with the EMA parameters.")
    flags.DEFINE_bool("multiprocess", False, "Call jax.distributed.initialize() (multi-host).")
    flags.DEFINE_bool("all_progress_bars", False, "Show a progress bar on every process, not just process 0.")
    app.run(main)
