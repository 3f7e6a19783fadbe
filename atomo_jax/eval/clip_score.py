"""CLIP embeddings for the similarity metrics: image/frame embeddings and prompt embeddings in one space.

AIGCBench scores with OpenAI CLIP ViT-L/14 (`encode_image` / `encode_text`: the projected embeddings), cosine
similarity, no logit scale. The matching transformers checkpoint is a `CLIPModel` folder (e.g.
`openai/clip-vit-large-patch14`: `text_model.*`, `vision_model.*`, `text_projection`, `visual_projection`).
Separate `CLIPVisionModelWithProjection` and `CLIPTextModelWithProjection` folders work too, as long as they come
from the same CLIP (the IP-Adapter image encoder and the SD 1.5 text encoder do not share a space, and SD's text
encoder has no projection).

`models.clip.CLIPTextModel` stops at the pooled output, so this module adds `CLIPTextModelWithProjection`: the text
model under `text_model/` plus the bias-free `text_projection`, as in transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atomo_jax.convert import clip as convert_clip
from atomo_jax.convert.torch_io import load_state_dict
from atomo_jax.models import layers
from atomo_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection, \
    clip_preprocess
from atomo_jax.parallel import axes as ax
from atomo_jax.models.tokenizer import load_clip_tokenizer, tokenize

_TEXT_PROJECTION = "text_projection.weight"
_VISUAL_PROJECTION = "visual_projection.weight"


class CLIPTextModelWithProjection(nn.Module):
    """input_ids (B, L) int -> text embeddings (B, projection_dim): `text_projection` of the pooled (EOS) output."""

    config: CLIPTextConfig = CLIPTextConfig()
    projection_dim: int = 768
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        pooled = CLIPTextModel(self.config, dtype=self.dtype, name="text_model")(input_ids).pooled_output
        return layers.dense(self.projection_dim, axes=(ax.EMBED, ax.MLP), use_bias=False, dtype=self.dtype,
                            name="text_projection")(pooled)


def _read_config(path: Path) -> dict[str, Any] | None:
    file = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _load_vision(path: Path, state_dict: Mapping[str, np.ndarray]) -> tuple[CLIPVisionConfig, dict]:
    """The vision tower + visual projection of a CLIPModel or CLIPVisionModelWithProjection checkpoint."""
    sub = {k: v for k, v in state_dict.items() if k.startswith("vision_model.") or k == _VISUAL_PROJECTION}
    if _VISUAL_PROJECTION not in sub:
        raise ValueError(f"{path}: no CLIP vision tower with projection (expected 'vision_model.*' and "
                         f"'{_VISUAL_PROJECTION}' keys, as in a transformers CLIPModel or "
                         f"CLIPVisionModelWithProjection checkpoint)")
    raw = _read_config(path)
    if raw is None:
        raise FileNotFoundError(f"{path}: no config.json next to the weights; the CLIP vision config is read from it")
    config = convert_clip.vision_config_from_transformers(raw)
    # A CLIPModel's projection width is its top-level projection_dim, not vision_config's: trust the weight.
    config = dataclasses.replace(config, projection_dim=int(sub[_VISUAL_PROJECTION].shape[0]))
    return config, convert_clip.vision_params_from_torch(sub, config, source=str(path))


def _load_text(path: Path, state_dict: Mapping[str, np.ndarray]) -> tuple[CLIPTextConfig, int, dict]:
    """The text tower + text projection of a CLIPModel or CLIPTextModelWithProjection checkpoint."""
    if _TEXT_PROJECTION not in state_dict:
        raise ValueError(f"{path}: no '{_TEXT_PROJECTION}': CLIP text-to-video similarity needs the text projection "
                         "of a transformers CLIPModel or CLIPTextModelWithProjection (the SD 1.5 text encoder is a "
                         "plain CLIPTextModel and has none)")
    towers = ("vision_model.", "visual_projection.", "logit_scale", _TEXT_PROJECTION)
    sub = {k: v for k, v in state_dict.items() if not k.startswith(towers)}
    raw = _read_config(path)
    config = convert_clip.text_config_from_transformers(raw) if raw else CLIPTextConfig()
    projection = np.asarray(state_dict[_TEXT_PROJECTION])
    if projection.shape[1] != config.hidden_size:
        raise ValueError(f"{path}: {_TEXT_PROJECTION} has shape {projection.shape}, expected "
                         f"(projection_dim, {config.hidden_size})")
    params = convert_clip.text_params_from_torch(sub, config, source=str(path))["params"]
    return config, projection.shape[0], {"params": {"text_model": params,
                                                    "text_projection": {"kernel": projection.T.astype(np.float32)}}}


@dataclasses.dataclass
class CLIPScorer:
    """Projected CLIP embeddings of uint8 images and of prompts (text part optional)."""

    vision_config: CLIPVisionConfig
    vision_params: dict
    text_config: CLIPTextConfig | None = None
    text_projection_dim: int | None = None
    text_params: dict | None = None
    tokenizer: Any = None
    batch_size: int = 16

    def __post_init__(self):
        size = self.vision_config.image_size
        vision = CLIPVisionModelWithProjection(self.vision_config)
        self._image_fn = jax.jit(lambda p, x: vision.apply(p, clip_preprocess(x / 127.5 - 1.0, size)).image_embeds)
        if self.text_params is not None:
            text = CLIPTextModelWithProjection(self.text_config, self.text_projection_dim)
            self._text_fn = jax.jit(text.apply)
            if self.text_projection_dim != self.vision_config.projection_dim:
                raise ValueError(f"CLIP text projection width {self.text_projection_dim} differs from the vision "
                                 f"projection width {self.vision_config.projection_dim}: the text and image weights "
                                 "come from different CLIP models")

    @property
    def has_text(self) -> bool:
        return self.text_params is not None and self.tokenizer is not None

    def _batched(self, fn: Callable, params: dict, x: np.ndarray) -> np.ndarray:
        """Fixed-size batches (the last one padded) so that one compiled function serves every video."""
        out = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
            out.append(np.asarray(fn(params, jnp.asarray(chunk)))[:len(chunk) - pad])
        return np.concatenate(out)

    def image_embeds(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 (any size: resized + centre-cropped as CLIPImageProcessor) -> (N, projection_dim)."""
        return self._batched(self._image_fn, self.vision_params, np.asarray(images, np.float32))

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> (N, projection_dim)."""
        if not self.has_text:
            raise ValueError("this CLIPScorer has no text model/tokenizer; load it with text weights")

        ids = tokenize(self.tokenizer, list(prompts), self.text_config.max_position_embeddings)
        return self._batched(self._text_fn, self.text_params, ids)


def load_clip(clip: str | Path | None = None, *, vision: str | Path | None = None, text: str | Path | None = None,
              tokenizer: str | Path | None = None, with_text: bool = True, batch_size: int = 16) -> CLIPScorer:
    """Builds a `CLIPScorer` from transformers checkpoints (folders or weight files, config.json beside them).

    `clip`: a full `CLIPModel` (vision and text). `vision` / `text`: separate `CLIPVisionModelWithProjection` /
    `CLIPTextModelWithProjection` checkpoints, overriding the parts of `clip`. `tokenizer`: a CLIP tokenizer folder
    (default: the text checkpoint's folder). `with_text=False` skips the text part.
    """
    vision_path, text_path = vision or clip, text or clip
    if vision_path is None:
        raise ValueError("CLIP metrics need CLIP vision weights: pass a CLIPModel folder or a "
                         "CLIPVisionModelWithProjection folder")
    cache: dict[Path, dict[str, np.ndarray]] = {}

    def state_dict(path: Path) -> dict[str, np.ndarray]:
        if path not in cache:
            cache[path] = load_state_dict(path)
        return cache[path]

    vision_path = Path(vision_path)
    vision_config, vision_params = _load_vision(vision_path, state_dict(vision_path))
    scorer = dict(vision_config=vision_config, vision_params=vision_params, batch_size=batch_size)
    if with_text:
        if text_path is None:
            raise ValueError("CLIP text-to-video similarity needs CLIP text weights: pass a CLIPModel folder or a "
                             "CLIPTextModelWithProjection folder")

        text_path = Path(text_path)
        text_config, projection_dim, text_params = _load_text(text_path, state_dict(text_path))
        folder = Path(tokenizer) if tokenizer else (text_path if text_path.is_dir() else text_path.parent)
        scorer.update(text_config=text_config, text_projection_dim=projection_dim, text_params=text_params,
                      tokenizer=load_clip_tokenizer(folder, expected_vocab_size=text_config.vocab_size))
    return CLIPScorer(**scorer)
