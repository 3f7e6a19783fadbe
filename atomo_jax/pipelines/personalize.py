"""Personalised bases: swap the spatial (SD 1.5) weights of another fine-tune into a trained video UNet.

The temporal layers learned on top of SD 1.5 transfer to SD 1.5 fine-tunes (as AnimateDiff's motion modules do), so
at sampling time every spatial parameter is replaced by the fine-tune's, while temporal convolutions, motion modules
and IP-Adapter parameters stay. `conv_in` takes 9 input channels here and 4 in SD: only its first 4 input channels
(the noisy latent) are replaced; the mask and image-latent channels learned in training stay.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax.numpy as jnp

from atomo_jax.models.unet import UNetConfig
from atomo_jax.convert import torch_io, unet

KEPT_MARKERS = ("temp_convs", "motion_modules", "to_k_ip", "to_v_ip", "image_proj")
CONV_IN = "conv_in/kernel"


def is_kept(path: str) -> bool:
    """Temporal and IP-Adapter parameters: kept from the video model when swapping in a base."""
    return any(marker in path for marker in KEPT_MARKERS)


def _flat(tree: Any) -> dict[str, Any]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(flax.linen.meta.unbox(tree)), sep="/")


def swap_spatial_weights(unet_params: Any, base_params: Any) -> dict[str, Any]:
    """Our UNet params with every spatial parameter taken from `base_params` (an SD 1.5 UNet in our layout; any
    temporal or IP-Adapter entries in it are ignored). Raises ValueError listing every missing/extra/mis-shaped key."""
    ours, base = _flat(unet_params), _flat(base_params)
    spatial = {k for k in ours if not is_kept(k)}
    base_spatial = {k for k in base if not is_kept(k)}
    problems = [f"missing in the base: {k}" for k in sorted(spatial - base_spatial)]
    problems += [f"not in the video UNet: {k}" for k in sorted(base_spatial - spatial)]
    out = dict(ours)
    for k in sorted(spatial & base_spatial):
        mine, theirs = ours[k], jnp.asarray(base[k], jnp.float32)
        if k == CONV_IN and theirs.ndim == 4 and theirs.shape[2] < mine.shape[2] \
                and theirs.shape[:2] + theirs.shape[3:] == mine.shape[:2] + mine.shape[3:]:
            out[k] = jnp.asarray(mine).at[:, :, :theirs.shape[2], :].set(theirs)
        elif theirs.shape != mine.shape:
            problems.append(f"shape of {k}: base {tuple(theirs.shape)}, video UNet {tuple(mine.shape)}")
        else:
            out[k] = theirs.astype(jnp.asarray(mine).dtype)
    if problems:
        raise ValueError(f"the base UNet does not fit this video UNet ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))
    return flax.traverse_util.unflatten_dict(out, sep="/")


def spatial_config(config: UNetConfig) -> UNetConfig:
    """The SD 1.5 UNet that matches the spatial part of `config`: 4 input channels, no temporal/IP layers."""
    return dataclasses.replace(config, in_channels=4, use_temporal_conv=False, use_motion_modules=False,
                               ip_adapter=False)


def load_base_unet(path: str, config: UNetConfig) -> dict[str, Any]:
    """Reads an SD 1.5 fine-tune's UNet (a diffusers pipeline folder with unet/, a UNet folder, or a
    .safetensors/.bin file with diffusers key names) into our layout for `spatial_config(config)`."""

    if not os.path.exists(path):
        raise FileNotFoundError(f"--base {path}: no such file or folder (expected an SD 1.5 diffusers folder "
                                "with unet/, a UNet folder, or a UNet .safetensors file)")
    if os.path.isdir(os.path.join(path, "unet")):
        path = os.path.join(path, "unet")
    params, _ = unet.load_unet_state_dict(torch_io.load_state_dict(path), spatial_config(config),
                                          new_ok=lambda p: False, source=str(path))
    return params
