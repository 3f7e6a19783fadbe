"""The architecture a checkpoint describes, read off its own files, laid over the config.

A diffusers or transformers folder says what it is in `config.json`; a single file (original SD, AnimateDiff,
IP-Adapter) says it through its tensor shapes, and the variant those shapes identify fixes the rest (SD 1.x: 8
attention heads, 32 norm groups; AnimateDiff: 8 motion heads; CLIP: 64-wide heads), as diffusers' single-file loader
does. Each inferred field is a `Found`: its value, where it was read, and whether the file states it (`certain`) or
it is the variant's known value.

`configuration.adopt_architecture` then lays the findings over the config: a field the config leaves at its
configs/base.py default takes the checkpoint's value; a field the config sets (config file or `--config.*`) must agree
with what the file states, else one error names the field, both values and the file. So a checkpoint of any size
converts with no size flags, and a wrong head count, which never shows in a tensor shape, cannot import silently.

diffusers' SD 1.x UNet configs say `attention_head_dim: 8` but mean 8 heads (a historical misnomer diffusers keeps
for compatibility): `num_attention_heads`, when set, wins; otherwise `attention_head_dim` is the head count.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atomo_jax.configuration import Architecture, Found, merge_architectures

Fields = dict[str, Found]


def read_config(folder: str | Path) -> tuple[Path, dict] | None:
    """(path, parsed) of `folder/config.json`, or None for a file or a folder without one."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        return path, json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None


def _one(value: Any, field: str, path: Path) -> Any:
    """A per-block list that must hold one value for our single-valued field."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{path}: {field}={list(value)} varies per block; atomo_jax models take one value")
        return value[0]
    return value


def _list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _stated(path: Path, c: Mapping[str, Any], table: Mapping[str, tuple[str, Any]]) -> Fields:
    """{our field: Found} for `our field: (their field, default)`; absent fields take diffusers' default, which is
    what the library would build from that config too."""
    return {ours: Found(_one(c.get(theirs, default), theirs, path), f"{path} ({theirs})")
            for ours, (theirs, default) in table.items()}


def _unsupported(path: Path | str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{path}: unsupported architecture: " + "; ".join(problems))


def dataclass_from(cls: type, fields: Fields) -> Any:
    """`cls` (a model config dataclass) from the found fields it has; the rest keep the dataclass defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: f.value for k, f in fields.items() if k in names})


def _count(keys: Any, pattern: str) -> int:
    """1 + the largest index matched by `pattern`'s group, over `keys` (0 when none match)."""
    indices = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
    return max(indices) + 1 if indices else 0


def _shape(state: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{source}: no {key!r}, so its architecture cannot be read (first keys: {sorted(state)[:5]})")
    return tuple(np.shape(state[key]))


# ---------------------------------------------------------------------------------------------------------------
# UNet (SD 1.x spatial layers).

def unet_from_config(path: Path, c: Mapping[str, Any]) -> Fields:
    """A diffusers UNet2DConditionModel config.json."""
    problems = [f"{k}={c[k]!r} (SD 1.x: {v!r})" for k, v in (("act_fn", "silu"), ("use_linear_projection", False),
                                                               ("class_embed_type", None), ("addition_embed_type", None))
                if k in c and c[k] != v]
    if any(_list(c.get("only_cross_attention", False))):
        problems.append(f"only_cross_attention={c['only_cross_attention']!r} (SD 1.x: False)")
    _unsupported(path, problems)
    heads_field = "num_attention_heads" if c.get("num_attention_heads") else "attention_head_dim"
    found = _stated(path, c, {"layers_per_block": ("layers_per_block", 2),
                              "num_attention_heads": (heads_field, 8),
                              "transformer_layers": ("transformer_layers_per_block", 1),
                              "cross_attention_dim": ("cross_attention_dim", 1280),
                              "norm_num_groups": ("norm_num_groups", 32), "norm_eps": ("norm_eps", 1e-5)})
    found["block_out_channels"] = Found(tuple(c.get("block_out_channels", (320, 640, 1280, 1280))),
                                        f"{path} (block_out_channels)")
    down = c.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    found["down_attention"] = Found(tuple("CrossAttn" in t for t in down), f"{path} (down_block_types)")
    return found


def unet_from_state_dict(state: Mapping[str, np.ndarray], source: str) -> Fields:
    """A diffusers-named SD UNet state dict (e.g. converted from an original single file): sizes from shapes, heads,
    norm groups and epsilon as in SD 1.x."""
    levels = _count(state, r"down_blocks\.(\d+)\.")
    widths = tuple(_shape(state, f"down_blocks.{i}.resnets.0.conv1.weight", source)[0] for i in range(levels))
    attention = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in range(levels))
    first = attention.index(True) if any(attention) else None
    where = f"{source} (shapes)"
    found = {"block_out_channels": Found(widths, where), "down_attention": Found(attention, where),
             "layers_per_block": Found(_count(state, r"down_blocks\.0\.resnets\.(\d+)\."), where)}
    if first is not None:
        prefix = f"down_blocks.{first}.attentions.0.transformer_blocks"
        if len(_shape(state, f"down_blocks.{first}.attentions.0.proj_in.weight", source)) == 2:
            raise ValueError(f"{source}: linear proj_in layers, as in SD 2.x (per-block head counts); atomo_jax "
                             f"imports SD 1.x UNets (1x1-convolution proj_in)")
        found["cross_attention_dim"] = Found(_shape(state, f"{prefix}.0.attn2.to_k.weight", source)[1], where)
        found["transformer_layers"] = Found(_count(state, re.escape(prefix) + r"\.(\d+)\."), where)
    sd1 = f"{source} (SD 1.x; not in the file)"
    found.update(num_attention_heads=Found(8, sd1, certain=False), norm_num_groups=Found(32, sd1, certain=False),
                 norm_eps=Found(1e-5, sd1, certain=False))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Motion modules (AnimateDiff).

def motion_from_config(path: Path, c: Mapping[str, Any]) -> Fields:
    """A diffusers MotionAdapter config.json."""
    found = _stated(path, c, {"motion_num_heads": ("motion_num_attention_heads", 8),
                              "motion_max_seq_length": ("motion_max_seq_length", 32),
                              "motion_mid_block": ("use_motion_mid_block", True),
                              "motion_layers": ("motion_transformer_layers_per_block", 1),
                              "norm_num_groups": ("motion_norm_num_groups", 32),
                              "layers_per_block": ("motion_layers_per_block", 2)})
    found["block_out_channels"] = Found(tuple(c.get("block_out_channels", (320, 640, 1280, 1280))),
                                        f"{path} (block_out_channels)")
    found["use_motion_modules"] = Found(True, f"{path} (a motion adapter)")
    return found


def motion_from_state_dict(state: Mapping[str, np.ndarray], source: str) -> Fields:
    """Motion modules in the diffusers MotionAdapter layout (either file layout, renamed): sizes, mid-block presence
    and table length from the keys and shapes; heads as AnimateDiff's (8)."""
    where = f"{source} (shapes)"
    levels = _count(state, r"down_blocks\.(\d+)\.motion_modules\.")
    found = {"use_motion_modules": Found(True, f"{source} (motion modules)"),
             "block_out_channels": Found(tuple(
                 _shape(state, f"down_blocks.{i}.motion_modules.0.proj_in.weight", source)[0] for i in range(levels)),
                 where),
             "layers_per_block": Found(_count(state, r"down_blocks\.0\.motion_modules\.(\d+)\."), where),
             "motion_layers": Found(_count(state, r"down_blocks\.0\.motion_modules\.0\.transformer_blocks\.(\d+)\."),
                                    where),
             "motion_mid_block": Found(any(k.startswith("mid_block.") for k in state), f"{source} (keys)"),
             "motion_num_heads": Found(8, f"{source} (AnimateDiff; not in the file)", certain=False)}
    tables = sorted(k for k in state if k.endswith(".pe"))
    if tables:  # length of the stored sinusoidal table: 24 in v1, 32 in v2/v3
        found["motion_max_seq_length"] = Found(int(np.shape(state[tables[0]])[-2]), f"{source} (shape of {tables[0]})")
    return found


# ---------------------------------------------------------------------------------------------------------------
# IP-Adapter.

def ip_adapter_from_state_dict(state: Mapping[str, np.ndarray], source: str, layout: str) -> Fields:
    """Image tokens and widths from the projection's shapes (`layout`: "original" or "diffusers")."""
    proj, norm = (("image_proj.proj.weight", "image_proj.norm.weight") if layout == "original" else
                  ("encoder_hid_proj.image_projection_layers.0.image_embeds.weight",
                   "encoder_hid_proj.image_projection_layers.0.norm.weight"))
    out, embed = _shape(state, proj, source)
    cross = _shape(state, norm, source)[0]
    where = f"{source} (shape of {proj})"
    return {"ip_adapter": Found(True, f"{source} (an IP-Adapter)"), "ip_tokens": Found(out // cross, where),
            "image_embed_dim": Found(embed, where), "cross_attention_dim": Found(cross, f"{source} (shape of {norm})")}


# ---------------------------------------------------------------------------------------------------------------
# VAE (AutoencoderKL).

def vae_from_config(path: Path, c: Mapping[str, Any]) -> Fields:
    """A diffusers AutoencoderKL config.json."""
    problems = []
    for field, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != block for t in c.get(field, ())):
            problems.append(f"{field}={c[field]} (only {block})")
    if c.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={c['act_fn']!r} (only 'silu')")
    problems += [f"{k}=False (only True)" for k in ("use_quant_conv", "use_post_quant_conv") if not c.get(k, True)]
    problems += [f"{k}={c[k]!r} (only None, as in SD 1.x)" for k in ("shift_factor", "latents_mean", "latents_std")
                 if c.get(k) is not None]
    _unsupported(path, problems)
    found = _stated(path, c, {"in_channels": ("in_channels", 3), "out_channels": ("out_channels", 3),
                              "layers_per_block": ("layers_per_block", 1), "latent_channels": ("latent_channels", 4),
                              "norm_num_groups": ("norm_num_groups", 32), "scaling_factor": ("scaling_factor", 0.18215),
                              "mid_block_add_attention": ("mid_block_add_attention", True)})
    found["block_out_channels"] = Found(tuple(c.get("block_out_channels", (64,))), f"{path} (block_out_channels)")
    return found


def vae_from_state_dict(state: Mapping[str, np.ndarray], source: str) -> Fields:
    """A diffusers-named AutoencoderKL state dict: sizes from shapes; norm groups and scaling factor as SD 1.x's."""
    where = f"{source} (shapes)"
    levels = _count(state, r"encoder\.down_blocks\.(\d+)\.")
    sd1 = f"{source} (SD 1.x; not in the file)"
    return {"block_out_channels": Found(tuple(_shape(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight",
                                                     source)[0] for i in range(levels)), where),
            "layers_per_block": Found(_count(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."), where),
            "in_channels": Found(_shape(state, "encoder.conv_in.weight", source)[1], where),
            "out_channels": Found(_shape(state, "decoder.conv_out.weight", source)[0], where),
            "latent_channels": Found(_shape(state, "decoder.conv_in.weight", source)[1], where),
            "mid_block_add_attention": Found(any(k.startswith("encoder.mid_block.attentions.") for k in state),
                                             f"{source} (keys)"),
            "norm_num_groups": Found(32, sd1, certain=False), "scaling_factor": Found(0.18215, sd1, certain=False)}


# ---------------------------------------------------------------------------------------------------------------
# CLIP text and vision towers (transformers).

_CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_CLIP_VISION = {"image_size": 224, "patch_size": 32, "hidden_size": 768, "intermediate_size": 3072,
                "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3, "projection_dim": 512,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def _clip_from_config(path: Path, c: Mapping[str, Any], sub: str, defaults: Mapping[str, Any]) -> Fields:
    """transformers' defaults for absent fields (what `from_pretrained` would build); a full CLIPConfig gives its
    `sub` part."""
    c = c.get(sub) or c
    for field in ("image_size", "patch_size"):
        if isinstance(c.get(field), (list, tuple)):
            raise ValueError(f"{path}: {field}={c[field]}; only square CLIP images and patches are supported")
    return _stated(path, c, {k: (k, v) for k, v in defaults.items()})


def text_encoder_from_config(path: Path, c: Mapping[str, Any]) -> Fields:
    """A transformers CLIPTextModel config.json."""
    return _clip_from_config(path, c, "text_config", _CLIP_TEXT)


def image_encoder_from_config(path: Path, c: Mapping[str, Any]) -> Fields:
    """A transformers CLIPVisionModelWithProjection config.json."""
    return _clip_from_config(path, c, "vision_config", _CLIP_VISION)


def text_encoder_from_state_dict(state: Mapping[str, np.ndarray], source: str) -> Fields:
    """A transformers-named CLIPTextModel state dict: sizes from shapes; 64-wide heads and the rest as SD 1.x's."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}  # files keep the prefix, memory may not
    where = f"{source} (shapes)"
    vocab, hidden = _shape(state, "embeddings.token_embedding.weight", source)
    sd1 = f"{source} (SD 1.x CLIP text; not in the file)"
    return {"vocab_size": Found(vocab, where), "hidden_size": Found(hidden, where),
            "intermediate_size": Found(_shape(state, "encoder.layers.0.mlp.fc1.weight", source)[0], where),
            "num_hidden_layers": Found(_count(state, r"encoder\.layers\.(\d+)\."), where),
            "max_position_embeddings": Found(
                _shape(state, "embeddings.position_embedding.weight", source)[0], where),
            "num_attention_heads": Found(hidden // 64, sd1, certain=False),
            "hidden_act": Found("quick_gelu", sd1, certain=False), "eos_token_id": Found(2, sd1, certain=False)}


# ---------------------------------------------------------------------------------------------------------------
# One part's architecture: its folder's config.json when it has one, else its tensors' shapes.

_READERS = {"unet": (unet_from_config, unet_from_state_dict), "vae": (vae_from_config, vae_from_state_dict),
            "text_encoder": (text_encoder_from_config, text_encoder_from_state_dict),
            "image_encoder": (image_encoder_from_config, None)}
# Widths another part must share: the UNet's context is the text encoder's output, its image embedding the image
# encoder's projection.
_SHARED = {"text_encoder": ("hidden_size", "cross_attention_dim"), "image_encoder": ("projection_dim",
                                                                                     "image_embed_dim")}


def describe(section: str, path: str | Path, state: Mapping[str, np.ndarray]) -> Architecture:
    """The architecture of one part (`section` of config.model) read from `path` (folder or file) and its state
    dict (diffusers/transformers names)."""
    path = Path(path)
    from_config, from_state = _READERS[section]
    stated = read_config(path) if path.is_dir() else None
    if stated is not None:
        fields = from_config(*stated)
    elif from_state is not None:
        fields = from_state(state, str(path))
    else:
        raise ValueError(f"{path}: no config.json, which is where a {section} folder states its architecture")
    out: Architecture = {section: fields}
    if section in _SHARED and _SHARED[section][0] in fields:
        theirs, ours = _SHARED[section]
        out["unet"] = {ours: fields[theirs]}
    return out


def describe_motion(path: str | Path, state: Mapping[str, np.ndarray]) -> Architecture:
    """Motion modules (diffusers layout, see `motion.to_diffusers_layout`): the folder's config.json and the keys and
    shapes, which must agree. Which levels have spatial attention is the UNet's business; alone, a motion file
    implies SD's pattern (every level but the deepest)."""
    parts = [{"unet": motion_from_state_dict(state, str(path))}]
    stated = read_config(path) if Path(path).is_dir() else None
    if stated is not None:
        parts.insert(0, {"unet": motion_from_config(*stated)})
    levels = len(parts[-1]["unet"]["block_out_channels"].value)
    parts.append({"unet": {"down_attention": Found((True,) * (levels - 1) + (False,),
                                                   f"{path} (SD's pattern for {levels} levels; not in the file)",
                                                   certain=False)}})
    return merge_architectures(*parts)


def describe_ip_adapter(path: str | Path, state: Mapping[str, np.ndarray], layout: str) -> Architecture:
    return {"unet": ip_adapter_from_state_dict(state, str(path), layout)}
