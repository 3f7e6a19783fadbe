"""CLIP weights (transformers folders, or the text encoder inside an original SD checkpoint) -> `models.clip` params.

Original layout fact (diffusers `loaders/single_file_utils.py::convert_ldm_clip_checkpoint`): the SD 1.x text encoder
is a transformers `CLIPTextModel` stored under the prefix `cond_stage_model.transformer.`; removing the prefix gives
transformers keys (`text_model.embeddings.token_embedding.weight`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from atomo_jax.convert import architecture
from atomo_jax.convert.torch_io import convert_state_dict, load_state_dict
from atomo_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

LDM_TEXT_PREFIXES = ("cond_stage_model.transformer.",)
_TEXT_EMBEDDINGS = ("embeddings.token_embedding", "embeddings.position_embedding")
_VISION_EMBEDDINGS = ("vision_model.embeddings.position_embedding",)


def ldm_text_encoder_to_transformers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keeps the text-encoder keys of an original SD checkpoint, without their `cond_stage_model.transformer.`
    prefix; every other key (UNet, VAE, ...) is left out."""
    out = {}
    for key, value in state_dict.items():
        for prefix in LDM_TEXT_PREFIXES:
            if key.startswith(prefix):
                out[key[len(prefix):]] = value
    return out


def _rename_text(key: str) -> str | None:
    key = key.removeprefix("text_model.")  # transformers >= 5 drops this prefix in memory, files keep it
    return None if key == "embeddings.position_ids" else key


def _rename_vision(key: str) -> str | None:
    return None if key == "vision_model.embeddings.position_ids" else key


def text_param_shapes(config: CLIPTextConfig) -> Any:
    ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(CLIPTextModel(config).init, jax.random.key(0), ids)


def vision_param_shapes(config: CLIPVisionConfig) -> Any:
    px = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    return jax.eval_shape(CLIPVisionModelWithProjection(config).init, jax.random.key(0), px)


def text_params_from_torch(state_dict: Mapping[str, np.ndarray], config: CLIPTextConfig = CLIPTextConfig(), *,
                           source: str = "text encoder checkpoint") -> dict[str, Any]:
    """transformers `CLIPTextModel` state dict, or a full original SD checkpoint -> `{"params": ...}`."""
    if any(k.startswith(LDM_TEXT_PREFIXES) for k in state_dict):
        state_dict = ldm_text_encoder_to_transformers(state_dict)
    return convert_state_dict(state_dict, text_param_shapes(config), rename=_rename_text,
                              embeddings=_TEXT_EMBEDDINGS, source=source, prefix="params")


def vision_params_from_torch(state_dict: Mapping[str, np.ndarray], config: CLIPVisionConfig = CLIPVisionConfig(),
                             *, source: str = "image encoder checkpoint") -> dict[str, Any]:
    """transformers `CLIPVisionModelWithProjection` state dict -> `{"params": ...}`."""
    return convert_state_dict(state_dict, vision_param_shapes(config), rename=_rename_vision,
                              embeddings=_VISION_EMBEDDINGS, source=source, prefix="params")


def text_config_from_transformers(config: Mapping[str, Any], path: str | Path = "config.json") -> CLIPTextConfig:
    """A transformers CLIP(Text)Config as a dict -> our config."""
    return architecture.dataclass_from(CLIPTextConfig, architecture.text_encoder_from_config(Path(path), config))


def vision_config_from_transformers(config: Mapping[str, Any], path: str | Path = "config.json") -> CLIPVisionConfig:
    """A transformers CLIP(Vision)Config as a dict -> our config."""
    return architecture.dataclass_from(CLIPVisionConfig, architecture.image_encoder_from_config(Path(path), config))


def load_text_encoder(path: str | Path, config: CLIPTextConfig | None = None) -> tuple[CLIPTextConfig, dict]:
    """A transformers CLIPTextModel folder or a full original SD checkpoint -> (config, {"params": ...}); without
    `config`, the architecture is the folder's config.json or the file's shapes (`architecture.describe`)."""
    path = Path(path)
    state = load_state_dict(path)
    if any(k.startswith(LDM_TEXT_PREFIXES) for k in state):
        state = ldm_text_encoder_to_transformers(state)
    if config is None:
        config = architecture.dataclass_from(CLIPTextConfig,
                                             architecture.describe("text_encoder", path, state)["text_encoder"])
    return config, text_params_from_torch(state, config, source=str(path))


def load_image_encoder(path: str | Path, config: CLIPVisionConfig | None = None) -> tuple[CLIPVisionConfig, dict]:
    """A transformers CLIPVisionModelWithProjection folder (e.g. IP-Adapter's `models/image_encoder`) ->
    (config, {"params": ...}); without `config`, the architecture is the folder's config.json."""
    path = Path(path)
    state = load_state_dict(path)
    if config is None:
        config = architecture.dataclass_from(CLIPVisionConfig,
                                             architecture.describe("image_encoder", path, state)["image_encoder"])
    return config, vision_params_from_torch(state, config, source=str(path))
