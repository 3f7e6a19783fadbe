"""Writing sampled videos: MP4 (PyAV, H.264), GIF (Pillow) and PNG frame strips."""

from __future__ import annotations

import os
import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageColor, UnidentifiedImageError


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected frames of shape (F, H, W, 3) with F >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}; convert with to_uint8() first")
    return frames


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255] (the model's pixel range)."""
    video = np.asarray(video, dtype=np.float32)
    return np.clip(np.round((video + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    # yuv420p (what every player accepts) needs even sides: pad by edge replication.
    f, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "17"}
        for i in range(f):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(path: str, frames: np.ndarray, fps: float) -> None:
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0, optimize=False)


def write_video(path: str, frames: np.ndarray, fps: float = 8.0) -> str:
    """Writes uint8 frames (F, H, W, 3) to `path`; the container follows the suffix (.mp4 or .gif).

    MP4 is H.264 yuv420p, which needs even sides: odd heights/widths are padded by one replicated edge pixel.
    """
    frames = _check_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".mp4":
        _write_mp4(path, frames, fps)
    elif suffix == ".gif":
        _write_gif(path, frames, fps)
    else:
        raise ValueError(f"cannot write video {path!r}: expected a .mp4 or .gif suffix, got {suffix!r}")
    return path


def write_png_strip(path: str, frames: np.ndarray) -> str:
    """Writes the frames side by side as one PNG (F*W wide): a quick look at a video in TensorBoard or a README."""

    frames = _check_frames(frames)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)
    return path


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""


    out = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def read_video(path: str) -> np.ndarray:
    """Reads every frame of a video file as uint8 (F, H, W, 3) (used by tests and evaluation)."""

    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path}")
    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def read_rgb(path: str, background: str = "white") -> np.ndarray:
    """An image file -> uint8 (H, W, 3) as a viewer shows it: 16-bit and float images scaled to 8 bits, palettes
    expanded, transparency composited over `background` (a colour name or #rrggbb, default white). A missing,
    truncated or foreign file is one ValueError/FileNotFoundError naming it. numpy + Pillow only, so the PyTorch
    reference (`atomo_jax.torch_ref`) shares it without importing jax."""

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        colour = ImageColor.getrgb(background)[:3]
    except ValueError:
        raise ValueError(f"background {background!r}: not a colour (a name such as 'white' or #rrggbb)") from None
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16L", "I;16B", "F"):  # 16-bit PNG/TIFF grey (Pillow: "I;16" or "I")
                grey = np.asarray(im, np.float64)
                full = 1.0 if im.mode == "F" and grey.max() <= 1.0 else 255.0 if im.mode == "F" else 65535.0
                grey = np.clip(np.round(grey / full * 255.0), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                over = Image.new("RGBA", im.size, colour + (255,))
                return np.asarray(Image.alpha_composite(over, im.convert("RGBA")).convert("RGB"))
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError) as e:  # Pillow reports truncated or corrupt data as OSError / SyntaxError
        raise ValueError(f"{path}: damaged image ({e})") from None


def load_image(path: str, height: int, width: int, background: str = "white") -> np.ndarray:
    """An image file (see `read_rgb`) -> (1, height, width, 3) float32 in [-1, 1]: short side resized (bicubic),
    centre crop."""

    im = Image.fromarray(read_rgb(path, background))
    scale = max(height / im.height, width / im.width)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    im = im.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    array = np.asarray(im.crop((left, top, left + width, top + height)), np.float32)
    return (array / 127.5 - 1.0)[None]
