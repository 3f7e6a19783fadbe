"""The UNet of an original single-file Stable Diffusion 1.x checkpoint (LDM/CompVis names) <-> diffusers names.

An original checkpoint (`v1-5-pruned-emaonly.safetensors` / `.ckpt`) holds the UNet under `model.diffusion_model.`,
the VAE under `first_stage_model.` (see `convert/vae.py`) and the CLIP text encoder under
`cond_stage_model.transformer.` (see `convert/clip.py`). LDM UNet layout (facts from diffusers'
`loaders/single_file_utils.py::convert_ldm_unet_checkpoint`), with L = layers per block:
- `time_embed.{0,2}` -> `time_embedding.linear_{1,2}`; `input_blocks.0.0` -> `conv_in`; `out.{0,2}` ->
  `conv_norm_out` / `conv_out`;
- `input_blocks.{1 + b(L+1) + l}.0` -> `down_blocks.b.resnets.l`, `.1` -> `down_blocks.b.attentions.l`;
  `input_blocks.{(b+1)(L+1)}.0.op` -> `down_blocks.b.downsamplers.0.conv`;
- `middle_block.{0,1,2}` -> `mid_block.resnets.0`, `mid_block.attentions.0`, `mid_block.resnets.1`;
- `output_blocks.{b(L+1) + l}.0` -> `up_blocks.b.resnets.l`, `.1` -> `up_blocks.b.attentions.l` (blocks with
  attention); the block's upsampler sits in its last output block after the resnet (and attention, if any):
  `output_blocks.{b(L+1) + L}.{1|2}.conv` -> `up_blocks.b.upsamplers.0.conv`;
- inside resnets `in_layers.{0,2}` -> `norm1`/`conv1`, `emb_layers.1` -> `time_emb_proj`, `out_layers.{0,3}` ->
  `norm2`/`conv2`, `skip_connection` -> `conv_shortcut`; transformer internals keep their names.
EMA weights, when kept, are stored flat: `model_ema.diffusion_modelinput_blocks00weight`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from atomo_jax.convert import torch_io
from atomo_jax.convert.clip import LDM_TEXT_PREFIXES, ldm_text_encoder_to_transformers
from atomo_jax.convert.vae import LDM_VAE_PREFIXES, ldm_vae_to_diffusers

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_EMA_PREFIX = "model_ema."
_RESNET_PARTS = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                 ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


@dataclasses.dataclass(frozen=True)
class LDMUNetLayout:
    """What the key layout depends on: resnets per down block and which down blocks have attention (the up blocks
    mirror them)."""

    layers_per_block: int = 2
    down_attention: tuple[bool, ...] = (True, True, True, False)


def module_prefixes(layout: LDMUNetLayout) -> dict[str, str]:
    """LDM module path -> diffusers module path, for every module of the layout (a bijection)."""
    n, per = len(layout.down_attention), layout.layers_per_block + 1
    up_attention = tuple(reversed(layout.down_attention))
    out = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
           "middle_block.1": "mid_block.attentions.0"}

    def resnet(ldm: str, diffusers: str) -> None:
        out.update({f"{ldm}.{a}": f"{diffusers}.{b}" for a, b in _RESNET_PARTS})

    resnet("middle_block.0", "mid_block.resnets.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    for b in range(n):
        for layer in range(layout.layers_per_block):
            i = 1 + b * per + layer
            resnet(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{layer}")
            if layout.down_attention[b]:
                out[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{layer}"
        if b < n - 1:
            out[f"input_blocks.{(b + 1) * per}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
        for layer in range(per):
            j = b * per + layer
            resnet(f"output_blocks.{j}.0", f"up_blocks.{b}.resnets.{layer}")
            if up_attention[b]:
                out[f"output_blocks.{j}.1"] = f"up_blocks.{b}.attentions.{layer}"
        if b < n - 1:
            out[f"output_blocks.{b * per + per - 1}.{2 if up_attention[b] else 1}.conv"] = \
                f"up_blocks.{b}.upsamplers.0.conv"
    return out


def infer_layout(ldm_unet: Mapping[str, Any]) -> LDMUNetLayout:
    """Reads the layout off LDM UNet keys (prefix removed): downsampler positions give L, `.1` entries attention."""
    ops = sorted({int(m.group(1)) for k in ldm_unet for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.", k)] if m})
    inputs = {int(m.group(1)) for k in ldm_unet for m in [re.match(r"input_blocks\.(\d+)\.", k)] if m}
    if not inputs:
        raise ValueError("no 'input_blocks.*' keys: this is not an LDM (original SD) UNet state dict")
    per = ops[0] if ops else max(inputs) + 1
    levels = len(ops) + 1
    attention = tuple(any(k.startswith(f"input_blocks.{1 + b * per}.1.") for k in ldm_unet) for b in range(levels))
    return LDMUNetLayout(per - 1, attention)


def _rename(key: str, prefixes: Mapping[str, str]) -> str | None:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in prefixes:
            return ".".join([prefixes[head]] + parts[n:])
    return None


def extract_ldm_unet(checkpoint: Mapping[str, np.ndarray], *, use_ema: bool = False,
                     source: str = "single-file checkpoint") -> dict[str, np.ndarray]:
    """The UNet entries of a full original checkpoint, without their `model.diffusion_model.` prefix.

    `use_ema=True` takes each weight from its flat `model_ema.*` copy (checkpoints that keep both); an error if the
    checkpoint has none. Without EMA copies (e.g. `-emaonly` files, whose weights already are the EMA) use False.
    """
    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_UNET_PREFIX)}
    if not unet:
        sample = sorted(checkpoint)[:5]
        raise ValueError(f"{source}: no '{LDM_UNET_PREFIX}*' keys, so it is not an original SD 1.x checkpoint "
                         f"(first keys: {sample}); for diffusers weights pass the model folder")
    if not use_ema:
        return unet
    flat = {k: LDM_EMA_PREFIX + ("diffusion_model." + k).replace(".", "") for k in unet}
    missing = sorted(k for k, ema in flat.items() if ema not in checkpoint)
    if missing:
        raise torch_io.WeightMappingError(f"{source}: use_ema=True but {len(missing)} UNet weights have no "
                                          f"'{LDM_EMA_PREFIX}' copy, e.g. {flat[missing[0]]}; use use_ema=False")
    return {k: checkpoint[ema] for k, ema in flat.items()}


def ldm_unet_to_diffusers(checkpoint: Mapping[str, np.ndarray], *, use_ema: bool = False,
                          source: str = "single-file checkpoint") -> dict[str, np.ndarray]:
    """Original SD checkpoint (full, or only its `model.diffusion_model.*` keys) -> diffusers `UNet2DConditionModel`
    state dict. Keys of other parts (VAE, text encoder, schedule buffers) are left out; an unknown UNet key is an
    error listing all of them."""
    if not any(k.startswith(LDM_UNET_PREFIX) for k in checkpoint) and any(k.startswith("input_blocks.")
                                                                          for k in checkpoint):
        unet = dict(checkpoint)  # already without the prefix
    else:
        unet = extract_ldm_unet(checkpoint, use_ema=use_ema, source=source)
    prefixes = module_prefixes(infer_layout(unet))
    out, unknown = {}, []
    for key, value in unet.items():
        new = _rename(key, prefixes)
        if new is None:
            unknown.append(LDM_UNET_PREFIX + key)
        else:
            out[new] = value
    if unknown:
        raise torch_io.WeightMappingError(f"{source}: {len(unknown)} UNet keys have no diffusers name (is it an SD "
                                          f"1.x checkpoint?): " + ", ".join(sorted(unknown)[:20]))
    return out


def diffusers_unet_to_ldm(state_dict: Mapping[str, np.ndarray], layout: LDMUNetLayout = LDMUNetLayout(), *,
                          prefix: str = LDM_UNET_PREFIX) -> dict[str, np.ndarray]:
    """diffusers `UNet2DConditionModel` state dict -> original LDM keys (with `prefix`); the inverse of
    `ldm_unet_to_diffusers` (for export and tests). Unknown keys are an error."""
    prefixes = {v: k for k, v in module_prefixes(layout).items()}
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = _rename(key, prefixes)
        if new is None:
            unknown.append(key)
        else:
            out[prefix + new] = value
    if unknown:
        raise torch_io.WeightMappingError(f"{len(unknown)} diffusers UNet keys have no LDM name for layout {layout}: "
                                          + ", ".join(sorted(unknown)[:20]))
    return out


def ldm_key_namer(layout: LDMUNetLayout) -> Callable[[str], str]:
    """diffusers UNet key -> its name in an original checkpoint of `layout` (other keys unchanged): errors then name
    the keys the user's file holds."""
    prefixes = {v: k for k, v in module_prefixes(layout).items()}
    return lambda key: LDM_UNET_PREFIX + new if (new := _rename(key, prefixes)) else key


def read_single_file(path: str | Path, *, use_ema: bool = False) -> dict[str, Any]:
    """An original SD 1.x `.safetensors` / `.ckpt` (read with `torch.load(weights_only=True)`) -> {"unet": diffusers
    UNet state dict, "vae": diffusers AutoencoderKL state dict, "text_encoder": transformers CLIPTextModel state
    dict, "ignored": keys of no part (e.g. schedule buffers, unused EMA copies), "file_key": the UNet key namer}."""

    checkpoint = torch_io.load_state_dict(path)
    parts = (LDM_UNET_PREFIX,) + tuple(LDM_VAE_PREFIXES) + tuple(LDM_TEXT_PREFIXES)
    used_ema = use_ema and any(k.startswith(LDM_EMA_PREFIX) for k in checkpoint)
    ignored = sorted(k for k in checkpoint if not k.startswith(parts)
                     and not (used_ema and k.startswith(LDM_EMA_PREFIX + "diffusion_model")))
    unet = ldm_unet_to_diffusers(checkpoint, use_ema=use_ema, source=str(path))
    layout = infer_layout({k[len(LDM_UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_UNET_PREFIX)})
    return {"unet": unet, "file_key": ldm_key_namer(layout),
            "vae": ldm_vae_to_diffusers(checkpoint),
            "text_encoder": ldm_text_encoder_to_transformers(checkpoint),
            "ignored": ignored}
