"""Assemble one initial training checkpoint from pretrained parts.

`compose(...)` reads SD 1.5 (a diffusers folder or the original single file), AnimateDiff motion modules, IP-Adapter
SD 1.5 weights and a CLIP vision folder, converts each with its converter (all or nothing), fills what no file
provides with our initialisation (temporal layers start as the identity), and returns the params dict
`{"unet", "vae", "image_encoder", "text_encoder"}` shaped exactly like `build_model(config.model).init(...)`, plus one
report per part saying what was loaded, what was newly initialised and what was ignored.

`save_params` writes it with orbax `StandardCheckpointer` as a plain params dict: the trainer restores it through
`config.init.checkpoint=DIR`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import flax
import jax
import ml_collections
import numpy as np

from atomo_jax.convert import architecture
from atomo_jax.convert import clip as clip_convert
from atomo_jax.convert import ip_adapter as ip_convert
from atomo_jax.convert import motion as motion_convert
from atomo_jax.convert import torch_io
from atomo_jax.convert import unet as unet_convert
from atomo_jax.convert import vae as vae_convert
from atomo_jax.configuration import load_config
from atomo_jax.models.atomo import PARTS, AtomoVideo, build_model
from atomo_jax.training.checkpoint import COMPOSED_CONFIG

SD_FOLDER_PARTS = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder"}


@dataclasses.dataclass
class PartReport:
    """What happened to one part: Flax paths loaded / newly initialised, source entries ignored (with why)."""

    part: str
    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    new: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"[{self.part}] from {self.source}"]
        for title, items in (("loaded", self.loaded), ("newly initialised", self.new), ("ignored", self.ignored)):
            lines.append(f"  {title}: {len(items)}" + (f"  ({summarize(items)})" if items else ""))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def summarize(keys: Iterable[str], limit: int = 8) -> str:
    """Counts by prefix (first two path components, list indices folded to '*'), most frequent first."""
    counts = Counter()
    for key in keys:
        tokens: list[str] = []
        for token in re.split(r"[/.]", key):
            if token.isdigit() and tokens:
                tokens[-1] += "_*"
            else:
                tokens.append(re.sub(r"_\d+$", "_*", token))
        counts[key if len(tokens) <= 2 else "/".join(tokens[:2])] += 1
    shown = [f"{prefix} x{n}" for prefix, n in counts.most_common(limit)]
    more = len(counts) - limit
    return ", ".join(shown) + (f", ... {more} more prefixes" if more > 0 else "")


def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


def _strip_params(variables: Mapping[str, Any]) -> dict[str, Any]:
    return flax.core.unfreeze(variables.get("params", variables))


def _same_config(part: str, ours: Any, theirs: Any, source: str, config_key: str) -> None:
    """The checkpoint's own config.json must describe the model our config builds."""
    diff = [f"{f.name}: checkpoint {getattr(theirs, f.name)!r}, ours {getattr(ours, f.name)!r}"
            for f in dataclasses.fields(ours) if getattr(theirs, f.name) != getattr(ours, f.name)]
    if diff:
        raise ValueError(f"{source}: its config does not match config.model.{config_key} ({part}): " + "; ".join(diff)
                         + f". Set config.model.{config_key}.<field> to the checkpoint's values.")


# ---------------------------------------------------------------------------------------------------------------
# Reading Stable Diffusion.

@dataclasses.dataclass
class SDWeights:
    """The diffusers/transformers-named state dicts of the SD parts, their folders (diffusers folder only) and the
    entries of the source that belong to no part."""

    source: str
    kind: str  # "diffusers folder" or "single file"
    unet: dict[str, np.ndarray]
    vae: dict[str, np.ndarray]
    text_encoder: dict[str, np.ndarray]
    folders: dict[str, Path]
    ignored: list[str]


def read_sd(path: str | Path) -> SDWeights:
    """An SD 1.5 diffusers folder (model_index.json + unet/ vae/ text_encoder/) or an original single file."""
    path = Path(path)
    if path.is_dir():
        missing = [sub for sub in SD_FOLDER_PARTS.values() if not (path / sub).is_dir()]
        if missing:
            raise FileNotFoundError(f"{path}: not a diffusers SD folder, missing sub-folders {missing} (expected "
                                    f"unet/, vae/, text_encoder/ next to model_index.json); for an original "
                                    f"checkpoint pass the .safetensors/.ckpt file itself")
        sds = {part: torch_io.load_state_dict(path / sub) for part, sub in SD_FOLDER_PARTS.items()}
        ignored = sorted(f"{p.name}/" if p.is_dir() else p.name for p in path.iterdir()
                         if p.name not in SD_FOLDER_PARTS.values())
        return SDWeights(str(path), "diffusers folder", sds["unet"], sds["vae"], sds["text_encoder"],
                         {part: path / sub for part, sub in SD_FOLDER_PARTS.items()}, ignored)
    from atomo_jax.convert import single_file

    parts = single_file.read_single_file(path)
    return SDWeights(str(path), "single file", parts["unet"], parts["vae"], parts["text_encoder"], {},
                     parts["ignored"])


# ---------------------------------------------------------------------------------------------------------------
# Parts.

def _fresh(model: AtomoVideo, config: ml_collections.ConfigDict, part: str, rng: jax.Array) -> dict[str, Any]:
    """Our initialisation of one part (jitted: XLA drops the other parts' initialisers)."""
    init = jax.jit(lambda r: flax.linen.meta.unbox(model.init(r))[part])
    return jax.tree.map(np.asarray, init(rng))


def compose_unet(model: AtomoVideo, sd: SDWeights | None, motion: str | None, ip_adapter: str | None,
                 rng: jax.Array) -> tuple[dict[str, Any], PartReport]:
    cfg = model.unet_config
    report = PartReport("unet", sd.source if sd else "no SD weights")
    extra: dict[str, np.ndarray] = {}
    motion_paths: list[str] = []
    if sd is not None and "unet" in sd.folders:
        architecture.check_unet(sd.folders["unet"], cfg)
    if motion:
        architecture.check_motion_adapter(motion, cfg)
        state = torch_io.load_state_dict(motion)
        tables = [k for k in state if k.endswith(".pe")]
        tree = motion_convert.motion_modules_params(state, cfg, source=str(motion))
        motion_paths = list(flat(tree))
        extra.update(unet_convert.unet_params_to_torch(tree))
        report.source += f" + motion modules {motion}"
        if tables:
            report.ignored += tables
            report.notes.append(f"{len(tables)} position tables (*.pe) of {motion} were checked equal to our fixed "
                                f"sinusoidal table; the model computes it, so they are not stored")
    ip_paths: list[str] = []
    if ip_adapter:
        tree = ip_convert.load_ip_adapter(ip_adapter, cfg)
        ip_paths = list(flat(tree))
        extra.update(unet_convert.unet_params_to_torch(tree))
        report.source += f" + IP-Adapter {ip_adapter}"
    state = dict(sd.unet) if sd else {}
    twice = sorted(set(state) & set(extra))
    if twice:
        raise ValueError(f"{sd.source}: its UNet already holds {len(twice)} motion-module/IP-Adapter weights also "
                         f"given by --motion/--ip_adapter (e.g. {twice[:3]}); give each weight once")
    state.update(extra)
    # without SD weights everything is new; with them only the layers SD 1.5 does not have
    new_ok = (lambda p: unet_convert.is_temporal(p) or unet_convert.is_ip_adapter(p)) if sd else (lambda p: True)
    params, unet_report = unet_convert.load_unet_state_dict(state, cfg, rng=rng, new_ok=new_ok, source=report.source)
    report.loaded, report.new = unet_report.loaded, unet_report.newly_initialised
    report.notes += unet_report.notes
    if motion_paths:
        report.notes.append(f"{len(motion_paths)} motion-module tensors from {motion}")
    if ip_paths:
        report.notes.append(f"{len(ip_paths)} IP-Adapter tensors from {ip_adapter}")
    if cfg.use_motion_modules and not motion:
        report.notes.append("no --motion: motion modules start as the identity (random attention, zero proj_out)")
    if cfg.ip_adapter and not ip_adapter:
        report.notes.append("no --ip_adapter: to_k_ip/to_v_ip/image_proj are RANDOM, so image features perturb the "
                            "SD output from step 0; pass IP-Adapter weights or expect to train them")
    return params, report


def _folder_config(sd: SDWeights, part: str) -> dict[str, Any] | None:
    file = sd.folders[part] / "config.json" if part in sd.folders else None
    return json.loads(file.read_text()) if file is not None and file.is_file() else None


def compose_vae(model: AtomoVideo, sd: SDWeights | None, config, rng) -> tuple[dict[str, Any], PartReport]:
    kind = config.model.vae.kind
    if kind == "pixel":
        return {}, PartReport("vae", "pixel-space stand-in: no weights", notes=["config.model.vae.kind='pixel'"])
    if sd is None:
        params = _fresh(model, config, "vae", rng)
        return params, PartReport("vae", "no SD weights", new=list(flat(params)),
                                  notes=["RANDOM VAE: pass --sd for the pretrained one"])
    ours = model.vae.config
    raw = _folder_config(sd, "vae")
    if raw is not None:
        _same_config("vae", ours, vae_convert.vae_config_from_diffusers(raw), str(sd.folders["vae"]), "vae")
    params = _strip_params(vae_convert.vae_params_from_torch(sd.vae, ours, source=sd.source))
    return params, PartReport("vae", sd.source, loaded=list(flat(params)))


def compose_text_encoder(model: AtomoVideo, sd: SDWeights | None, config, rng) -> tuple[dict[str, Any], PartReport]:
    if model.text_encoder is None:
        return {}, PartReport("text_encoder", "none", notes=["config.model.text_encoder.kind='none'"])
    if sd is None:
        params = _fresh(model, config, "text_encoder", rng)
        return params, PartReport("text_encoder", "no SD weights", new=list(flat(params)),
                                  notes=["RANDOM text encoder: pass --sd for the pretrained one"])
    ours = model.text_encoder.config
    raw = _folder_config(sd, "text_encoder")
    if raw is not None:
        _same_config("text_encoder", ours, clip_convert.text_config_from_transformers(raw),
                     str(sd.folders["text_encoder"]), "text_encoder")
    params = _strip_params(clip_convert.text_params_from_torch(sd.text_encoder, ours, source=sd.source))
    return params, PartReport("text_encoder", sd.source, loaded=list(flat(params)))


def compose_image_encoder(model: AtomoVideo, path: str | None, config, rng) -> tuple[dict[str, Any], PartReport]:
    if path is None:
        params = _fresh(model, config, "image_encoder", rng)
        return params, PartReport("image_encoder", "no --image_encoder", new=list(flat(params)),
                                  notes=["RANDOM image encoder: pass the IP-Adapter CLIP vision folder"])
    ours = model.image_encoder.config
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        theirs = clip_convert.vision_config_from_transformers(json.loads(config_file.read_text()))
        _same_config("image_encoder", ours, theirs, str(path), "image_encoder")
    _, params = clip_convert.load_image_encoder(path, ours)
    params = _strip_params(params)
    return params, PartReport("image_encoder", str(path), loaded=list(flat(params)))


def compose(config: ml_collections.ConfigDict, *, sd: str | None = None, motion: str | None = None,
            ip_adapter: str | None = None, image_encoder: str | None = None, seed: int = 0,
            progress: Callable[[str], None] = lambda step: None) -> tuple[dict[str, Any], list[PartReport]]:
    """-> (params {"unet", "vae", "image_encoder", "text_encoder"} as numpy float32, one report per part).

    The tree is checked against `jax.eval_shape` of `build_model(config.model).init` (every path, every shape), so
    what is saved restores into the trainer's model."""
    model = build_model(config.model)
    rngs = dict(zip(PARTS, jax.random.split(jax.random.key(seed), len(PARTS))))
    progress("reading SD weights")
    sd_weights = read_sd(sd) if sd else None
    params, reports = {}, []
    steps = (("unet", lambda: compose_unet(model, sd_weights, motion, ip_adapter, rngs["unet"])),
             ("vae", lambda: compose_vae(model, sd_weights, config, rngs["vae"])),
             ("text_encoder", lambda: compose_text_encoder(model, sd_weights, config, rngs["text_encoder"])),
             ("image_encoder", lambda: compose_image_encoder(model, image_encoder, config, rngs["image_encoder"])))
    for part, run in steps:
        progress(part)
        params[part], report = run()
        reports.append(report)
    if sd_weights is not None and sd_weights.ignored:
        reports.append(PartReport("sd (unused entries)", sd_weights.source, ignored=sd_weights.ignored))
    progress("checking against the model")
    abstract = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0)))
    for part, report in zip(PARTS, reports):
        got, expected = flat(params[part]), torch_io.flatten_shapes(abstract[part])
        unused = sorted(set(got) - set(expected))
        if unused:  # converted, but the model built from this config has no such parameters: say so, don't store
            report.ignored += unused
            report.notes.append(f"{len(unused)} converted tensors are not parameters of the model built from the "
                                f"config, so they are not stored (e.g. {unused[0]})")
            report.loaded = [p for p in report.loaded if p in expected]
        params[part] = torch_io.assign(abstract[part], {p: v for p, v in got.items() if p in expected},
                                       source=f"composed {part}")
    return params, reports


def save_params(params: Mapping[str, Any], out_dir: str | Path, config: ml_collections.ConfigDict, *,
                force: bool = False) -> Path:
    """Writes the plain params dict with orbax StandardCheckpointer (restorable via `config.init.checkpoint`) and
    `config` as COMPOSED_CONFIG, so sampling, export and latent caching can load the composed model directly."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).resolve()
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose a new directory or pass --force to overwrite it")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out, dict(params), force=force)
    checkpointer.wait_until_finished()
    (out / COMPOSED_CONFIG).write_text(config.to_json_best_effort(indent=1))
    return out


def restore_params(path: str | Path, abstract: Any | None = None) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(Path(path).resolve(), abstract)
