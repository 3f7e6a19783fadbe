"""SD VAE weights (diffusers `AutoencoderKL` folder, or the original single-file layout) -> `models.vae` params.

Original layout facts (from diffusers `loaders/single_file_utils.py::convert_ldm_vae_checkpoint`): keys carry the
prefix `first_stage_model.` inside a full SD checkpoint (none in a stand-alone VAE file); `down.{i}.block.{j}` ->
`down_blocks.{i}.resnets.{j}`; `up.{b}.block.{j}` -> `up_blocks.{n-1-b}.resnets.{j}` (the decoder's up blocks are
numbered in reverse); `nin_shortcut` -> `conv_shortcut`; `norm_out` -> `conv_norm_out`; `mid.block_{1,2}` ->
`mid_block.resnets.{0,1}`; `mid.attn_1.{norm,q,k,v,proj_out}` -> `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,
to_out.0}` where q/k/v/proj_out are 1x1 convs (squeezed to linear weights).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from atomo_jax.convert import architecture
from atomo_jax.convert.torch_io import convert_state_dict, load_state_dict
from atomo_jax.models.vae import AutoencoderKL, VAEConfig

LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Names of the mid attention in diffusers checkpoints saved before diffusers 0.14.
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_ldm_vae(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(LDM_VAE_PREFIXES) or k.startswith(("encoder.down.", "decoder.up.")) for k in state_dict)


def ldm_vae_to_diffusers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Original (LDM) VAE keys -> diffusers `AutoencoderKL` keys. Takes a full SD checkpoint (only `first_stage_model.`
    keys are used) or a stand-alone VAE file. Keys it does not know pass through unchanged so that loading reports
    them; the VAE's training-loss weights (`loss.*`) are dropped."""
    prefix = next((p for p in LDM_VAE_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
    vae = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and not
           k[len(prefix):].startswith("loss.")}
    up_ids = [int(m.group(1)) for k in vae for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m]
    num_up = max(up_ids) + 1 if up_ids else 0
    out = {}
    for key, value in vae.items():
        new = key
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                     lambda m: f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}.resnets.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                     lambda m: f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}.upsamplers.0.", new)
        new = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.",
                     lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", new)
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", new)
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", new)
        if m:
            new = f"{m.group(1)}.mid_block.attentions.0.{_LDM_ATTN[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "norm" and value.ndim == 4:
                value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[new] = value
    return out


def _rename_diffusers(key: str) -> str:
    m = re.match(r"^(.*\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
    return f"{m.group(1)}.{_DEPRECATED_ATTN[m.group(2)]}.{m.group(3)}" if m else key


def vae_param_shapes(config: VAEConfig) -> Any:
    """`jax.eval_shape` of the VAE's variables (no memory is allocated)."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)


def vae_params_from_torch(state_dict: Mapping[str, np.ndarray], config: VAEConfig = VAEConfig(), *,
                          source: str = "VAE checkpoint") -> dict[str, Any]:
    """diffusers or original-layout VAE state dict -> `{"params": ...}` for `AutoencoderKL(config)`; all or nothing."""
    if is_ldm_vae(state_dict):
        state_dict = ldm_vae_to_diffusers(state_dict)
    return convert_state_dict(state_dict, vae_param_shapes(config), rename=_rename_diffusers, source=source,
                              prefix="params")


def load_vae(path: str | Path, config: VAEConfig | None = None) -> tuple[VAEConfig, dict[str, Any]]:
    """A diffusers VAE folder, a stand-alone VAE file or a full original SD checkpoint -> (config, {"params": ...});
    without `config`, the architecture is the folder's config.json or the file's shapes (`architecture.describe`)."""
    path = Path(path)
    state = load_state_dict(path)
    if is_ldm_vae(state):
        state = ldm_vae_to_diffusers(state)
    if config is None:
        config = architecture.dataclass_from(VAEConfig, architecture.describe("vae", path, state)["vae"])
    return config, vae_params_from_torch(state, config, source=str(path))
