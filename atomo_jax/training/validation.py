"""Validation during training: the user's own conditioning images, animated with the EMA weights every
`config.validation.every_steps` steps and at the end, with the same noise each time, so the same image can be watched
learning to move over a run.

Each validation writes, on process 0:
- `WORKDIR/validation/STEP.json`: per image its prompt, files and scores, and their means;
- `WORKDIR/validation/STEP/NAME.{mp4,gif,png}`: the video, and a strip (conditioning image first);
- TensorBoard: each video as an animated GIF under `validation/NAME`, the means under `validation/METRIC`.

Scores (`atomo_jax.eval.evaluate.score_video`, the `atomo_jax.eval` CLI's own): first-frame SSIM, MSE and PSNR
against the conditioning image, motion (mean optical flow in px per frame), and, given a CLIP
(`config.validation.clip`), CLIP image-video, adjacent-frame and text-video similarity.

Every process samples (the weights stay sharded as in training) and scores (the same frames give the same numbers on
each); only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from atomo_jax.configuration import ConfigError
from atomo_jax.eval import evaluate, flow
from atomo_jax.eval.clip_score import CLIPScorer, load_clip
from atomo_jax.models.tokenizer import CaptionTokenizer
from atomo_jax.pipelines import i2v, video_io
from atomo_jax.training import metrics as metrics_lib

# Scores shown in the log line and written to TensorBoard, with their log format (those a run lacks are left out).
_SHOWN = {"ssim_first": "SSIM first {:.3f}", "psnr_first": "PSNR first {:.1f} dB", "motion": "motion {:.2f} px/frame",
          "clip_image_video": "CLIP image-video {:.3f}", "clip_text_video": "CLIP text-video {:.3f}"}


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    """The conditioning images of a run, loaded once at its start."""

    paths: tuple[str, ...]
    names: tuple[str, ...]  # file stems: the names of the written files and TensorBoard tags
    prompts: tuple[str, ...]
    images: np.ndarray  # (N, H, W, 3) float32 in [-1, 1], resized to cover (height, width) and centre-cropped
    tokens: np.ndarray | None  # (N, L) prompt tokens, or None when the model has no text encoder
    num_frames: int
    clip: CLIPScorer | None


def image_paths(spec: str) -> list[str]:
    """`config.validation.images`: a folder (its image files, sorted by name) or image paths separated by commas."""
    if os.path.isdir(spec):
        found = sorted(str(p) for p in Path(spec).iterdir() if p.suffix.lower() in evaluate.IMAGE_SUFFIXES)
        if not found:
            raise ConfigError(f"config.validation.images={spec!r}: the folder holds no image file "
                              f"({', '.join(evaluate.IMAGE_SUFFIXES)})")
        return found
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise ConfigError(f"config.validation.images={spec!r}: expected a folder of images or image files separated "
                          f"by commas; not found: {', '.join(missing) or '(empty)'}")
    return paths


def sample_size(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(frames, height, width) of the validation videos: the keys that are set, else config.sample.num_frames and
    the first bucket's size (else config.data.resolution)."""
    v = config.validation
    bucket = tuple(config.data.buckets[0]) if config.data.buckets else None
    height = int(v.height) or (int(bucket[1]) if bucket else int(config.data.resolution))
    width = int(v.width) or (int(bucket[2]) if bucket else int(config.data.resolution))
    return int(v.num_frames) or int(config.sample.num_frames), height, width


def load_validation_set(config: ml_collections.ConfigDict, tokenize: CaptionTokenizer | None) -> ValidationSet | None:
    """The images, prompts and CLIP of `config.validation`; None when no images are configured. Raises ConfigError
    naming the key and the file for anything unreadable, before training starts."""
    v = config.validation
    if not v.images:
        return None
    paths = image_paths(str(v.images))
    names = [Path(p).stem for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"config.validation.images: several images are named {', '.join(twice)}; the outputs are "
                          "named after the file stem, so each must be unique")
    frames, height, width = sample_size(config)
    try:
        table = evaluate.read_prompts(str(v.prompts)) if v.prompts else None
        prompts = [evaluate.prompt_for(p, table, str(v.prompts)) if table is not None else "" for p in paths]
        images = np.concatenate([video_io.load_image(p, height, width) for p in paths])
        clip = load_clip(str(v.clip), with_text=any(prompts)) if v.clip else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.validation: {e}") from None
    tokens = np.stack([np.asarray(tokenize(p)) for p in prompts]) if tokenize is not None else None
    return ValidationSet(tuple(paths), tuple(names), tuple(prompts), images, tokens, frames, clip)


def write_animation(base: str, image: np.ndarray, frames: np.ndarray, fps: float,
                    writer: metrics_lib.MetricWriter | None, step: int, tag: str) -> dict[str, str]:
    """`base.mp4`, `base.gif` and a PNG strip `base.png` (the uint8 conditioning image (H, W, 3), then the frames);
    the GIF, as written, as the TensorBoard image `tag` (TensorBoard plays it)."""
    os.makedirs(os.path.dirname(base), exist_ok=True)
    paths = {ext: video_io.write_video(f"{base}.{ext}", frames, fps=fps) for ext in ("mp4", "gif")}
    paths["png"] = video_io.write_png_strip(f"{base}.png", np.concatenate([image[None], frames]))
    if writer is not None:
        with open(paths["gif"], "rb") as f:
            writer.image(step, tag, f.read(), frames.shape[1], frames.shape[2])
    return paths


def generate(model: Any, params: dict, config: ml_collections.ConfigDict, vset: ValidationSet,
             empty_tokens: jax.Array | None) -> np.ndarray:
    """uint8 videos (N, F, H, W, 3), sampled `config.validation.batch_size` images at a time (the last batch padded
    with copies of its last image, so one compiled sampler serves every batch). Batch i's noise is
    `fold_in(key(config.validation.seed), i)`: the same at every step of the run."""
    sampler, guidance = i2v.configs_from(config)
    size = int(config.validation.batch_size)
    key = jax.random.key(int(config.validation.seed))
    out = []
    for i, start in enumerate(range(0, len(vset.images), size)):
        index = np.minimum(np.arange(start, start + size), len(vset.images) - 1)
        tokens = None if vset.tokens is None else jnp.asarray(vset.tokens[index])
        video = i2v.image_to_video(model, params, jnp.asarray(vset.images[index]), jax.random.fold_in(key, i),
                                   num_frames=vset.num_frames, sampler=sampler, guidance=guidance,
                                   prompt_tokens=tokens, empty_tokens=empty_tokens, progress=False).video
        out.append(video_io.to_uint8(video)[:min(size, len(vset.images) - start)])
    return np.concatenate(out)


def run_validation(model: Any, params: dict, config: ml_collections.ConfigDict, vset: ValidationSet, workdir: str,
                   step: int, writer: metrics_lib.MetricWriter | None, empty_tokens: jax.Array | None,
                   write: bool) -> dict[str, Any]:
    """Samples and scores every validation image at `step`; writes the files (see the module docstring) where
    `write`. Returns the report written to `WORKDIR/validation/STEP.json`."""
    videos = generate(model, params, config, vset, empty_tokens)
    conds = video_io.to_uint8(vset.images)
    backend = flow.LucasKanade()
    rows = []
    for name, path, prompt, cond, frames in zip(vset.names, vset.paths, vset.prompts, conds, videos):
        rows.append({"name": name, "image": path, "prompt": prompt,
                     **evaluate.score_video(frames, cond, clip=vset.clip, prompt=prompt or None,
                                            flow_backend=backend)})
    mean = {k: v for k, v in evaluate.means(rows).items() if v is not None}
    report = {"step": step, "frames": int(videos.shape[1]), "height": int(videos.shape[2]),
              "width": int(videos.shape[3]), "seed": int(config.validation.seed),
              "motion_flow": backend.name, "mean": mean, "images": rows}
    if not write:
        return report
    out_dir = os.path.join(workdir, "validation")
    for row, cond, frames in zip(rows, conds, videos):
        row["files"] = write_animation(os.path.join(out_dir, f"{step:07d}", row["name"]), cond, frames,
                                       float(config.sample.fps), writer, step, f"validation/{row['name']}")
    if writer is not None:
        writer.scalars(step, {f"validation/{k}": mean[k] for k in _SHOWN if k in mean})
    path = os.path.join(out_dir, f"{step:07d}.json")
    with open(path + ".tmp", "w") as f:  # whole or absent: a kill mid-write leaves no half report
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    shown = ", ".join(_SHOWN[k].format(mean[k]) for k in _SHOWN if k in mean)
    print(f"[train] validation at step {step} ({len(rows)} images, {videos.shape[1]}x{videos.shape[2]}x"
          f"{videos.shape[3]}): {shown}: {path}", flush=True)
    return report
