"""IP-Adapter SD 1.5 weights -> our `image_proj` and every cross-attention's `to_k_ip` / `to_v_ip`.

Layouts read:
- original (tencent-ailab `ip-adapter_sd15.bin` / `.safetensors`): `image_proj.proj.{weight,bias}`,
  `image_proj.norm.{weight,bias}`, `ip_adapter.{N}.to_k_ip.weight`, `ip_adapter.{N}.to_v_ip.weight`. N counts the
  UNet's attention processors in diffusers' `attn_processors` order (down blocks, up blocks, mid block; attn1 then
  attn2 in each transformer block), so the cross-attentions are the odd N = 1, 3, 5, ... The `.bin` file is a nested
  dict {"image_proj": {...}, "ip_adapter": {...}}.
- diffusers (a UNet after `load_ip_adapter`): `encoder_hid_proj.image_projection_layers.0.{image_embeds,norm}.*`,
  `<...>.attn2.processor.to_k_ip.0.weight`, `<...>.attn2.processor.to_v_ip.0.weight`.
Only plain IP-Adapter (4 image tokens from a linear projection) is supported; Plus/Full/FaceID variants are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atomo_jax.convert import torch_io
from atomo_jax.convert.motion import subtree, unet_shapes
from atomo_jax.models.unet import UNetConfig

FORMATS = ("original IP-Adapter (.bin nested {'image_proj','ip_adapter'} or .safetensors with keys "
           "'image_proj.proj.weight', 'ip_adapter.1.to_k_ip.weight', ...)",
           "diffusers (keys 'encoder_hid_proj.image_projection_layers.0.image_embeds.weight', "
           "'...attn2.processor.to_k_ip.0.weight', ...)")

_ORIGINAL_ATTN = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_DIFFUSERS_ATTN = re.compile(r"^(.*\.attn2)\.processor\.(to_k_ip|to_v_ip)\.0\.weight$")
_DIFFUSERS_PROJ = "encoder_hid_proj.image_projection_layers.0."


def is_ip_adapter_param(path: str) -> bool:
    parts = path.split("/")
    return parts[0] == "image_proj" or "to_k_ip" in parts or "to_v_ip" in parts


def cross_attention_modules(config: UNetConfig) -> list[str]:
    """Torch-style module paths of the UNet's cross-attentions in diffusers' `attn_processors` order."""
    blocks = []
    for i, attention in enumerate(config.down_attention):
        if attention:
            blocks += [f"down_blocks.{i}.attentions.{j}" for j in range(config.layers_per_block)]
    for i, attention in enumerate(reversed(config.down_attention)):
        if attention:
            blocks += [f"up_blocks.{i}.attentions.{j}" for j in range(config.layers_per_block + 1)]
    blocks.append("mid_block.attentions.0")
    return [f"{b}.transformer_blocks.{t}.attn2" for b in blocks for t in range(config.transformer_layers)]


def detect_layout(state_dict: Mapping[str, Any], source: str = "IP-Adapter checkpoint") -> str:
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in state_dict):
        return "original"
    if any(k.startswith(_DIFFUSERS_PROJ) or _DIFFUSERS_ATTN.match(k) for k in state_dict):
        return "diffusers"
    raise ValueError(f"{source}: not an IP-Adapter checkpoint (first keys: {sorted(state_dict)[:5]}); "
                     f"supported formats: " + "; ".join(FORMATS))


def check_supported(state_dict: Mapping[str, Any], source: str = "IP-Adapter checkpoint") -> None:
    if "image_proj.proj.3.weight" in state_dict or "image_proj.latents" in state_dict or any(
            k.startswith("image_proj.perceiver_resampler.") for k in state_dict):
        raise ValueError(f"{source}: this is an IP-Adapter Plus/Full/FaceID checkpoint; only the plain IP-Adapter "
                         f"(image_proj.proj + image_proj.norm, 4 image tokens) is supported")


def module_key(key: str, layout: str, modules: list[str]) -> str:
    """One key of either layout -> the torch-style key mirroring our module tree (`image_proj.image_embeds.weight`,
    `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_ip.weight`). A key that fits no rule is returned
    unchanged, so that `assign` reports it as unexpected."""
    if layout == "original":
        match = _ORIGINAL_ATTN.match(key)
        if key.startswith("image_proj.proj."):
            return "image_proj.image_embeds." + key[len("image_proj.proj."):]
        if match and int(match[1]) % 2 == 1 and int(match[1]) // 2 < len(modules):
            return f"{modules[int(match[1]) // 2]}.{match[2]}.weight"
        return key
    match = _DIFFUSERS_ATTN.match(key)
    if key.startswith(_DIFFUSERS_PROJ):
        return "image_proj." + key[len(_DIFFUSERS_PROJ):]
    if match:
        return f"{match[1]}.{match[2]}.weight"
    return key


def ip_adapter_params(state_dict: Mapping[str, np.ndarray], config: UNetConfig, *,
                      source: str = "IP-Adapter checkpoint") -> dict[str, Any]:
    """IP-Adapter weights (either layout) -> the `image_proj`, `to_k_ip`, `to_v_ip` subtrees of our UNet params,
    all or nothing (`WeightMappingError` lists missing/unexpected/mis-shaped keys)."""
    if not config.ip_adapter:
        raise ValueError("the UNet config has ip_adapter=False: there is nothing to load IP-Adapter weights into")
    check_supported(state_dict, source)
    layout, modules = detect_layout(state_dict, source), cross_attention_modules(config)
    shapes = subtree(unet_shapes(config), is_ip_adapter_param)
    return torch_io.convert_state_dict(state_dict, shapes, rename=lambda k: module_key(k, layout, modules),
                                       source=source)


def load_ip_adapter_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads an IP-Adapter file; the original `.bin` nests {"image_proj": {...}, "ip_adapter": {...}}, flattened to
    `image_proj.*` / `ip_adapter.*` keys. Pickle files only through torch.load(weights_only=True)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".bin", ".ckpt", ".pt", ".pth"):
        import torch  # optional dependency: the [torch] extra

        obj = torch_io.read_torch_file(path)
        if isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in ("image_proj", "ip_adapter")):
            flat = {}
            for group, entries in obj.items():
                if not isinstance(entries, Mapping):
                    raise ValueError(f"{path}: entry {group!r} is a {type(entries).__name__}, expected a dict of "
                                     f"tensors")
                for name, tensor in entries.items():
                    if not isinstance(tensor, torch.Tensor):
                        raise ValueError(f"{path}: {group}.{name} is a {type(tensor).__name__}, expected a tensor")
                    flat[f"{group}.{name}"] = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
            return flat
    return torch_io.load_state_dict(path)


def load_ip_adapter(path: str | Path, config: UNetConfig) -> dict[str, Any]:
    return ip_adapter_params(load_ip_adapter_state_dict(path), config, source=str(path))
