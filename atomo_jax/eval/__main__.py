"""Score generated videos with AIGCBench-style metrics; writes OUT.json and OUT.md (a markdown table).

  python -m atomo_jax.eval --videos=samples/ --images=inputs/ --out=eval/metrics
  python -m atomo_jax.eval --videos=samples/ --images=inputs/ --prompts=prompts.csv \
      --clip=/weights/clip-vit-large-patch14 --out=eval/metrics
  python -m atomo_jax.eval --videos=out/cat.mp4 --references=webvid/cat.mp4 --prompt="a cat" --clip=...

Videos: a .mp4/.gif file or a folder of them. Input images: one image file or a folder with `<video stem>.png`
(or .jpg/.jpeg/.webp/.bmp); or --references: reference videos whose frame 0 is the input image. An image whose size
differs from the video's is resized to it (reported in the log, the JSON and the table). Prompts: --prompts
(CSV with `video,prompt` columns or JSONL {"video": ..., "prompt": ...}) or --prompt for all. CLIP metrics need
transformers CLIP weights, converted on load (--clip: a CLIPModel folder such as openai/clip-vit-large-patch14, the
model AIGCBench uses; or --clip_vision/--clip_text); without them only SSIM, MSE and motion are computed.
Motion: --flow=lk (default; ours, no weights) or --flow=raft --flow_weights=raft_small.pth (torchvision's RAFT, the
flow network AIGCBench's motion numbers come from; frames >= 128 px with sides divisible by 8).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from atomo_jax.eval import metrics
from atomo_jax.eval import evaluate
from atomo_jax.eval.clip_score import load_clip
from atomo_jax.eval.raft import RaftFlow


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atomo_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="A .mp4/.gif file or a folder of them.")
    p.add_argument("--images", help="Input image file, or folder of <video stem>.<png|jpg|...> images.")
    p.add_argument("--references", help="Reference video (or folder, matched by stem) whose frame 0 is the image.")
    p.add_argument("--prompts", help="CSV (video,prompt columns) or JSONL mapping videos to prompts.")
    p.add_argument("--prompt", help="One prompt for every video.")
    p.add_argument("--clip", help="transformers CLIPModel folder (vision + text + projections).")
    p.add_argument("--clip_vision", help="CLIPVisionModelWithProjection folder (overrides --clip's vision part).")
    p.add_argument("--clip_text", help="CLIPTextModelWithProjection folder (overrides --clip's text part).")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder (default: the CLIP text folder).")
    p.add_argument("--ssim_window", choices=metrics.SSIM_WINDOWS, default="gaussian",
                   help="gaussian: Wang et al. 11x11, sigma 1.5; uniform: 7x7 box as AIGCBench's eval.py.")
    p.add_argument("--flow", choices=("lk", "raft"), default="lk",
                   help="Motion backend: lk (our Lucas-Kanade in JAX, no weights) or raft (torchvision RAFT, as "
                        "AIGCBench; needs --flow_weights and torchvision).")
    p.add_argument("--flow_weights", help="torchvision raft_small / raft_large state dict (.pth or .safetensors).")
    p.add_argument("--raft_updates", type=int, default=12, help="RAFT flow updates per pair (torchvision's default).")
    p.add_argument("--max_frames", type=int, default=0, help="Score only the first N frames (0: all).")
    p.add_argument("--batch_size", type=int, default=16, help="Frames per CLIP call.")
    p.add_argument("--out", default="eval/metrics", help="Output path prefix: writes OUT.json and OUT.md.")
    p.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[str, str]:
    inputs = evaluate.collect_inputs(args.videos, images=args.images, references=args.references,
                                     prompts=args.prompts, prompt=args.prompt)
    wants_text = any(item.prompt for item in inputs)
    clip = None
    if args.clip or args.clip_vision:
        clip = load_clip(args.clip, vision=args.clip_vision, text=args.clip_text, tokenizer=args.tokenizer,
                         with_text=wants_text, batch_size=args.batch_size)
    else:
        if args.clip_text:
            raise ValueError("--clip_text needs CLIP vision weights too (--clip or --clip_vision)")
        logging.warning("no CLIP weights (--clip / --clip_vision): CLIP similarities are not computed")
    flow_backend = None
    if args.flow == "raft":
        if not args.flow_weights:
            raise ValueError("--flow=raft needs --flow_weights=PATH (torchvision raft_small / raft_large weights; "
                             "nothing is downloaded)")
        flow_backend = RaftFlow(args.flow_weights, num_flow_updates=args.raft_updates)
    elif args.flow_weights:
        raise ValueError("--flow_weights is for --flow=raft")
    results = evaluate.evaluate(inputs, clip=clip, ssim_window=args.ssim_window, max_frames=args.max_frames or None,
                                progress=not args.no_progress, flow_backend=flow_backend)
    paths = evaluate.write_reports(results, args.out)
    print(evaluate.markdown_table(results))
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:  # bad input: say what is wrong, without a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
