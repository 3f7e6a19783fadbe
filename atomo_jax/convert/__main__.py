"""Import pretrained PyTorch weights.

  python -m atomo_jax.convert compose --sd SD15 --motion mm_sd_v15_v2.ckpt --ip_adapter ip-adapter_sd15.bin
      --image_encoder IP-Adapter/models/image_encoder --out /ckpt/init [--config configs/base.py --config.a.b=v]
  python -m atomo_jax.convert motion mm_sd_v15_v2.ckpt --out motion.safetensors
  python -m atomo_jax.convert {unet,vae,clip-text,clip-vision,ip-adapter} PATH --out FILE.{safetensors,msgpack}

`compose` writes one orbax checkpoint of the params dict {"unet","vae","image_encoder","text_encoder"} (and the
config it was built for, `atomo_config.json`) for `python -m atomo_jax.train --config.init.checkpoint=DIR`; the
single-part commands write our params of one part. Sizes, heads and norms come from the inputs themselves (a
folder's config.json, a single file's shapes); `--config` and `--config.a.b=value` overrides (as in training) set
the rest, and a setting the inputs contradict is an error naming both values and the file.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import flax
import jax
import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from atomo_jax.configuration import adopt_architecture, load_config, parse_cli
from atomo_jax.convert import architecture, clip, compose, ip_adapter, motion, torch_io, unet, vae
from atomo_jax.convert import lora as lora_files
from atomo_jax.models.atomo import build_model

OUT_FORMATS = (".safetensors", ".msgpack")


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar of named steps; closed (its line ended) before any error is printed."""

    with tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        def step(name: str) -> None:
            bar.set_description(name)
            bar.update(1)

        yield step


def write_part(params: Any, out: str | Path) -> Path:
    """One part's params -> `.safetensors` ("/"-joined Flax paths as keys) or `.msgpack` (flax serialization)."""

    out = Path(out)
    if out.suffix not in OUT_FORMATS:
        raise ValueError(f"--out {out}: unknown output format {out.suffix!r}; supported: {', '.join(OUT_FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    params = flax.core.unfreeze(params)
    if out.suffix == ".safetensors":
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(out))
    else:
        out.write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
    return out


def _count(params: Any) -> str:
    leaves = jax.tree.leaves(params)
    return f"{len(leaves)} tensors, {sum(int(np.prod(np.shape(x))) for x in leaves):,} parameters"


def _part(args: argparse.Namespace) -> tuple[Any, str]:
    """The single-part commands: (params, description). The part's architecture comes from its file (config.json
    or shapes) laid over `--config` (see `configuration.adopt_architecture`)."""

    config = args.config_value
    path = Path(args.path)
    file_key = lambda key: key  # noqa: E731
    if args.command in ("motion", "ip-adapter"):
        sources = (compose.read_sources(motion=args.path) if args.command == "motion"
                   else compose.read_sources(ip_adapter=args.path))
        found = compose.architecture_of(sources)
    elif args.command == "unet":
        if path.is_dir() and (path / "unet").is_dir():
            path = path / "unet"
        if path.is_dir():
            state = torch_io.load_state_dict(path)
        else:
            sd = compose.read_sd(path)
            state, file_key = sd.unet, sd.file_key
        found = architecture.describe("unet", path, state)
    else:
        section = {"vae": "vae", "clip-text": "text_encoder", "clip-vision": "image_encoder"}[args.command]
        state = torch_io.load_state_dict(path)
        if section == "vae" and vae.is_ldm_vae(state):
            state = vae.ldm_vae_to_diffusers(state)
        if section == "text_encoder" and any(k.startswith(clip.LDM_TEXT_PREFIXES) for k in state):
            state = clip.ldm_text_encoder_to_transformers(state)
        found = architecture.describe(section, path, state)
    for note in adopt_architecture(config, found, args.explicit):
        print(f"note: {note}")
    model = build_model(config.model)
    if args.command == "motion":
        return motion.motion_modules_params(sources.motion[1], model.unet_config, source=args.path), "motion modules"
    if args.command == "ip-adapter":
        return ip_adapter.ip_adapter_params(sources.ip_adapter[1], model.unet_config, source=args.path), "IP-Adapter"
    if args.command == "unet":
        params, report = unet.load_unet_state_dict(state, model.unet_config, source=str(args.path), file_key=file_key)
        print(report.summary())
        return params, "UNet"
    if args.command == "vae":
        return vae.vae_params_from_torch(state, model.vae.config, source=str(path))["params"], "VAE"
    if args.command == "clip-text":
        return clip.text_params_from_torch(state, model.text_encoder.config, source=str(path))["params"], \
            "CLIP text encoder"
    return clip.vision_params_from_torch(state, model.image_encoder.config, source=str(path))["params"], \
        "CLIP vision encoder"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atomo_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compose", help="assemble an initial training checkpoint (orbax) from pretrained parts")
    c.add_argument("--sd", help="SD 1.5: diffusers folder (unet/ vae/ text_encoder/) or original .safetensors/.ckpt")
    c.add_argument("--motion", help="AnimateDiff motion modules: MotionAdapter folder or mm_sd_v15_v2-style file")
    c.add_argument("--ip_adapter", help="IP-Adapter SD 1.5 weights (.bin or .safetensors, original or diffusers)")
    c.add_argument("--image_encoder", help="transformers CLIPVisionModelWithProjection folder")
    c.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                   help="a LoRA file (PEFT/diffusers or kohya naming, e.g. an SD 1.5 community LoRA) merged into the "
                        "composed UNet, times STRENGTH (default 1): a personalised base to train from; repeatable")
    c.add_argument("--out", required=True, help="output directory (orbax checkpoint of the params dict)")
    c.add_argument("--config", help="config file whose config.model is built (default configs/base.py)")
    c.add_argument("--seed", type=int, default=0, help="seed of the newly initialised layers")
    c.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    helps = {"unet": "SD UNet (diffusers folder, SD folder or original single file) -> our UNet params",
             "vae": "AutoencoderKL (diffusers folder or original single file)",
             "clip-text": "CLIPTextModel (transformers folder or original SD single file)",
             "clip-vision": "CLIPVisionModelWithProjection (transformers folder)",
             "motion": "AnimateDiff motion modules (MotionAdapter folder or original checkpoint)",
             "ip-adapter": "IP-Adapter SD 1.5 weights (original or diffusers layout)"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("path", help="input weights (file or folder)")
        p.add_argument("--out", required=True, help=f"output file, one of {', '.join(OUT_FORMATS)}")
        p.add_argument("--config", help="config file laid under the file's own architecture (default "
                                        "configs/base.py); --config.a.b=value overrides follow it")

    args, config = parse_cli(parser, argv)
    try:
        args.config_value = config or load_config()
        return _run(parser, args)
    except (ValueError, OSError) as e:  # bad input: the message names the file/key; no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "compose":
        if not any((args.sd, args.motion, args.ip_adapter, args.image_encoder)):
            parser.error("compose: give at least one of --sd, --motion, --ip_adapter, --image_encoder")
        out = Path(args.out)
        if out.exists() and not args.force:
            parser.error(f"--out {out} exists; choose a new directory or pass --force")
        with _progress(8) as progress:
            progress("reading the inputs")
            sources = compose.read_sources(sd=args.sd, motion=args.motion, ip_adapter=args.ip_adapter,
                                           image_encoder=args.image_encoder)
            progress("architecture")
            config, notes = compose.configure(args.config_value, sources, args.explicit)
            params, reports = compose.compose(config, sources, seed=args.seed, progress=progress)
            params["unet"] = lora_files.merge_specs(params["unet"], args.lora, print)
            progress("writing checkpoint")
            path = compose.save_params(params, out, config, force=args.force)
        for report in reports:
            print(report.summary())
        for note in notes:
            print(f"note: {note}")
        for part in compose.PARTS:
            print(f"{part}: {_count(params[part])}")
        print(f"wrote {path}  (train with --config.init.checkpoint={path})")
        return 0

    if Path(args.out).suffix not in OUT_FORMATS:
        parser.error(f"--out {args.out}: unknown output format; supported: {', '.join(OUT_FORMATS)}")
    params, what = _part(args)
    path = write_part(params, args.out)
    print(f"{what}: {_count(params)} -> {path}")
    return 0


def run() -> None:
    """The `atomo-convert` console script and `python -m atomo_jax.convert`."""
    sys.exit(main())


if __name__ == "__main__":
    run()
