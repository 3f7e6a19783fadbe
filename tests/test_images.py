"""Conditioning images load as an image viewer shows them (`video_io.read_rgb`, used by sample and eval): 16-bit
grey scaled to 8 bits, palettes expanded, transparency composited on the background, damaged files one error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atomo_jax.pipelines.video_io import load_image, read_rgb


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    got = read_rgb(str(tmp_path / "g16.png"))
    assert got.shape == (8, 8, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], np.round(grey / 65535 * 255).astype(np.uint8))
    assert 0 < got.mean() < 255  # neither black nor the all-white of an 8-bit clip


def test_palette_and_transparency(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).quantize(16).save(tmp_path / "p.png")
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    np.testing.assert_array_equal(read_rgb(str(tmp_path / "p.png")), expected)

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 200  # hidden green under transparent pixels must not show
    rgba[..., 3] = 0
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (255, 0, 0, 128)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    white, black = read_rgb(str(tmp_path / "a.png")), read_rgb(str(tmp_path / "a.png"), "black")
    np.testing.assert_array_equal(white[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(white[1, 1], (255, 255, 255))
    np.testing.assert_array_equal(black[1, 1], (0, 0, 0))
    np.testing.assert_allclose(white[0, 1], (255, 127, 127), atol=1)  # half red over white
    assert load_image(str(tmp_path / "a.png"), 4, 4).max() == 1.0


def test_damaged_missing_and_foreign_files_name_the_file(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name, message in (("cut.png", "damaged image"), ("text.png", "not an image file"),
                          ("missing.png", "no such image file")):
        with pytest.raises((ValueError, FileNotFoundError), match=f"{tmp_path / name}: {message}"):
            read_rgb(str(tmp_path / name))
    with pytest.raises(ValueError, match="'mauve-ish': not a colour"):
        read_rgb(str(tmp_path / "ok.png"), "mauve-ish")
