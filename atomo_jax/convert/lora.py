"""LoRA files <-> our LoRA factors, in the two namings PyTorch tools read.

- PEFT / diffusers (`pipe.load_lora_weights`, `model.load_lora_adapter(prefix="unet")`):
  `unet.<diffusers module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), e.g.
  `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`. Module names are those of
  `convert/unet.py`'s table: UNet2DConditionModel's for the spatial layers, UNetMotionModel's
  (`down_blocks.0.motion_modules.0...`) for the temporal attention. The file stores no alpha (diffusers then takes
  alpha = r), so lora_B is written times alpha / r: every loader applies the same update.
- kohya / ComfyUI (`lora_unet_<module with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`): SD 1.5
  community LoRAs; alpha is stored, lora_up is not rescaled. The naming has no temporal layers.

Importing (`merge_file`) folds a file's updates into a UNet params tree: any SD 1.5 LoRA applies to our spatial
layers (dense kernels, and the 1x1 / 3x3 convolutions of LoCon files), which makes a personalised base for
sampling (`atomo-sample --lora`) or for training (`convert compose --lora`). Keys of parts we do not have (text
encoder LoRAs, `lora_te_*`) are counted and reported, never silently applied elsewhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from atomo_jax.convert import torch_io
from atomo_jax.convert import unet as cu

PEFT, KOHYA = "peft", "kohya"
FORMATS = (PEFT, KOHYA)
PEFT_PREFIX, KOHYA_PREFIX = "unet.", "lora_unet_"


def _module_table(unet_params: Any) -> dict[str, tuple[str, str]]:
    """{diffusers module name: (our kernel path, layout transform)} for every kernel of a UNet params tree."""
    flat = torch_io.flatten_shapes(unet_params)
    rows = cu.unet_key_table({k: v for k, v in flat.items() if k.endswith("/kernel")})
    return {r.torch_key[: -len(".weight")]: (r.flax_path, r.transform) for r in rows}


def _kohya_name(module: str) -> str:
    return KOHYA_PREFIX + module.replace(".", "_")


def to_state_dict(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], scale: float, unet_params: Any,
                  fmt: str = PEFT) -> dict[str, np.ndarray]:
    """Our factors ({kernel path: (lora_a (in, r), lora_b (r, out))}, `lora.factors`) -> a LoRA state dict in
    `fmt`. `unet_params`: the UNet tree (shapes suffice) that names the modules."""
    if fmt not in FORMATS:
        raise ValueError(f"LoRA format {fmt!r}: expected one of {FORMATS}")
    by_path = {path: module for module, (path, _) in _module_table(unet_params).items()}
    out: dict[str, np.ndarray] = {}
    for path, (a, b) in sorted(pairs.items()):
        module = by_path[path]
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        rank = a.shape[1]
        if fmt == PEFT:
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray((b * np.float32(scale)).T)
        else:
            if cu.is_temporal(path):
                raise ValueError(f"the kohya LoRA naming has no temporal layers ({path}); export with "
                                 f"--lora_format=peft, which UNetMotionModel loads")
            name = _kohya_name(module)
            out[f"{name}.lora_down.weight"] = np.ascontiguousarray(a.T)
            out[f"{name}.lora_up.weight"] = np.ascontiguousarray(b.T)
            out[f"{name}.alpha"] = np.asarray(scale * rank, np.float32)
    return out


@dataclasses.dataclass
class LoraUpdates:
    """A LoRA file read against our UNet: the dense update (in torch layout, scale applied) per kernel path."""
    deltas: dict[str, np.ndarray]  # our kernel path -> scale * up @ down, torch layout (out, in[, kh, kw])
    transforms: dict[str, str]  # our kernel path -> layout transform of the table (linear / conv)
    ignored: list[str]  # LoRA modules of parts our UNet does not have (e.g. lora_te_* text encoder keys)
    fmt: str


def read_file(path: str | Path, unet_params: Any) -> LoraUpdates:
    """Reads a PEFT/diffusers or kohya LoRA file (safetensors, or a torch file through weights_only loading) and
    resolves every module against `unet_params`. A UNet module (`unet.` / `lora_unet_` key) that our UNet lacks, or
    a factor pair whose update does not fit its kernel, is an error naming the key; other parts' modules are listed
    in `ignored`."""
    state = torch_io.load_state_dict(path)
    table = _module_table(unet_params)
    shapes = torch_io.flatten_shapes(unet_params)
    fmt = KOHYA if any(k.endswith(".lora_down.weight") for k in state) else PEFT
    if fmt == KOHYA:
        prefix, down_suffix, up_suffix = KOHYA_PREFIX, ".lora_down.weight", ".lora_up.weight"
        modules = {_kohya_name(m): m for m in table}
    else:
        prefix, down_suffix, up_suffix = PEFT_PREFIX, ".lora_A.weight", ".lora_B.weight"
        modules = {PEFT_PREFIX + m: m for m in table}
    deltas, transforms, ignored, problems = {}, {}, [], []
    for key in sorted(k for k in state if k.endswith(down_suffix)):
        name = key[: -len(down_suffix)]
        if not name.startswith(prefix):
            ignored.append(name)
            continue
        if name not in modules:
            problems.append(f"{name}: no such module in this UNet")
            continue
        if name + up_suffix not in state:
            problems.append(f"{key} has no {name + up_suffix}")
            continue
        down, up = state[key], state[name + up_suffix]
        rank = down.shape[0]
        if up.ndim < 2 or up.shape[1] != rank or up.size != up.shape[0] * rank:
            problems.append(f"{name}: {up_suffix[1:]} {up.shape} does not pair with {down_suffix[1:]} {down.shape}")
            continue
        alpha = float(state[name + ".alpha"]) if name + ".alpha" in state else float(rank)
        delta = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape((up.shape[0],) + down.shape[1:])
        kernel, transform = table[modules[name]]
        if transform == cu.CONV and delta.ndim == 2:  # a dense-shaped update of a 1x1 convolution
            delta = delta.reshape(delta.shape + (1, 1))
        expected = tuple(cu.to_torch_array(transform, np.broadcast_to(np.float32(0), shapes[kernel].shape)).shape)
        if delta.shape != expected:
            problems.append(f"{name}: update {delta.shape}, but {modules[name]}.weight is {expected}")
            continue
        deltas[kernel], transforms[kernel] = np.float32(alpha / rank) * delta.astype(np.float32), transform
    if problems:
        raise ValueError(f"LoRA file {path}: {len(problems)} modules do not fit this UNet: " + "; ".join(problems[:8])
                         + (" ..." if len(problems) > 8 else ""))
    if not deltas:
        raise ValueError(f"LoRA file {path}: no UNet LoRA modules found (expected '{PEFT_PREFIX}<module>.lora_A.weight'"
                         f" or '{KOHYA_PREFIX}<module>.lora_down.weight' keys)")
    return LoraUpdates(deltas, transforms, ignored, fmt)


def merge_file(unet_params: Any, path: str | Path, strength: float = 1.0) -> tuple[dict, LoraUpdates]:
    """`unet_params` (numpy or jax leaves) with a LoRA file's updates, times `strength`, added to their kernels."""
    updates = read_file(path, unet_params)
    flat = torch_io.flatten_shapes(unet_params)
    for p, delta in updates.deltas.items():
        kernel = np.asarray(flat[p], np.float32)
        flat[p] = (kernel + np.float32(strength) * cu.to_flax_array(updates.transforms[p], delta)).astype(
            np.asarray(flat[p]).dtype)
    return traverse_util.unflatten_dict(flat, sep="/"), updates


def parse_spec(spec: str) -> tuple[str, float]:
    """'FILE' or 'FILE:STRENGTH' (the command-line form of --lora) -> (path, strength)."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def merge_specs(unet_params: Any, specs: list[str] | None, log: Callable[[str], None]) -> Any:
    """Every --lora FILE[:STRENGTH] merged into `unet_params` in order, one log line each."""
    for spec in specs or ():
        path, strength = parse_spec(spec)
        unet_params, updates = merge_file(unet_params, path, strength)
        skipped = f"; {len(updates.ignored)} modules of other parts skipped" if updates.ignored else ""
        log(f"LoRA {path} ({updates.fmt} naming, strength {strength:g}): {len(updates.deltas)} layers merged{skipped}")
    return unet_params
