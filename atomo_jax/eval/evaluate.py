"""AIGCBench-style evaluation of generated videos: inputs, per-video metrics, JSON and markdown reports.

Per video (uint8 frames, (F, H, W, 3)):
- `ssim_first`, `mse_first`, `psnr_first`: first frame vs the input image (0..255 scale; see `metrics`).
- `clip_image_video`: mean over frames of cos(CLIP(image), CLIP(frame)).
- `clip_adjacent`: mean over adjacent pairs of cos(CLIP(frame i), CLIP(frame i+1)) (AIGCBench's "GenVideo Clip").
- `clip_text_video`: mean over frames of cos(CLIP text(prompt), CLIP(frame)).
- `motion`: mean dense-flow magnitude in pixels between adjacent frames, from the backend named in `motion_flow`
  (`flow.LucasKanade`, the default, or RAFT from `raft.RaftFlow`).
Metrics whose inputs are missing (no image, no CLIP weights, no prompt, a single frame) are None.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from atomo_jax.eval import flow, metrics
from atomo_jax.pipelines import video_io

VIDEO_SUFFIXES = (".mp4", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METRICS = ("ssim_first", "mse_first", "psnr_first", "clip_image_video", "clip_adjacent", "clip_text_video",
           "motion")
# (column title, number format) of the markdown table; arrows say which way is better.
_COLUMNS = {"ssim_first": ("SSIM first ↑", ".4f"), "mse_first": ("MSE first ↓", ".2f"),
            "psnr_first": ("PSNR first dB ↑", ".2f"),
            "clip_image_video": ("CLIP image-video ↑", ".4f"), "clip_adjacent": ("CLIP adjacent frames ↑", ".4f"),
            "clip_text_video": ("CLIP text-video ↑", ".4f"), "motion": ("motion px/frame", ".3f")}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VideoInput:
    """One video to score and what it is compared with: an image file, or frame 0 of a reference video."""

    video: str
    image: str | None = None
    reference: str | None = None
    prompt: str | None = None


def list_videos(path: str) -> list[str]:
    """A video file, or the .mp4/.gif files of a folder (sorted; where `x.mp4` and `x.gif` both exist, as written
    by `atomo_jax.sample`, only the MP4 is kept)."""
    if os.path.isfile(path):
        if not path.lower().endswith(VIDEO_SUFFIXES):
            raise ValueError(f"{path}: not a video file; expected one of {VIDEO_SUFFIXES}")
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"videos: no such file or folder: {path}")
    found = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    mp4_stems = {p.stem for p in found if p.suffix.lower() == ".mp4"}
    found = [p for p in found if p.suffix.lower() == ".mp4" or p.stem not in mp4_stems]
    if not found:
        raise FileNotFoundError(f"videos: folder {path} holds no {' or '.join(VIDEO_SUFFIXES)} files")
    return [str(p) for p in found]


def _match(video: str, source: str, suffixes: Sequence[str], what: str) -> str:
    """The file for `video` from `source`: the file itself (shared by every video), or `<source>/<video
    stem><suffix>`."""
    if os.path.isfile(source):
        return source
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{what}: no such file or folder: {source}")
    stem = Path(video).stem
    for suffix in suffixes:
        for candidate in (stem + suffix, stem + suffix.upper()):
            if os.path.isfile(os.path.join(source, candidate)):
                return os.path.join(source, candidate)
    expected = ", ".join(stem + s for s in suffixes)
    raise FileNotFoundError(f"no {what} for video {video} in {source}: expected one of {expected}")


def read_prompts(path: str) -> dict[str, str]:
    """A CSV (header with a `video` column and a `prompt` column) or JSONL ({"video": ..., "prompt": ...} per line)
    -> {video file name or stem: prompt}. `image`/`path`/`file`/`name` are accepted for `video` (the trainer's
    validation images are named the same way), `caption`/`text` for `prompt`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    video_keys, prompt_keys = ("video", "image", "path", "file", "name"), ("prompt", "caption", "text")
    if path.lower().endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i}: not a JSON object per line ({e})") from None
    elif path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"prompts file {path}: expected a .csv or .jsonl file")
    out = {}
    for i, row in enumerate(rows, 1):
        video = next((row[k] for k in video_keys if isinstance(row, dict) and row.get(k)), None)
        prompt = next((row[k] for k in prompt_keys if isinstance(row, dict) and row.get(k) is not None), None)
        if video is None or prompt is None:
            raise ValueError(f"{path}: row {i} needs a video column (one of {video_keys}) and a prompt column "
                             f"(one of {prompt_keys}); got {row!r}")
        out[os.path.basename(str(video))] = str(prompt)
    return out


def prompt_for(path: str, prompts: Mapping[str, str], source: str) -> str:
    """The prompt of a video or image file from `read_prompts`' table, by file name, then by name without suffix."""
    name = os.path.basename(path)
    if name in prompts:
        return prompts[name]
    by_stem = {Path(k).stem: v for k, v in prompts.items()}
    if Path(name).stem in by_stem:
        return by_stem[Path(name).stem]
    raise ValueError(f"no prompt for {name} in {source} (looked up by file name, then by name without suffix)")


def collect_inputs(videos: str, *, images: str | None = None, references: str | None = None,
                   prompts: str | None = None, prompt: str | None = None) -> list[VideoInput]:
    """Pairs every video with its input image or reference video (whose frame 0 is the image) and its prompt.

    `images` / `references`: one file for every video, or a folder holding `<video stem>.<png|jpg|...>` /
    `<video stem>.<mp4|gif>`. `prompts`: a CSV/JSONL file (`read_prompts`); `prompt`: one prompt for every video.
    """
    if images and references:
        raise ValueError("pass either input images or reference videos, not both")
    if prompts and prompt:
        raise ValueError("pass either a prompts file or one prompt, not both")
    paths = list_videos(videos)
    table = read_prompts(prompts) if prompts else None
    out = []
    for video in paths:
        out.append(VideoInput(
            video=video,
            image=_match(video, images, IMAGE_SUFFIXES, "input image") if images else None,
            reference=_match(video, references, VIDEO_SUFFIXES, "reference video") if references else None,
            prompt=prompt_for(video, table, prompts) if table is not None else prompt or None))
    return out


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 (H, W, 3), as `python -m atomo_jax.sample` reads its conditioning image."""
    return video_io.read_rgb(path)


def fit_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes a uint8 image to (height, width) (bicubic, aspect ratio not kept), as AIGCBench matches sizes."""

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _mean_or_none(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def score_video(frames: np.ndarray, image: np.ndarray | None = None, *, clip: Any = None, prompt: str | None = None,
                ssim_window: str = "gaussian", flow_backend: Any = None) -> dict[str, float | None]:
    """All metrics of one uint8 video (F, H, W, 3) against a uint8 image of the same size (or None); the motion
    score from `flow_backend` (default `flow.LucasKanade()`)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    result: dict[str, float | None] = dict.fromkeys(METRICS)
    if image is not None:
        if image.shape != frames.shape[1:]:
            raise ValueError(f"input image is {image.shape}, video frames are {frames.shape[1:]}; resize it first "
                             "(fit_image)")
        result["ssim_first"] = metrics.ssim(frames[0], image, window=ssim_window)
        result["mse_first"] = metrics.mse(frames[0], image)
        result["psnr_first"] = metrics.psnr(frames[0], image)
    if clip is not None:
        embeds = clip.image_embeds(frames if image is None else np.concatenate([image[None], frames]))
        image_embed, frame_embeds = (None, embeds) if image is None else (embeds[:1], embeds[1:])
        if image_embed is not None:
            result["clip_image_video"] = _mean_or_none(metrics.cosine(image_embed, frame_embeds))
        result["clip_adjacent"] = _mean_or_none(metrics.cosine(frame_embeds[:-1], frame_embeds[1:]))
        if prompt is not None and clip.has_text:
            result["clip_text_video"] = _mean_or_none(metrics.cosine(clip.text_embeds([prompt]), frame_embeds))
    if len(frames) > 1:
        result["motion"] = flow.motion_score(frames, flow_backend)
    return result


def evaluate(inputs: Iterable[VideoInput], *, clip: Any = None, ssim_window: str = "gaussian",
             max_frames: int | None = None, progress: bool = True, flow_backend: Any = None) -> dict[str, Any]:
    """Scores every input -> {"videos": [per-video dicts], "mean": {metric: mean over videos that have it},
    "settings": {...}}. Each row names the motion backend (`motion_flow`) beside its motion number."""
    flow_backend = flow_backend or flow.LucasKanade()

    inputs = list(inputs)
    rows = []
    for item in tqdm(inputs, desc="videos", unit="video", disable=not progress):
        frames = video_io.read_video(item.video)
        if max_frames:
            frames = frames[:max_frames]
        if len(frames) < 2:
            log.warning("%s has a single frame: no motion or adjacent-frame similarity (a GIF of a still video may "
                        "have been written with its identical frames merged)", item.video)
        row: dict[str, Any] = {"video": item.video, "frames": int(frames.shape[0]),
                               "height": int(frames.shape[1]), "width": int(frames.shape[2])}
        image = None
        if item.image:
            image, row["image"] = read_image(item.image), item.image
        elif item.reference:
            image, row["image"] = video_io.read_video(item.reference)[0], f"frame 0 of {item.reference}"
        if image is not None and image.shape != frames.shape[1:]:
            row["image_resized_from"] = [int(image.shape[0]), int(image.shape[1])]
            log.warning("%s: image %s is %dx%d, video is %dx%d: resized the image to the video size (bicubic)",
                        item.video, row["image"], image.shape[1], image.shape[0], frames.shape[2], frames.shape[1])
            image = fit_image(image, frames.shape[1], frames.shape[2])
        if item.prompt is not None:
            row["prompt"] = item.prompt
        row.update(score_video(frames, image, clip=clip, prompt=item.prompt, ssim_window=ssim_window,
                               flow_backend=flow_backend))
        row["motion_flow"] = flow_backend.name
        rows.append(row)
    mean = means(rows)
    settings = {"ssim_window": ssim_window, "max_frames": max_frames,
                "flow": flow_backend.description, "motion_flow": flow_backend.name,
                "mse_scale": "0..255"}
    return {"videos": rows, "mean": mean, "settings": settings}


def means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Each metric's mean over the rows that have it (None where none has)."""
    out = {}
    for key in METRICS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def markdown_table(results: Mapping[str, Any]) -> str:
    """Per-video rows and a mean row; metrics nobody has are left out, missing values are '-'."""
    keys = [k for k in METRICS if results["mean"][k] is not None]

    def cell(value: float | None, key: str) -> str:
        return "-" if value is None else format(value, _COLUMNS[key][1])

    s = results["settings"]
    title = lambda key: _COLUMNS[key][0] + (f" ({s['motion_flow']})" if key == "motion" else "")
    lines = ["| video | frames | " + " | ".join(title(k) for k in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for row in results["videos"]:
        lines.append(f"| {os.path.basename(row['video'])} | {row['frames']} | "
                     + " | ".join(cell(row[k], k) for k in keys) + " |")
    lines.append(f"| **mean ({len(results['videos'])} videos)** | | "
                 + " | ".join(cell(results["mean"][k], k) for k in keys) + " |")
    comparable = ("comparable with RAFT-based scores at the same frame size" if s["motion_flow"].startswith("raft")
                  else "not directly comparable to RAFT-based scores")
    lines += ["", f"SSIM: {s['ssim_window']} window; MSE on the {s['mse_scale']} scale. Motion: mean optical-flow "
              f"magnitude between adjacent frames from {s['flow']}: {comparable}."]
    resized = [os.path.basename(r["video"]) for r in results["videos"] if "image_resized_from" in r]
    if resized:
        lines.append(f"Input image resized to the video size for: {', '.join(resized)}.")
    return "\n".join(lines) + "\n"


def write_reports(results: Mapping[str, Any], out: str) -> tuple[str, str]:
    """Writes `<out>.json` and `<out>.md` (a `.json`/`.md` suffix on `out` is dropped first)."""
    base = os.path.splitext(out)[0] if out.lower().endswith((".json", ".md")) else out
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    json_path, md_path = base + ".json", base + ".md"
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown_table(results))
    return json_path, md_path
