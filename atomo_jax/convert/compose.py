"""Assemble one initial training checkpoint from pretrained parts.

`read_sources(...)` reads SD 1.5 (a diffusers folder or the original single file), AnimateDiff motion modules,
IP-Adapter SD 1.5 weights and a CLIP vision folder once; `configure(config, sources)` makes the config's model what
those files hold (sizes, heads, norms, from config.json or shapes; see `convert/architecture.py`); `compose(...)`
converts each part with its converter (all or nothing), fills what no file provides with our initialisation
(temporal layers start as the identity), and returns the params dict
`{"unet", "vae", "image_encoder", "text_encoder"}` shaped exactly like `build_model(config.model).init(...)`, plus one
report per part saying what was loaded, what was newly initialised and what was ignored.

`save_params` writes it with orbax `StandardCheckpointer` as a plain params dict: the trainer restores it through
`config.init.checkpoint=DIR`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from atomo_jax.convert import architecture
from atomo_jax.convert import clip as clip_convert
from atomo_jax.convert import ip_adapter as ip_convert
from atomo_jax.convert import motion as motion_convert
from atomo_jax.convert import torch_io
from atomo_jax.convert import unet as unet_convert
from atomo_jax.convert import vae as vae_convert
from atomo_jax.configuration import Architecture, Found, adopt_architecture, merge_architectures
from atomo_jax.models.atomo import PARTS, AtomoVideo, build_model
from atomo_jax.training.checkpoint import COMPOSED_CONFIG
from atomo_jax.convert import single_file

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
    file_key: Callable[[str], str] = lambda key: key  # UNet key -> the key as the file names it


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

    parts = single_file.read_single_file(path)
    return SDWeights(str(path), "single file", parts["unet"], parts["vae"], parts["text_encoder"], {},
                     parts["ignored"], parts["file_key"])


@dataclasses.dataclass
class Sources:
    """Every input of `compose`, read once: the state dicts (diffusers/transformers names) and where they came from."""

    sd: SDWeights | None = None
    motion: tuple[str, dict[str, np.ndarray]] | None = None  # (path, MotionAdapter-layout state dict)
    ip_adapter: tuple[str, dict[str, np.ndarray], str] | None = None  # (path, state dict, layout)
    image_encoder: tuple[str, dict[str, np.ndarray]] | None = None  # (path, state dict)


def read_sources(*, sd: str | None = None, motion: str | None = None, ip_adapter: str | None = None,
                 image_encoder: str | None = None) -> Sources:
    out = Sources(sd=read_sd(sd) if sd else None)
    if motion:
        out.motion = str(motion), motion_convert.to_diffusers_layout(torch_io.load_state_dict(motion), str(motion))
    if ip_adapter:
        state = ip_convert.load_ip_adapter_state_dict(ip_adapter)
        ip_convert.check_supported(state, str(ip_adapter))
        out.ip_adapter = str(ip_adapter), state, ip_convert.detect_layout(state, str(ip_adapter))
    if image_encoder:
        out.image_encoder = str(image_encoder), torch_io.load_state_dict(image_encoder)
    return out


def architecture_of(sources: Sources) -> Architecture:
    """What the inputs say the model is (config.json where a folder has one, else shapes and the known variant)."""
    parts: list[Architecture] = []
    if sources.sd is not None:
        sd = sources.sd
        for part in SD_FOLDER_PARTS:
            parts.append(architecture.describe(part, sd.folders.get(part, sd.source), getattr(sd, part)))
        parts.append({"vae": {"kind": Found("sd", f"{sd.source} (an SD VAE)")},
                      "text_encoder": {"kind": Found("clip_text", f"{sd.source} (a CLIP text encoder)")}})
        tokenizer = Path(sd.source) / "tokenizer"
        if tokenizer.is_dir():  # a default for training and sampling; a configured tokenizer is kept
            parts.append({"text_encoder": {"tokenizer": Found(str(tokenizer.resolve()), f"{sd.source} (tokenizer/)",
                                                              certain=False)}})
    if sources.motion is not None:
        parts.append(architecture.describe_motion(*sources.motion))
    if sources.ip_adapter is not None:
        parts.append(architecture.describe_ip_adapter(*sources.ip_adapter))
    if sources.image_encoder is not None:
        parts.append(architecture.describe("image_encoder", *sources.image_encoder))
    return merge_architectures(*parts)


def configure(config: ml_collections.ConfigDict, sources: Sources, explicit: Iterable[str] = ()
              ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """A copy of `config` whose model is what the inputs hold (see `configuration.adopt_architecture`; `explicit`:
    the keys the command line set), and notes on configured values the files could not confirm."""
    config = copy.deepcopy(config)
    notes = adopt_architecture(config, architecture_of(sources), explicit)
    return config, notes


# ---------------------------------------------------------------------------------------------------------------
# Parts.

def _fresh(model: AtomoVideo, part: str, rng: jax.Array) -> dict[str, Any]:
    """Our initialisation of one part (jitted: XLA drops the other parts' initialisers)."""
    init = jax.jit(lambda r: flax.linen.meta.unbox(model.init(r))[part])
    return jax.tree.map(np.asarray, init(rng))


def compose_unet(model: AtomoVideo, sources: Sources, rng: jax.Array) -> tuple[dict[str, Any], PartReport]:
    cfg, sd = model.unet_config, sources.sd
    report = PartReport("unet", sd.source if sd else "no SD weights")
    extra: dict[str, np.ndarray] = {}
    motion_paths: list[str] = []
    if sources.motion is not None:
        motion, state = sources.motion
        tables = [k for k in state if k.endswith(".pe")]
        tree = motion_convert.motion_modules_params(state, cfg, source=motion)
        motion_paths = list(flat(tree))
        extra.update(unet_convert.unet_params_to_torch(tree))
        report.source += f" + motion modules {motion}"
        if tables:
            report.ignored += tables
            report.notes.append(f"{len(tables)} position tables (*.pe) of {motion} were checked equal to our fixed "
                                f"sinusoidal table; the model computes it, so they are not stored")
    ip_paths: list[str] = []
    if sources.ip_adapter is not None:
        ip_adapter, state, _ = sources.ip_adapter
        tree = ip_convert.ip_adapter_params(state, cfg, source=ip_adapter)
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
    params, unet_report = unet_convert.load_unet_state_dict(state, cfg, rng=rng, new_ok=new_ok, source=report.source,
                                                            file_key=sd.file_key if sd else lambda key: key)
    report.loaded, report.new = unet_report.loaded, unet_report.newly_initialised
    report.notes += unet_report.notes
    if motion_paths:
        report.notes.append(f"{len(motion_paths)} motion-module tensors from {sources.motion[0]}")
    if ip_paths:
        report.notes.append(f"{len(ip_paths)} IP-Adapter tensors from {sources.ip_adapter[0]}")
    if cfg.use_motion_modules and sources.motion is None:
        report.notes.append("no --motion: motion modules start as the identity (random attention, zero proj_out)")
    if cfg.ip_adapter and sources.ip_adapter is None:
        report.notes.append("no --ip_adapter: to_k_ip/to_v_ip/image_proj are RANDOM, so image features perturb the "
                            "SD output from step 0; pass IP-Adapter weights or expect to train them")
    return params, report


@dataclasses.dataclass(frozen=True)
class _Pretrained:
    """How one whole pretrained part (VAE, text or image encoder) is composed: one file's state dict converted, or
    our initialisation when no file gives it, or nothing when the config builds no such part."""

    absent: Callable[[AtomoVideo], str | None]  # the note when the config's model has no such part
    source: Callable[[Sources], tuple[str, Mapping[str, np.ndarray]] | None]  # (path, state dict) or None
    convert: Callable[[Mapping[str, np.ndarray], AtomoVideo, str], Mapping[str, Any]]  # (state, model, path)
    missing: tuple[str, str]  # (report source, note) when no file gives the part


_PRETRAINED = {
    "vae": _Pretrained(
        absent=lambda m: "config.model.vae.kind='pixel'" if m.config.vae.kind == "pixel" else None,
        source=lambda s: (s.sd.source, s.sd.vae) if s.sd else None,
        convert=lambda state, m, path: vae_convert.vae_params_from_torch(state, m.vae.config, source=path),
        missing=("no SD weights", "RANDOM VAE: pass --sd for the pretrained one")),
    "text_encoder": _Pretrained(
        absent=lambda m: "config.model.text_encoder.kind='none'" if m.text_encoder is None else None,
        source=lambda s: (s.sd.source, s.sd.text_encoder) if s.sd else None,
        convert=lambda state, m, path: clip_convert.text_params_from_torch(state, m.text_encoder.config, source=path),
        missing=("no SD weights", "RANDOM text encoder: pass --sd for the pretrained one")),
    "image_encoder": _Pretrained(
        absent=lambda m: None,
        source=lambda s: s.image_encoder,
        convert=lambda state, m, path: clip_convert.vision_params_from_torch(state, m.image_encoder.config,
                                                                             source=path),
        missing=("no --image_encoder", "RANDOM image encoder: pass the IP-Adapter CLIP vision folder")),
}


def compose_pretrained(part: str, model: AtomoVideo, sources: Sources, rng: jax.Array
                       ) -> tuple[dict[str, Any], PartReport]:
    """One part of `_PRETRAINED`: converted from its file, else freshly initialised (and said so)."""
    spec = _PRETRAINED[part]
    absent = spec.absent(model)
    if absent:
        return {}, PartReport(part, "none", notes=[absent])
    source = spec.source(sources)
    if source is None:
        params = _fresh(model, part, rng)
        return params, PartReport(part, spec.missing[0], new=list(flat(params)), notes=[spec.missing[1]])
    path, state = source
    params = _strip_params(spec.convert(state, model, path))
    return params, PartReport(part, path, loaded=list(flat(params)))


def compose(config: ml_collections.ConfigDict, sources: Sources, *, seed: int = 0,
            progress: Callable[[str], None] = lambda step: None) -> tuple[dict[str, Any], list[PartReport]]:
    """-> (params {"unet", "vae", "image_encoder", "text_encoder"} as numpy float32, one report per part) for the
    model of `config` (see `configure` for a config that matches `sources`).

    The tree is checked against `jax.eval_shape` of `build_model(config.model).init` (every path, every shape), so
    what is saved restores into the trainer's model."""
    model = build_model(config.model)
    rngs = dict(zip(PARTS, jax.random.split(jax.random.key(seed), len(PARTS))))
    params, reports = {}, []
    for part in PARTS:
        progress(part)
        compose_part = compose_unet if part == "unet" else functools.partial(compose_pretrained, part)
        params[part], report = compose_part(model, sources, rngs[part])
        reports.append(report)
    if sources.sd is not None and sources.sd.ignored:
        reports.append(PartReport("sd (unused entries)", sources.sd.source, ignored=sources.sd.ignored))
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

    out = Path(out_dir).resolve()
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose a new directory or pass --force to overwrite it")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out, dict(params), force=force)
    checkpointer.wait_until_finished()
    (out / COMPOSED_CONFIG).write_text(config.to_json_best_effort(indent=1))
    return out


def restore_params(path: str | Path, abstract: Any | None = None) -> dict[str, Any]:
    return ocp.StandardCheckpointer().restore(Path(path).resolve(), abstract)
