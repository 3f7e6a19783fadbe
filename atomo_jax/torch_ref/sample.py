"""PyTorch image-to-video from an `atomo_jax.export` folder, on diffusers' DDIMScheduler (PyTorch only, no jax).

  python -m atomo_jax.torch_ref.sample --export /tmp/atomo_demo_torch --image cat.png --out out/cat.mp4 \
      [--steps 25] [--num_frames 16] [--image_scale 2.0] [--text_scale 7.5] [--rescale 0.7] [--seed 0] \
      [--prompt "a cat" --tokenizer /weights/sd15/tokenizer]

Same procedure as `atomo_jax.pipelines.i2v`: frame 0 carries the image latent with mask 1 (the 9-channel input), the
CLIP image embedding feeds the IP-Adapter, sampling starts from pure Gaussian noise with DDIM under the training
schedule (zero terminal SNR, trailing spacing, v-prediction), and classifier-free guidance runs the branches of
`atomo_jax.diffusion.guidance` (u = no image/no text, i = image, it = image + text) in one batched UNet call:
  out = u + s_img (i - u) + s_txt (it - i), then guidance rescale with phi.
"Image dropped" zeroes the image embedding AND the given latents (mask kept); "text dropped" is the empty prompt.
Defaults (steps, scales, frames, resolution) come from the export's training config (`config.sample`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from torch import nn
from transformers import CLIPTextModel, CLIPVisionModelWithProjection

from atomo_jax.pipelines import video_io  # numpy + Pillow + av only, no jax
from atomo_jax.torch_ref.model import AtomoUNet, read_atomo_config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The demo's weightless autoencoder: 3 columns of the 4x4 Hadamard matrix / 2 (atomo_jax.models.pixel_autoencoder).
_RGB_TO_LATENT = torch.tensor([[1, 1, 1], [1, -1, 1], [1, 1, -1], [1, -1, -1]], dtype=torch.float32) / 2.0


class PixelAutoencoder(nn.Module):
    """Encode: average-pool by `factor`, fixed 3 -> 4 channel map; decode: its transpose, nearest upsampling."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 4, H/f, W/f)
        x = nn.functional.avg_pool2d(x, self.factor)
        return torch.einsum("nkhw,ck->nchw", x, _RGB_TO_LATENT.to(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("nchw,ck->nkhw", z, _RGB_TO_LATENT.to(z))
        return x.repeat_interleave(self.factor, 2).repeat_interleave(self.factor, 3)


def _keys_cubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    out = ((1.5 * x - 2.5) * x) * x + 1.0
    out = torch.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, out)
    return torch.where(x >= 2.0, torch.zeros_like(x), out)


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of an antialiased Keys-cubic resize: the kernel of `jax.image.resize(method="cubic",
    antialias=True)`, which our CLIP preprocessing uses (torch's bicubic has a different kernel)."""
    inv = n_in / n_out
    sample = (torch.arange(n_out, dtype=torch.float32) + 0.5) * inv - 0.5
    w = _keys_cubic((sample[None, :] - torch.arange(n_in, dtype=torch.float32)[:, None]) / max(inv, 1.0))
    total = w.sum(0, keepdim=True)
    w = torch.where(total.abs() > 1000 * torch.finfo(torch.float32).eps, w / torch.where(total != 0, total, 1), 0)
    inside = (sample >= -0.5) & (sample <= n_in - 0.5)
    return torch.where(inside[None, :], w, 0).T


def clip_preprocess(image: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] images (B, 3, H, W) -> CLIP pixel values (B, 3, size, size): short side to `size`, centre crop,
    CLIP mean/std (atomo_jax.models.clip.clip_preprocess)."""
    b, c, h, w = image.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = (image.float() + 1.0) / 2.0
    if (nh, nw) != (h, w):
        x = torch.einsum("bchw,Hh,Ww->bcHW", x, _resize_matrix(h, nh), _resize_matrix(w, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0.0, 1.0)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


class Pipeline(NamedTuple):
    unet: AtomoUNet
    vae: nn.Module  # PixelAutoencoder or diffusers AutoencoderKL
    latent_scale: float
    image_encoder: CLIPVisionModelWithProjection
    image_size: int
    text_encoder: CLIPTextModel | None
    meta: dict[str, Any]  # atomo_config.json

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]


def load_pipeline(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Pipeline:
    """Every part of an export, in PyTorch."""
    folder = Path(folder)
    meta = read_atomo_config(folder)
    files, model = meta["files"], meta["config"]["model"]
    unet = AtomoUNet.from_export(folder, dtype=dtype, device=device)
    if model["vae"]["kind"] == "pixel":
        vae: nn.Module = PixelAutoencoder(int(model["vae"]["factor"]))
    else:
        vae = AutoencoderKL.from_pretrained(str(folder / files["vae"]), torch_dtype=dtype).to(device).eval()
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(str(folder / files["image_encoder"]),
                                                                  torch_dtype=dtype).to(device).eval()
    text_encoder = None
    if files.get("text_encoder"):
        text_encoder = CLIPTextModel.from_pretrained(str(folder / files["text_encoder"]),
                                                     torch_dtype=dtype).to(device).eval()
    return Pipeline(unet, vae, float(meta["latent_scale"]), image_encoder,
                    int(model["image_encoder"]["image_size"]), text_encoder, meta)


def scheduler_from(pipe: Pipeline) -> DDIMScheduler:
    d = pipe.config["diffusion"]
    if d["prediction_type"] != "v_prediction":
        raise ValueError(f"config.diffusion.prediction_type={d['prediction_type']!r}: video sampling expects "
                         f"'v_prediction'")
    return DDIMScheduler(num_train_timesteps=int(d["num_train_timesteps"]), beta_start=float(d["beta_start"]),
                         beta_end=float(d["beta_end"]), beta_schedule=d["beta_schedule"],
                         rescale_betas_zero_snr=bool(d["rescale_zero_snr"]), timestep_spacing="trailing",
                         prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True, steps_offset=0)


def encode_images(pipe: Pipeline, image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, h, w) (the posterior mean for an SD VAE)."""
    if isinstance(pipe.vae, PixelAutoencoder):
        z = pipe.vae.encode(image.float())
    else:
        z = pipe.vae.encode(image.to(pipe.vae.dtype)).latent_dist.mean
    return z.float() * pipe.latent_scale


def decode_latents(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, F, h, w) scaled latents -> video (B, 3, F, H, W) in [-1, 1]."""
    b, c, f, h, w = latents.shape
    z = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) / pipe.latent_scale
    if isinstance(pipe.vae, PixelAutoencoder):
        x = pipe.vae.decode(z.float())
    else:
        x = pipe.vae.decode(z.to(pipe.vae.dtype)).sample
    x = x.float().clamp(-1.0, 1.0)
    return x.reshape(b, f, 3, x.shape[-2], x.shape[-1]).permute(0, 2, 1, 3, 4)


def text_context(pipe: Pipeline, ids: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Token ids (B, L) -> context (B, L, D); without a text encoder one zero token per video."""
    if pipe.text_encoder is None:
        return torch.zeros(batch, 1, int(pipe.meta["unet"]["cross_attention_dim"]))
    if ids is None:
        raise ValueError("the model has a text encoder: pass the token ids of the prompt / of the empty prompt ''")
    return pipe.text_encoder(input_ids=ids.to(pipe.text_encoder.device)).last_hidden_state.float()


def guidance_branches(image_scale: float, text_scale: float) -> tuple[str, ...]:
    if image_scale == text_scale == 1.0:
        return ("it",)
    if image_scale == text_scale:
        return ("u", "it")
    return ("u", "i", "it")


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, phi: float) -> torch.Tensor:
    """diffusers' rescale_noise_cfg over all non-batch dims."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


@torch.no_grad()
def image_to_video(pipe: Pipeline, image: torch.Tensor, *, num_frames: int, num_steps: int, image_scale: float,
                   text_scale: float, rescale: float, eta: float = 0.0, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, prompt_ids: torch.Tensor | None = None,
                   empty_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, 3, H, W) in [-1, 1] -> (video (B, 3, F, H, W) in [-1, 1], latents (B, 4, F, h, w)).

    `noise` (B, 4, F, h, w) is the initial x_T (pass the JAX pipeline's noise to reproduce its video); otherwise it
    is drawn with `generator`.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
    limit = int(pipe.meta["unet"]["motion_max_seq_length"])
    if not 1 <= num_frames <= limit:
        raise ValueError(f"num_frames={num_frames}: the temporal position table of this model holds 1..{limit} frames")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale={rescale}: expected a value in [0, 1]")
    unet = pipe.unet
    device, dtype = unet.unet.conv_in.weight.device, unet.unet.conv_in.weight.dtype
    image = image.float().to(device)
    b = image.shape[0]
    latent = encode_images(pipe, image)  # (B, 4, h, w)
    given = torch.zeros((b, latent.shape[1], num_frames) + latent.shape[2:], device=device)
    given[:, :, 0] = latent
    mask = torch.zeros(b, num_frames, device=device)
    mask[:, 0] = 1.0
    embeds = None
    if pipe.meta["unet"]["ip_adapter"]:
        pixels = clip_preprocess(image, pipe.image_size).to(device, pipe.image_encoder.dtype)
        embeds = pipe.image_encoder(pixel_values=pixels).image_embeds.float()
    empty = text_context(pipe, empty_ids, b)
    context = empty if prompt_ids is None else text_context(pipe, prompt_ids, b)

    branches = guidance_branches(image_scale, text_scale)
    n = len(branches)
    with_image = [br in ("i", "it") for br in branches]
    given_b = torch.cat([given if w else torch.zeros_like(given) for w in with_image])
    context_b = torch.cat([context if br == "it" else empty for br in branches])
    embeds_b = None if embeds is None else torch.cat([embeds if w else torch.zeros_like(embeds) for w in with_image])
    m = mask.repeat(n, 1)[:, None, :, None, None].expand(-1, 1, -1, *given.shape[3:])
    conditioning = torch.cat([m, given_b * m], dim=1)

    scheduler = scheduler_from(pipe)
    scheduler.set_timesteps(num_steps, device=device)
    shape = given.shape
    x = (torch.randn(shape, generator=generator, device=device) if noise is None
         else noise.to(device=device, dtype=torch.float32))
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)} (B, 4, F, h, w)")
    for t in scheduler.timesteps:
        inp = torch.cat([torch.cat([x] * n), conditioning], dim=1).to(dtype)
        out = unet(inp, t.expand(n * b), context_b.to(dtype), None if embeds_b is None else embeds_b.to(dtype))
        outs = dict(zip(branches, out.float().chunk(n)))
        if n == 1:
            guided = outs["it"]
        else:
            if n == 2:
                guided = outs["u"] + text_scale * (outs["it"] - outs["u"])
            else:
                guided = outs["u"] + image_scale * (outs["i"] - outs["u"]) + text_scale * (outs["it"] - outs["i"])
            if rescale > 0:
                guided = rescale_guidance(guided, outs["it"], rescale)
        x = scheduler.step(guided, t, x, eta=eta, generator=generator).prev_sample
    # Given frames are known exactly: keep them rather than the model's reconstruction (as the JAX pipeline does).
    latents = torch.where(mask[:, None, :, None, None] > 0, given, x)
    return decode_latents(pipe, latents), latents


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """An image file -> (1, 3, height, width) in [-1, 1], exactly as `python -m atomo_jax.sample` loads it."""
    return torch.from_numpy(video_io.load_image(path, height, width)[0]).permute(2, 0, 1)[None]


def _token_ids(pipe: Pipeline, tokenizer_dir: str | None, prompt: str) -> tuple[Any, Any]:
    if pipe.text_encoder is None:
        if prompt:
            print("warning: this model has no text encoder: --prompt is ignored", file=sys.stderr)
        return None, None
    if not tokenizer_dir:
        raise ValueError("this model has a text encoder: pass --tokenizer DIR (a CLIP tokenizer folder)")
    from transformers import CLIPTokenizer  # optional dependency: the [torch] extra

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.vocab_size != pipe.text_encoder.config.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer_dir}: vocab_size {tokenizer.vocab_size}, but the text encoder has "
                         f"{pipe.text_encoder.config.vocab_size} (missing or wrong vocab.json / merges.txt?)")
    length = pipe.text_encoder.config.max_position_embeddings
    ids = lambda text: torch.tensor(tokenizer([text], padding="max_length", max_length=length,
                                              truncation=True)["input_ids"])
    return (ids(prompt) if prompt else None), ids("")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atomo_jax.torch_ref.sample",
                                     description="Image-to-video in PyTorch from an atomo_jax export.")
    parser.add_argument("--export", required=True, help="folder written by python -m atomo_jax.export")
    parser.add_argument("--image", required=True, help="conditioning image (first frame)")
    parser.add_argument("--out", required=True, help="output .mp4 (a .gif is written next to it)")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (models with a text encoder)")
    parser.add_argument("--num_frames", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--image_scale", type=float, default=None)
    parser.add_argument("--text_scale", type=float, default=None)
    parser.add_argument("--rescale", type=float, default=None)
    parser.add_argument("--eta", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="compute dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.out.lower().endswith(".mp4"):
        parser.error(f"--out {args.out}: expected a path ending in .mp4")
    try:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        pipe = load_pipeline(args.export, dtype=dtype, device=args.device)
        s, data = pipe.config["sample"], pipe.config["data"]
        size = args.resolution or int(data["resolution"])
        image = load_image(args.image, size, size)
        prompt_ids, empty_ids = _token_ids(pipe, args.tokenizer, args.prompt)
        pick = lambda value, default: default if value is None else value
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        print(f"sampling {args.export} on {args.device} ({args.dtype})", file=sys.stderr)
        video, _ = image_to_video(
            pipe, image, num_frames=pick(args.num_frames, int(s["num_frames"])),
            num_steps=pick(args.steps, int(s["num_steps"])),
            image_scale=pick(args.image_scale, float(s["image_scale"])),
            text_scale=pick(args.text_scale, float(s["text_scale"])), rescale=pick(args.rescale, float(s["rescale"])),
            eta=pick(args.eta, float(s["eta"])), generator=generator, prompt_ids=prompt_ids,
            empty_ids=empty_ids)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    frames = video_io.to_uint8(video[0].permute(1, 2, 3, 0).cpu().numpy())
    fps = float(s["fps"])
    mp4 = video_io.write_video(args.out, frames, fps=fps)
    gif = video_io.write_video(os.path.splitext(args.out)[0] + ".gif", frames, fps=fps)
    print(f"wrote {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}: {mp4} and {gif}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
