"""Encode a video dataset once into ArrayRecord shards of latents + CLIP image embeddings + captions.

    python -m atomo_jax.cache_latents --checkpoint=CKPT --output_dir=latents/
        [--config=configs/base.py --config.data.root=... --config.data.captions=...]
        [--records_per_shard=256 --batch_size=16]

Uses the model's `encode_video` / `encode_image` (AtomoVideo interface) from `--checkpoint` (a composed checkpoint,
a training workdir or one of its step dirs); the data comes from `--config`'s `data` (default: the checkpoint's).
Multi-host: run it on every host (jax.distributed starts as for training, e.g. from the ATOMO_* variables).
Clips are cut deterministically (first frames, centre crop), each at its bucket's shape with
config.data.buckets (clips that fill no bucket are skipped and counted; the sidecar lists each record's bucket). Shard k holds source records [k*R, (k+1)*R); process p of P writes shards k with k % P == p, and
within a process each batch is split over the local devices. A shard is written to a temporary name and renamed
when complete, so a killed run resumes by skipping finished shards. Bad videos are skipped and listed in the
shard's `.json` sidecar and counted. Train on the result with data.kind="latents", data.latents_dir=OUTPUT_DIR;
the trainer tokenizes the cached captions.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import sys
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from atomo_jax.configuration import add_log_level, cli_parser, parse_cli
from atomo_jax.parallel import distributed
from atomo_jax.training.checkpoint import load_inference
from data_pipelines.loader import clip_spec, load_clip, plan_buckets
from data_pipelines.sources import encode_record
from data_pipelines.transforms import to_unit_range
from data_pipelines.video_decode import BadVideo


def shard_name(shard: int, num_shards: int) -> str:
    return f"latents-{shard:05d}-of-{num_shards:05d}.array_record"


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
    latent_dtype: str = "float16",
    decode_threads: int = 4,
    progress: bool = True,
) -> dict[str, int]:
    """Writes this process's shards; returns {"written", "skipped", "shards_done", "shards_skipped_existing"}."""
    os.makedirs(output_dir, exist_ok=True)
    plan = plan_buckets(data_config)
    source = plan.source
    specs = [clip_spec(data_config, False, b) for b in plan.buckets]
    record_buckets = plan.record_buckets if plan.record_buckets is not None else np.zeros(len(source), np.int32)
    timeout_s = float(data_config.decode_timeout_s) or None
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
            written_buckets: list[list[int]] = []  # the pixel bucket of each record, in write order

            def flush(bucket: int, batch: list[tuple[int, np.ndarray, str]]) -> None:
                video = to_unit_range(np.stack([clip for _, clip, _ in batch]))
                latents, embeds = encode(video)
                for (index, _, caption), lat, emb in zip(batch, latents, embeds):
                    record = {"latents": lat.astype(latent_dtype), "image_embeds": emb.astype(np.float32),
                              "caption": caption, "key": str(index)}
                    writer.write(encode_record(record))
                    b = plan.buckets[bucket]
                    written_buckets.append([b.frames, b.height, b.width])
                stats["written"] += len(batch)

            def load(index: int) -> tuple[np.ndarray, str]:
                if record_buckets[index] < 0:
                    raise BadVideo(source[index].get("path") or f"record {index}", "fills no bucket")
                # the spec is deterministic (first frames, centre crop): the rng is never drawn from
                return load_clip(source[index], specs[record_buckets[index]], np.random.default_rng(index),
                                 timeout_s)

            pending: dict[int, list[tuple[int, np.ndarray, str]]] = {}  # a batch being gathered per bucket
            futures = {i: pool.submit(load, i) for i in indices}
            for index in indices:
                try:
                    clip, caption = futures.pop(index).result()
                    batch = pending.setdefault(int(record_buckets[index]), [])
                    batch.append((index, clip, caption))
                    if len(batch) == batch_size:
                        flush(int(record_buckets[index]), pending.pop(int(record_buckets[index])))
                except BadVideo as e:
                    skipped.append(str(e))
                    logging.warning("cache_latents: skipping %s", e)
                bar.update(1)
            for bucket, batch in sorted(pending.items()):
                flush(bucket, batch)
            writer.close()
            with open(final + ".json", "w") as f:
                json.dump({"shard": shard, "records": len(indices) - len(skipped), "skipped": skipped,
                           "buckets": written_buckets}, f)
            os.replace(tmp, final)  # atomic: a shard file exists only when complete
            stats["skipped"] += len(skipped)
            stats["shards_done"] += 1
    bar.close()
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli_parser("atomo-cache-latents", __doc__)
    parser.add_argument("--checkpoint", required=True, help="composed checkpoint, training workdir or step dir")
    parser.add_argument("--output_dir", required=True, help="where the ArrayRecord shards go")
    parser.add_argument("--config", help="config whose .data to encode (default: the checkpoint's); "
                                         "--config.a.b=value overrides apply to it")
    parser.add_argument("--records_per_shard", type=int, default=256,
                        help="source records per shard (the unit of resumption)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="videos per encoder call (split over this process's devices)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                        help="a training checkpoint's EMA (default) or raw weights")
    parser.add_argument("--all_progress_bars", action="store_true",
                        help="a progress bar on every process, not just process 0")
    add_log_level(parser)
    args, config = parse_cli(parser, argv)
    distributed.maybe_initialize()
    ckpt_config, model, params = load_inference(args.checkpoint, use_ema=args.weights == "ema")
    stats = cache_latents(model, params, (config or ckpt_config).data, args.output_dir,
                          records_per_shard=args.records_per_shard, batch_size=args.batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          progress=jax.process_index() == 0 or args.all_progress_bars)
    print(json.dumps({"process": jax.process_index(), **stats}), flush=True)
    return 0


def run() -> None:
    """The `atomo-cache-latents` console script and `python -m atomo_jax.cache_latents`."""
    sys.exit(main())


if __name__ == "__main__":
    run()
