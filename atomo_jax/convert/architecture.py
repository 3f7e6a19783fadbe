"""The checkpoint's own description of its architecture (diffusers `config.json`) checked against our config.

Head counts, norm groups and epsilons never show in tensor shapes, so a wrong one would import without a single
mis-shaped key and give wrong numbers; only the checkpoint's config can catch it. Every field we can compare is
compared, and any disagreement is one error naming the file, the field and both values.

diffusers' SD 1.x UNet configs say `attention_head_dim: 8` but mean 8 heads (a historical misnomer that diffusers
keeps for compatibility): `num_attention_heads`, when set, wins; otherwise `attention_head_dim` is the head count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atomo_jax.models.unet import UNetConfig


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


def _compare(pairs: list[tuple[str, Any, str, Any]], path: Path) -> None:
    diff = [f"{field}={theirs!r} in the file but config.model.unet.{key}={ours!r}"
            for field, theirs, key, ours in pairs if theirs != ours]
    if diff:
        raise ValueError(f"{path}: the checkpoint's architecture differs from the config: " + "; ".join(diff)
                         + ". Set those config.model.unet keys to the checkpoint's values.")


def check_unet(folder: str | Path, config: UNetConfig) -> None:
    """A diffusers UNet2DConditionModel folder's config.json against our spatial UNet fields."""
    found = read_config(folder)
    if found is None:
        return
    path, c = found
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    down = c.get("down_block_types", ())
    pairs = [
        ("block_out_channels", tuple(c.get("block_out_channels", ())), "block_out_channels", config.block_out_channels),
        ("layers_per_block", _one(c.get("layers_per_block", 2), "layers_per_block", path), "layers_per_block",
         config.layers_per_block),
        ("num_attention_heads (attention_head_dim)", _one(heads, "attention heads", path), "num_attention_heads",
         config.num_attention_heads),
        ("cross_attention_dim", _one(c.get("cross_attention_dim", 1280), "cross_attention_dim", path),
         "cross_attention_dim", config.cross_attention_dim),
        ("norm_num_groups", c.get("norm_num_groups", 32), "norm_num_groups", config.norm_num_groups),
        ("norm_eps", c.get("norm_eps", 1e-5), "norm_eps", config.norm_eps),
        ("transformer_layers_per_block", _one(c.get("transformer_layers_per_block", 1), "transformer layers", path),
         "transformer_layers", config.transformer_layers),
        ("down_block_types (with attention)", tuple("CrossAttn" in t for t in down), "down_attention",
         tuple(config.down_attention)),
    ]
    act = c.get("act_fn", "silu")
    if act != "silu":
        raise ValueError(f"{path}: act_fn={act!r}; atomo_jax's UNet uses 'silu' (SD 1.x/2.x)")
    _compare(pairs, path)


def check_motion_adapter(folder: str | Path, config: UNetConfig) -> None:
    """A diffusers MotionAdapter folder's config.json against our temporal-attention fields."""
    found = read_config(folder)
    if found is None:
        return
    path, c = found
    pairs = [
        ("block_out_channels", tuple(c.get("block_out_channels", ())), "block_out_channels", config.block_out_channels),
        ("motion_num_attention_heads", _one(c.get("motion_num_attention_heads", 8), "motion heads", path),
         "motion_num_heads", config.motion_num_heads),
        ("motion_max_seq_length", c.get("motion_max_seq_length", 32), "motion_max_seq_length",
         config.motion_max_seq_length),
        ("use_motion_mid_block", c.get("use_motion_mid_block", True), "motion_mid_block", config.motion_mid_block),
        ("motion_norm_num_groups", c.get("motion_norm_num_groups", 32), "norm_num_groups", config.norm_num_groups),
        ("motion_layers_per_block", _one(c.get("motion_layers_per_block", 2), "motion layers", path),
         "layers_per_block", config.layers_per_block),
        ("motion_transformer_layers_per_block",
         _one(c.get("motion_transformer_layers_per_block", 1), "motion transformer layers", path), "motion_layers",
         config.motion_layers),
    ]
    _compare(pairs, path)
