"""Sample videos from a trained checkpoint: image-to-video, text-to-video, long video by frame prediction.

  python -m atomo_jax.sample --workdir=/tmp/atomo_demo --mode=i2v --image=cat.png --out=out/cat.mp4
  python -m atomo_jax.sample --checkpoint=/ckpt/50000 --mode=t2v --prompt="a red fox running in snow" \
      --tokenizer=/weights/sd15/tokenizer --out=out/fox.mp4
  python -m atomo_jax.sample --workdir=... --mode=long --image=cat.png --windows=3 --given_frames=8 --out=out/long.mp4
  Add --base=/weights/my_sd15_finetune to swap in the spatial weights of a personalised SD 1.5.

Writes PATH.mp4 and PATH.gif. The denoising loop (all steps and guidance branches) is one jitted computation, so
the progress bars follow the windows of a long video and the VAE decode chunks, not the individual steps. The same
--seed gives the same video.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from atomo_jax.configuration import add_log_level, cli_parser, parse_cli
from atomo_jax.convert import lora as lora_files
from atomo_jax.models import tokenizer as tok
from atomo_jax.training import checkpoint
from atomo_jax.pipelines import i2v, long_video, personalize, t2v, video_io

def build_parser() -> argparse.ArgumentParser:
    p = cli_parser("atomo-sample", __doc__)
    src = p.add_argument_group("model")
    src.add_argument("--workdir", help="a training run directory (its latest checkpoint is used)")
    src.add_argument("--checkpoint", help="one checkpoint: a step directory, a composed checkpoint, or a workdir")
    src.add_argument("--config", help="a config file (with --config.a.b=value overrides) to use instead of the "
                                      "checkpoint's own; its model settings must match the checkpoint")
    src.add_argument("--weights", choices=("ema", "raw"), default="ema",
                     help="a training checkpoint's EMA (default) or raw trained weights")
    src.add_argument("--base", help="a personalised SD 1.5 fine-tune (diffusers folder with unet/, a UNet folder or a "
                                    ".safetensors file) whose spatial weights replace ours")
    src.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                     help="a LoRA file (PEFT/diffusers or kohya naming, e.g. an SD 1.5 community LoRA, or our "
                          "export --lora=separate) merged into the UNet, times STRENGTH (default 1); repeatable, "
                          "applied after --base")
    what = p.add_argument_group("what to sample")
    what.add_argument("--mode", choices=("i2v", "t2v", "long"), default="i2v", help="what to sample (default i2v)")
    what.add_argument("--image", help="conditioning image (i2v, long)")
    what.add_argument("--image_background", default="white",
                      help="colour transparent pixels of --image are composited on (a name or #rrggbb)")
    what.add_argument("--prompt", default="", help="text prompt (optional for i2v/long, the subject of t2v)")
    what.add_argument("--tokenizer", help="CLIP tokenizer folder (vocab.json + merges.txt); default: "
                                          "config.model.text_encoder.tokenizer. Only for models with a text encoder")
    what.add_argument("--num_frames", type=int, help="frames per video (per window for --mode=long); default "
                                                     "config.sample.num_frames")
    what.add_argument("--resolution", type=int, help="square output size in pixels; default config.data.resolution")
    what.add_argument("--height", type=int, help="output height in pixels (non-square, e.g. a training bucket's); "
                                                 "default --resolution")
    what.add_argument("--width", type=int, help="output width in pixels; default --resolution")
    what.add_argument("--windows", type=int, default=2, help="windows of a long video (--mode=long)")
    what.add_argument("--given_frames", type=int, help="frames carried into the next window (--mode=long); default "
                                                       "config.data.num_given_frames")
    how = p.add_argument_group("sampler")
    how.add_argument("--steps", type=int, help="denoising steps; default config.sample.num_steps")
    how.add_argument("--sampler", choices=("ddim", "dpmpp2m"), help="default config.sample.sampler")
    how.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    how.add_argument("--image_scale", type=float, help="image guidance scale; default config.sample.image_scale")
    how.add_argument("--text_scale", type=float, help="text guidance scale; default config.sample.text_scale")
    how.add_argument("--rescale", type=float, help="guidance rescale phi in [0, 1]; default config.sample.rescale")
    how.add_argument("--t2i_scale", type=float, default=7.5,
                     help="guidance scale of the SD 1.5 text-to-image first frame (t2v)")
    how.add_argument("--seed", type=int, default=0, help="random seed: same seed, same video")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="samples/video.mp4", help="output .mp4 path; a .gif is written next to it")
    out.add_argument("--fps", type=float, help="frames per second; default config.sample.fps")
    out.add_argument("--frames_per_chunk", type=int, default=8, help="frames per VAE decode call (bounds memory)")
    add_log_level(p)
    return p


def _tokens(args: argparse.Namespace, model, config, prompt: str):
    """(prompt tokens or None, empty-prompt tokens or None) as the model needs them."""
    if model.text_encoder is None:
        if prompt:
            logging.warning("this model has no text encoder (config.model.text_encoder.kind='none'): "
                            "--prompt is ignored")
        return None, None
    folder = args.tokenizer or config.model.text_encoder.tokenizer
    if not folder:
        raise ValueError("this model has a text encoder: pass --tokenizer=DIR (a CLIP tokenizer folder with "
                         "vocab.json + merges.txt; build one offline with "
                         "atomo_jax.models.tokenizer.build_clip_tokenizer_files(DIR))")
    tokenizer = tok.load_clip_tokenizer(folder)
    length = model.text_length
    empty = jnp.asarray(tok.tokenize(tokenizer, [""], length))
    return (jnp.asarray(tok.tokenize(tokenizer, [prompt], length)) if prompt else None), empty


def _load(args: argparse.Namespace, path: str, override: ml_collections.ConfigDict | None):
    try:
        return checkpoint.load_inference(path, use_ema=args.weights == "ema", config=override)
    except ValueError as e:
        reason = str(e) if len(str(e)) < 2000 else str(e)[:2000] + " ... (truncated)"
        raise ValueError(f"cannot load {path}: {reason}\nThe checkpoint must come from a model built with the same "
                         "config (pass --config only for a config with identical model settings).") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, override = parse_cli(parser, argv)
    if bool(args.workdir) == bool(args.checkpoint):
        parser.error("pass exactly one of --workdir or --checkpoint")
    if not args.out.lower().endswith(".mp4"):
        parser.error(f"--out {args.out}: expected a path ending in .mp4 (a .gif is written next to it)")
    if args.mode in ("i2v", "long") and not args.image:
        parser.error(f"--mode={args.mode} needs --image")
    try:
        sample(args, override)
    except (FileNotFoundError, ValueError) as e:  # bad input: say what is wrong, without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def sample(args: argparse.Namespace, override: ml_collections.ConfigDict | None) -> None:
    if args.mode in ("i2v", "long") and not os.path.isfile(args.image):
        raise FileNotFoundError(f"--image {args.image}: no such file")
    if args.base and not os.path.exists(args.base):
        raise FileNotFoundError(f"--base {args.base}: no such file or folder")

    config, model, params = _load(args, args.workdir or args.checkpoint, override)
    if args.base:
        base = personalize.load_base_unet(args.base, model.unet_config)
        params = {**params, "unet": personalize.swap_spatial_weights(params["unet"], base)}
        logging.info("swapped in the spatial weights of %s", args.base)
    params = {**params, "unet": lora_files.merge_specs(params["unet"], args.lora, print)}
    sampler, guidance = i2v.configs_from(config, sampler=args.sampler, num_steps=args.steps, eta=args.eta,
                                         image_scale=args.image_scale, text_scale=args.text_scale,
                                         rescale=args.rescale)
    num_frames = args.num_frames or int(config.sample.num_frames)
    size = args.resolution or int(config.data.resolution)
    height, width = args.height or size, args.width or size
    fps = args.fps or float(config.sample.fps)
    prompt_tokens, empty_tokens = _tokens(args, model, config, args.prompt)
    common = dict(sampler=sampler, guidance=guidance, prompt_tokens=prompt_tokens, empty_tokens=empty_tokens,
                  frames_per_chunk=args.frames_per_chunk)
    rng = jax.random.key(args.seed)
    logging.info("sampling %s: %s, %s", args.mode, sampler, guidance)

    if args.mode == "t2v":
        if model.text_encoder is not None and not args.prompt:
            raise ValueError("--mode=t2v needs --prompt")
        video, _ = t2v.text_to_video(model, params, rng, batch=1, height=height, width=width, num_frames=num_frames,
                                     image_guidance_scale=args.t2i_scale, **common)
    else:
        image = jnp.asarray(video_io.load_image(args.image, height, width, args.image_background))
        if args.mode == "i2v":
            video = i2v.image_to_video(model, params, image, rng, num_frames=num_frames, **common)
        else:
            given = args.given_frames or int(config.data.num_given_frames)
            video = long_video.long_video(model, params, image, rng, num_frames=num_frames,
                                          num_windows=args.windows, num_given=given, **common)

    frames = video_io.to_uint8(video.video[0])
    mp4 = video_io.write_video(args.out, frames, fps=fps)
    gif = video_io.write_video(os.path.splitext(args.out)[0] + ".gif", frames, fps=fps)
    print(f"wrote {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}: {mp4} and {gif}")


def run() -> None:
    """The `atomo-sample` console script and `python -m atomo_jax.sample`."""
    sys.exit(main())


if __name__ == "__main__":
    run()
