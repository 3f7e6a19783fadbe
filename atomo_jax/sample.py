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

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from atomo_jax.configuration import absl_flags_parser

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint is used).")
flags.DEFINE_string("checkpoint", None, "A checkpoint step directory (or a workdir / its checkpoints/ folder).")
flags.DEFINE_string("config", None, "Optional config file to use instead of the config saved with the checkpoint.")
flags.DEFINE_bool("ema", True, "Use the EMA weights.")
flags.DEFINE_enum("mode", "i2v", ["i2v", "t2v", "long"], "What to sample.")
flags.DEFINE_string("image", None, "Conditioning image (i2v, long).")
flags.DEFINE_string("image_background", "white", "Colour transparent pixels of --image are composited on "
                    "(a name or #rrggbb).")
flags.DEFINE_string("prompt", "", "Text prompt (optional for i2v/long, the subject of t2v).")
flags.DEFINE_string("tokenizer", None, "CLIP tokenizer folder (vocab.json + merges.txt); default: "
                    "config.model.text_encoder.tokenizer. Only for models with a text encoder.")
flags.DEFINE_integer("num_frames", None, "Frames per video (per window for --mode=long); default config.sample.")
flags.DEFINE_integer("resolution", None, "Square output size in pixels; default config.data.resolution.")
flags.DEFINE_integer("steps", None, "Denoising steps; default config.sample.num_steps.")
flags.DEFINE_enum("sampler", None, ["ddim", "dpmpp2m"], "Sampler; default config.sample.sampler.")
flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
flags.DEFINE_float("image_scale", None, "Image guidance scale; default config.sample.image_scale.")
flags.DEFINE_float("text_scale", None, "Text guidance scale; default config.sample.text_scale.")
flags.DEFINE_float("rescale", None, "Guidance rescale phi in [0, 1]; default config.sample.rescale.")
flags.DEFINE_float("t2i_scale", 7.5, "Guidance scale of the SD 1.5 text-to-image first frame (t2v).")
flags.DEFINE_integer("seed", 0, "Random seed: same seed, same video.")
flags.DEFINE_string("out", "samples/video.mp4", "Output .mp4 path; a .gif is written next to it.")
flags.DEFINE_float("fps", None, "Frames per second; default config.sample.fps.")
flags.DEFINE_integer("windows", 2, "Windows of a long video (--mode=long).")
flags.DEFINE_integer("given_frames", None, "Frames carried into the next window (--mode=long); default "
                     "config.data.num_given_frames.")
flags.DEFINE_integer("frames_per_chunk", 8, "Frames per VAE decode call (bounds memory).")
flags.DEFINE_string("base", None, "A personalised SD 1.5 fine-tune (diffusers folder with unet/, a UNet folder or "
                    "a .safetensors file) whose spatial weights replace ours.")




def _tokens(model, config, prompt: str):
    """(prompt tokens or None, empty-prompt tokens or None) as the model needs them."""
    if model.text_encoder is None:
        if prompt:
            logging.warning("this model has no text encoder (config.model.text_encoder.kind='none'): "
                            "--prompt is ignored")
        return None, None
    from atomo_jax.models import tokenizer as tok  # pylint: disable=g-import-not-at-top
    folder = FLAGS.tokenizer or config.model.text_encoder.tokenizer
    if not folder:
        raise ValueError("this model has a text encoder: pass --tokenizer=DIR (a CLIP tokenizer folder with "
                         "vocab.json + merges.txt; build one offline with "
                         "atomo_jax.models.tokenizer.build_clip_tokenizer_files(DIR))")
    tokenizer = tok.load_clip_tokenizer(folder)
    length = model.text_length
    empty = jnp.asarray(tok.tokenize(tokenizer, [""], length))
    return (jnp.asarray(tok.tokenize(tokenizer, [prompt], length)) if prompt else None), empty


def _load(path: str):
    from atomo_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
    override = None
    if FLAGS.config:
        if not os.path.isfile(FLAGS.config):
            raise FileNotFoundError(f"--config {FLAGS.config}: no such file")
        spec = importlib.util.spec_from_file_location("sample_config", FLAGS.config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        override = module.get_config()
    try:
        return checkpoint.load_inference(path, use_ema=FLAGS.ema, config=override)
    except ValueError as e:
        reason = str(e) if len(str(e)) < 2000 else str(e)[:2000] + " ... (truncated)"
        raise ValueError(f"cannot load {path}: {reason}\nThe checkpoint must come from a model built with the same "
                         "config (pass --config only for a config with identical model settings).") from None


def main(argv) -> None:
    del argv
    try:
        sample()
    except (FileNotFoundError, ValueError) as e:  # bad input: say what is wrong, without a traceback
        sys.exit(f"error: {e}")


def sample() -> None:
    from atomo_jax.pipelines import i2v, long_video, personalize, t2v, video_io  # pylint: disable=g-import-not-at-top

    if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
        raise app.UsageError("pass exactly one of --workdir or --checkpoint")
    if not FLAGS.out.lower().endswith(".mp4"):
        raise app.UsageError(f"--out {FLAGS.out}: expected a path ending in .mp4 (a .gif is written next to it)")
    if FLAGS.mode in ("i2v", "long"):
        if not FLAGS.image:
            raise app.UsageError(f"--mode={FLAGS.mode} needs --image")
        if not os.path.isfile(FLAGS.image):
            raise FileNotFoundError(f"--image {FLAGS.image}: no such file")
    if FLAGS.base and not os.path.exists(FLAGS.base):
        raise FileNotFoundError(f"--base {FLAGS.base}: no such file or folder")

    config, model, params = _load(FLAGS.workdir or FLAGS.checkpoint)
    if FLAGS.base:
        base = personalize.load_base_unet(FLAGS.base, model.unet_config)
        params = {**params, "unet": personalize.swap_spatial_weights(params["unet"], base)}
        logging.info("swapped in the spatial weights of %s", FLAGS.base)
    sampler, guidance = i2v.configs_from(config, sampler=FLAGS.sampler, num_steps=FLAGS.steps, eta=FLAGS.eta,
                                         image_scale=FLAGS.image_scale, text_scale=FLAGS.text_scale,
                                         rescale=FLAGS.rescale)
    num_frames = FLAGS.num_frames or int(config.sample.num_frames)
    size = FLAGS.resolution or int(config.data.resolution)
    fps = FLAGS.fps or float(config.sample.fps)
    prompt_tokens, empty_tokens = _tokens(model, config, FLAGS.prompt)
    common = dict(sampler=sampler, guidance=guidance, prompt_tokens=prompt_tokens, empty_tokens=empty_tokens,
                  frames_per_chunk=FLAGS.frames_per_chunk)
    rng = jax.random.key(FLAGS.seed)
    logging.info("sampling %s: %s, %s", FLAGS.mode, sampler, guidance)

    if FLAGS.mode == "t2v":
        if model.text_encoder is not None and not FLAGS.prompt:
            raise app.UsageError("--mode=t2v needs --prompt")
        video, _ = t2v.text_to_video(model, params, rng, batch=1, height=size, width=size, num_frames=num_frames,
                                     image_guidance_scale=FLAGS.t2i_scale, **common)
    else:
        image = jnp.asarray(video_io.load_image(FLAGS.image, size, size, FLAGS.image_background))
        if FLAGS.mode == "i2v":
            video = i2v.image_to_video(model, params, image, rng, num_frames=num_frames, **common)
        else:
            given = FLAGS.given_frames or int(config.data.num_given_frames)
            video = long_video.long_video(model, params, image, rng, num_frames=num_frames,
                                          num_windows=FLAGS.windows, num_given=given, **common)

    frames = video_io.to_uint8(video.video[0])
    mp4 = video_io.write_video(FLAGS.out, frames, fps=fps)
    gif = video_io.write_video(os.path.splitext(FLAGS.out)[0] + ".gif", frames, fps=fps)
    print(f"wrote {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}: {mp4} and {gif}")


def run() -> None:
    """The `atomo-sample` console script and `python -m atomo_jax.sample`."""
    app.run(main, flags_parser=absl_flags_parser(__name__))


if __name__ == "__main__":
    run()
