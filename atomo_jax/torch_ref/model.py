"""PyTorch reference of our spatio-temporal UNet, assembled from diffusers blocks; loads an `atomo_jax.export` folder.

PyTorch only (torch + diffusers; never jax). What diffusers has is used as is:
- `UNet2DConditionModel` for the spatial SD 1.5 layers (9-channel conv_in), with diffusers' IP-Adapter processors
  (`IPAdapterAttnProcessor2_0`) and image projection (`ImageProjection`) installed as `load_ip_adapter` would;
- `MotionAdapter` for the temporal attention (AnimateDiff motion modules);
- diffusers' `TemporalConvLayer` for the temporal convolutions, held under UNet3DConditionModel's names.
What diffusers lacks is the forward that runs them in our order, in every layer of every block:
  resnet -> temporal conv -> spatial transformer -> motion module
(UNetMotionModel has no temporal convolutions; UNet3DConditionModel has no motion modules nor IP-Adapter.)

Layouts follow diffusers' video models: sample (B, C, F, H, W); the text context (B, L, D) and the CLIP image
embedding (B, E) are per video and shared by its frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from diffusers.models.resnet import TemporalConvLayer
from torch import nn
from safetensors.torch import load_file

ATOMO_CONFIG = "atomo_config.json"
UNET_PREFIX, MOTION_PREFIX, TEMP_CONV_PREFIX = "unet.", "motion_adapter.", "temp_convs."


class _TempConvList(nn.Module):
    def __init__(self, channels: int, count: int, groups: int):
        super().__init__()
        self.temp_convs = nn.ModuleList([TemporalConvLayer(channels, channels, norm_num_groups=groups)
                                         for _ in range(count)])


class TemporalConvs(nn.Module):
    """The temporal convolution after every resnet, under UNet3DConditionModel's names:
    `down_blocks.{i}.temp_convs.{j}`, `mid_block.temp_convs.{0,1}`, `up_blocks.{i}.temp_convs.{j}`."""

    def __init__(self, block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int):
        super().__init__()
        self.down_blocks = nn.ModuleList([_TempConvList(c, layers_per_block, norm_num_groups)
                                          for c in block_out_channels])
        self.mid_block = _TempConvList(block_out_channels[-1], 2, norm_num_groups)
        self.up_blocks = nn.ModuleList([_TempConvList(c, layers_per_block + 1, norm_num_groups)
                                        for c in reversed(block_out_channels)])


def cross_attention_processors(unet: UNet2DConditionModel) -> list[str]:
    """Names of the cross-attention processors in `attn_processors` order: the i-th one holds the original
    IP-Adapter file's `ip_adapter.{2i+1}.*` weights (diffusers' `_convert_ip_adapter_attn_to_diffusers` numbering)."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def install_ip_adapter(unet: UNet2DConditionModel, image_embed_dim: int, num_tokens: int) -> None:
    """IP-Adapter processors on every cross-attention and the image projection, as diffusers' `load_ip_adapter`
    sets them up (weights come later, from the export)."""
    cfg = unet.config
    processors = {}
    for name, processor in unet.attn_processors.items():
        if not name.endswith("attn2.processor"):
            processors[name] = processor
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
        processors[name] = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=cfg.cross_attention_dim,
                                                     scale=1.0, num_tokens=num_tokens)
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(
        image_embed_dim=image_embed_dim, cross_attention_dim=cfg.cross_attention_dim,
        num_image_text_embeds=num_tokens)])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")


class AtomoUNet(nn.Module):
    """Spatial UNet2DConditionModel + MotionAdapter + temporal convolutions (+ IP-Adapter) in our layer order."""

    def __init__(self, unet: UNet2DConditionModel, motion_adapter: MotionAdapter | None,
                 temp_convs: TemporalConvs | None, *, ip_adapter: bool):
        super().__init__()
        self.unet = unet
        self.motion_adapter = motion_adapter
        self.temp_convs = temp_convs
        self.ip_adapter = ip_adapter

    # ---------------------------------------------------------------- building and loading
    @classmethod
    def from_configs(cls, atomo_unet: Mapping[str, Any], unet_config: Mapping[str, Any],
                     motion_config: Mapping[str, Any] | None) -> "AtomoUNet":
        """Random weights (or meta tensors under `torch.device("meta")`) from our UNet config (the "unet" entry of
        atomo_config.json) and the diffusers configs of the spatial UNet and the MotionAdapter."""
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        motion = None
        if atomo_unet["use_motion_modules"]:
            if motion_config is None:
                raise ValueError("the UNet config has use_motion_modules=True but no MotionAdapter config was given")
            motion = MotionAdapter.from_config(dict(motion_config))
        temp = None
        if atomo_unet["use_temporal_conv"]:
            temp = TemporalConvs(tuple(atomo_unet["block_out_channels"]), int(atomo_unet["layers_per_block"]),
                                 int(atomo_unet["norm_num_groups"]))
        if atomo_unet["ip_adapter"]:
            install_ip_adapter(unet, int(atomo_unet["image_embed_dim"]), int(atomo_unet["ip_tokens"]))
        return cls(unet, motion, temp, ip_adapter=bool(atomo_unet["ip_adapter"]))

    @classmethod
    def from_export(cls, folder: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> "AtomoUNet":
        """Loads an `atomo_jax.export` folder strictly: every tensor of the model comes from the export and every
        exported tensor is used (else a RuntimeError lists the keys)."""
        folder = Path(folder)
        meta = read_atomo_config(folder)
        files = meta["files"]
        motion_config = (MotionAdapter.load_config(str(folder / files["motion_adapter"]))
                         if files.get("motion_adapter") else None)
        with torch.device("meta"):
            model = cls.from_configs(meta["unet"], UNet2DConditionModel.load_config(str(folder / files["unet"])),
                                     motion_config)
        model.load_parts(read_export_parts(folder), source=str(folder))
        left = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise RuntimeError(f"{folder}: tensors not set by the export: {left[:10]}")
        if files.get("lora"):
            model.load_lora(folder / files["lora"])
        return model.to(device=device, dtype=dtype).eval()

    def load_lora(self, path: str | Path, adapter_name: str = "atomo") -> None:
        """A PEFT-naming LoRA file (`atomo_jax.export --lora=separate`, or any diffusers LoRA of these layers): the
        spatial part through diffusers' own loader (`UNet2DConditionModel.load_lora_adapter`); the temporal part
        (motion modules) through PEFT into the MotionAdapter, under the names UNetMotionModel's loader uses."""
        state = load_file(str(path))
        temporal = {k: v for k, v in state.items() if ".motion_modules." in k}
        spatial = {k: v for k, v in state.items() if k not in temporal}
        if spatial:
            self.unet.load_lora_adapter(spatial, prefix=UNET_PREFIX.rstrip("."), adapter_name=adapter_name)
        if temporal:
            if self.motion_adapter is None:
                raise ValueError(f"{path}: LoRA of motion modules, but this UNet has none")
            from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

            temporal = {k.removeprefix(UNET_PREFIX): v for k, v in temporal.items()}
            modules = sorted({k.rsplit(".lora_", 1)[0] for k in temporal})
            rank = int(next(v for k, v in temporal.items() if k.endswith("lora_A.weight")).shape[0])
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=modules),
                                    self.motion_adapter, adapter_name=adapter_name)
            result = set_peft_model_state_dict(self.motion_adapter, temporal, adapter_name=adapter_name)
            if result.unexpected_keys:
                raise ValueError(f"{path}: LoRA keys the MotionAdapter has no place for: {result.unexpected_keys[:5]}")

    def load_parts(self, parts: Mapping[str, Mapping[str, torch.Tensor]], *, source: str = "export") -> None:
        """Strict load of the export's files, {"unet", "motion_adapter", "temporal_convs", "ip_adapter"} -> tensors
        under the file's own names. Tensors are assigned (a meta-device model takes them as they are)."""
        state = {}
        for key, value in parts.get("unet", {}).items():
            state[UNET_PREFIX + key] = value
        for key, value in parts.get("motion_adapter", {}).items():
            state[MOTION_PREFIX + key] = value
        for key, value in parts.get("temporal_convs", {}).items():
            state[TEMP_CONV_PREFIX + key] = value
        ip = parts.get("ip_adapter", {})
        if ip:
            state.update(ip_adapter_state_dict(ip, cross_attention_processors(self.unet)))
        try:
            self.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise RuntimeError(f"{source}: the export does not match the model built from its configs: {e}") from None

    # ---------------------------------------------------------------- forward
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                image_embeds: torch.Tensor | None = None, *, ip_scale: float = 1.0,
                temporal: bool = True) -> torch.Tensor:
        """sample (B, C_in, F, H, W), timestep (B,) or scalar, encoder_hidden_states (B, L, D), image_embeds (B, E)
        -> (B, C_out, F, H, W). `temporal=False` skips every temporal layer (the UNet is then SD 1.5 spatially)."""
        unet = self.unet
        b, c, f, h, w = sample.shape
        dtype = unet.conv_in.weight.dtype
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).to(dtype)
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        temb = unet.time_embedding(unet.time_proj(t).to(dtype)).repeat_interleave(f, 0)
        context: Any = encoder_hidden_states.to(dtype).repeat_interleave(f, 0)
        if self.ip_adapter:
            if image_embeds is None:
                raise ValueError("the UNet has IP-Adapter layers: pass image_embeds (zeros and ip_scale=0 to disable)")
            tokens = unet.encoder_hid_proj([image_embeds.to(dtype)[:, None]])[0].repeat_interleave(f, 0)
            context = (context, [tokens])
            for processor in unet.attn_processors.values():
                if isinstance(processor, IPAdapterAttnProcessor2_0):
                    processor.scale = [ip_scale]
        temporal = temporal and (self.temp_convs is not None or self.motion_adapter is not None)

        def temp_conv(group, j, h):
            return group.temp_convs[j](h, num_frames=f) if temporal and group is not None else h

        def motion(group, j, h):
            return group.motion_modules[j](h, num_frames=f) if temporal and group is not None else h

        def attend(attention, h):
            return attention(h, encoder_hidden_states=context, return_dict=False)[0]

        tc, mm = self.temp_convs, self.motion_adapter
        pick = lambda holder, name, i=None: None if holder is None else (
            getattr(holder, name) if i is None else getattr(holder, name)[i])
        x = unet.conv_in(x)
        skips = [x]
        for i, block in enumerate(unet.down_blocks):
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                x = temp_conv(pick(tc, "down_blocks", i), j, resnet(x, temb))
                if attentions is not None:
                    x = attend(attentions[j], x)
                x = motion(pick(mm, "down_blocks", i), j, x)
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)
                skips.append(x)
        mid = unet.mid_block
        x = temp_conv(pick(tc, "mid_block"), 0, mid.resnets[0](x, temb))
        x = motion(pick(mm, "mid_block"), 0, attend(mid.attentions[0], x))
        x = temp_conv(pick(tc, "mid_block"), 1, mid.resnets[1](x, temb))
        for i, block in enumerate(unet.up_blocks):
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                x = temp_conv(pick(tc, "up_blocks", i), j, resnet(torch.cat([x, skips.pop()], dim=1), temb))
                if attentions is not None:
                    x = attend(attentions[j], x)
                x = motion(pick(mm, "up_blocks", i), j, x)
            if block.upsamplers is not None:
                x = block.upsamplers[0](x)
        x = unet.conv_out(unet.conv_act(unet.conv_norm_out(x)))
        return x.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)


# ---------------------------------------------------------------------------------------------------------------
# Export files.

def read_atomo_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such export folder")
    file = folder / ATOMO_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: not an atomo_jax export (no {ATOMO_CONFIG}; create one with "
                                f"python -m atomo_jax.export --checkpoint DIR --out {folder})")
    meta = json.loads(file.read_text())
    if meta.get("format") != "atomo_jax.export":
        raise ValueError(f"{file}: 'format' is {meta.get('format')!r}, expected 'atomo_jax.export'")
    return meta


def read_export_parts(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The UNet files of an export as {part: {key: tensor}} under the names they are stored with."""

    folder = Path(folder)
    files = read_atomo_config(folder)["files"]
    paths = {"unet": "diffusion_pytorch_model.safetensors", "motion_adapter": "diffusion_pytorch_model.safetensors",
             "temporal_convs": None, "ip_adapter": None}
    parts = {}
    for part, weights in paths.items():
        if not files.get(part):
            continue
        path = folder / files[part] / weights if weights else folder / files[part]
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: atomo_config.json lists {part} but {path} is missing")
        parts[part] = load_file(str(path))
    return parts


def ip_adapter_state_dict(ip: Mapping[str, torch.Tensor], processors: list[str]) -> dict[str, torch.Tensor]:
    """The original IP-Adapter layout (`image_proj.proj.*`, `image_proj.norm.*`, `ip_adapter.{2i+1}.to_{k,v}_ip.
    weight`) -> our module names (`unet.<processor>.to_k_ip.0.weight`, `unet.encoder_hid_proj.
    image_projection_layers.0.{image_embeds,norm}.*`). Keys outside that layout are kept as they are, so the strict
    load reports them."""
    out = {}
    for key, value in ip.items():
        parts = key.split(".")
        if key.startswith("image_proj."):
            name = {"proj": "image_embeds"}.get(parts[1], parts[1])
            out[f"{UNET_PREFIX}encoder_hid_proj.image_projection_layers.0.{name}.{'.'.join(parts[2:])}"] = value
        elif (len(parts) == 4 and parts[0] == "ip_adapter" and parts[1].isdigit() and int(parts[1]) % 2 == 1
              and int(parts[1]) // 2 < len(processors)):
            out[f"{UNET_PREFIX}{processors[int(parts[1]) // 2]}.{parts[2]}.0.{parts[3]}"] = value
        else:
            out[key] = value
    return out
