"""Long videos by frame prediction: each new window is conditioned on the last L frames of the previous one.

Window 1 is image-to-video. Window k > 1 gets the last L latents of window k-1 as given frames (mask 1 on frames
0..L-1) and the CLIP embedding of the original image; it contributes its F - L new frames. K windows of F frames
give F + (K - 1) (F - L) frames with no duplicated frame at the joins. The given frames are kept exactly in each
window's latents, so the join has no seam in latent space.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from atomo_jax.diffusion.guidance import Conditioning, GuidanceConfig
from atomo_jax.diffusion.samplers import SamplerConfig
from atomo_jax.pipelines import i2v

Params = dict[str, Any]


def num_output_frames(num_frames: int, num_windows: int, num_given: int) -> int:
    return num_frames + (num_windows - 1) * (num_frames - num_given)


def next_window_conditioning(cond: Conditioning, previous: jax.Array, num_given: int) -> Conditioning:
    """The first window's conditioning with its given frames replaced by the last `num_given` latents of
    `previous` (B, F, h, w, 4); the image embedding and the prompt contexts stay."""
    b, f = previous.shape[:2]
    given = jnp.zeros_like(previous).at[:, :num_given].set(previous[:, f - num_given:])
    mask = jnp.zeros((b, f), jnp.float32).at[:, :num_given].set(1.0)
    return cond.replace(mask=mask, given_latents=given)


def join_windows(windows: Sequence[jax.Array], num_given: int) -> jax.Array:
    """Concatenates windows on the frame axis, dropping each later window's `num_given` given frames."""
    return jnp.concatenate([windows[0]] + [w[:, num_given:] for w in windows[1:]], axis=1)


def long_video(model: Any, params: Params, image: jax.Array, rng: jax.Array, *, num_frames: int, num_windows: int,
               num_given: int, sampler: SamplerConfig, guidance: GuidanceConfig,
               prompt_tokens: jax.Array | None = None, empty_tokens: jax.Array | None = None,
               frames_per_chunk: int = 8, progress: bool = True) -> i2v.Video:
    """image (B, H, W, 3) in [-1, 1] -> Video of num_output_frames(num_frames, num_windows, num_given) frames."""
    if num_windows < 1:
        raise ValueError(f"num_windows={num_windows}: expected >= 1")
    if not 0 < num_given < num_frames:
        raise ValueError(f"num_given={num_given}: expected 0 < num_given < num_frames={num_frames}")
    first = i2v.i2v_conditioning(model, params, image, num_frames, prompt_tokens=prompt_tokens,
                                 empty_tokens=empty_tokens)
    windows = []
    for k in tqdm(range(num_windows), desc="windows", unit="window", disable=not progress):
        cond = first if k == 0 else next_window_conditioning(first, windows[-1], num_given)
        # Same shapes and static configs in every window: compiled once, reused.
        windows.append(i2v.denoise(model, params, jax.random.fold_in(rng, k), cond, sampler, guidance))
    latents = join_windows(windows, num_given)
    return i2v.Video(i2v.decode(model, params, latents, frames_per_chunk=frames_per_chunk, progress=progress),
                     latents)
