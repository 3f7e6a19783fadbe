"""`python -m atomo_jax.sample` end to end on conftest's TINY_DEMO trained for 2 steps, and its input errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from atomo_jax.pipelines import video_io
from tests.conftest import ROOT, TINY_DEMO, cli_env

SIZE = 16  # TINY_DEMO's resolution


def _run(*args, check=True):
    # Every compile of these CLI runs cached, however short: the sample programs repeat across the runs.
    env = cli_env(1, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def test_load_image_resizes_and_crops(tmp_path):
    path = str(tmp_path / "wide.png")
    Image.new("RGB", (60, 30), (255, 0, 0)).save(path)
    image = video_io.load_image(path, 16, 16)
    assert image.shape == (1, 16, 16, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[0, 8, 8], [1.0, -1.0, -1.0], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.png: no such image file"):
        video_io.load_image(str(tmp_path / "missing.png"), 16, 16)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        video_io.load_image(str(tmp_path / "bad.png"), 16, 16)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """TINY_DEMO trained for 2 steps."""
    path = str(tmp_path_factory.mktemp("demo"))
    _run("atomo_jax.train", *TINY_DEMO, f"--workdir={path}", "--config.train.num_steps=2",
         "--config.sample.at_end=False")
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("img") / "in.png")
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[8:24, 8:24] = (250, 40, 40)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def sample():
    return lambda *args, check=True: _run("atomo_jax.sample", *args, check=check)


def test_sample_cli_i2v_t2v_long(workdir, image, sample, tmp_path):
    common = [f"--workdir={workdir}", "--steps=2", "--num_frames=4", "--seed=3"]
    sample(*common, "--mode=i2v", f"--image={image}", f"--out={tmp_path / 'a.mp4'}")
    first = video_io.read_video(str(tmp_path / "a.gif"))
    assert first.shape == (4, SIZE, SIZE, 3) and video_io.read_video(str(tmp_path / "a.mp4")).shape == first.shape
    sample(*common, "--mode=i2v", f"--image={image}", f"--out={tmp_path / 'b.mp4'}")
    np.testing.assert_array_equal(video_io.read_video(str(tmp_path / "b.gif")), first)  # same seed, same video
    sample(*common, "--mode=long", f"--image={image}", "--windows=3", "--given_frames=1", "--sampler=dpmpp2m",
           f"--out={tmp_path / 'long.mp4'}")
    assert video_io.read_video(str(tmp_path / "long.gif")).shape == (4 + 2 * 3, SIZE, SIZE, 3)
    sample(*common, "--mode=t2v", f"--width={2 * SIZE}", f"--out={tmp_path / 't2v.mp4'}")  # a 1:2 bucket's shape
    assert video_io.read_video(str(tmp_path / "t2v.gif")).shape == (4, SIZE, 2 * SIZE, 3)


def test_sample_cli_errors(workdir, image, sample, tmp_path):
    common = [f"--workdir={workdir}", "--steps=1", "--num_frames=2", f"--out={tmp_path / 'x.mp4'}"]
    proc = sample(*common, "--mode=i2v", f"--image={tmp_path / 'nope.png'}", check=False)
    assert proc.returncode != 0 and "nope.png: no such file" in proc.stderr
    proc = sample(*common, "--mode=i2v", f"--image={image}", "--resolution=18", check=False)
    assert proc.returncode != 0 and "image size 18x18: the autoencoder cannot encode it" in proc.stderr, \
        proc.stderr[-2000:]
    proc = sample(f"--workdir={workdir}", "--steps=1", "--num_frames=40", f"--out={tmp_path / 'x.mp4'}",
                  "--mode=t2v", check=False)
    assert proc.returncode != 0 and "num_frames=40: the temporal attention position table of this model holds " \
        "1..16 frames" in proc.stderr, proc.stderr[-2000:]  # the demo's table
    other = tmp_path / "other.py"
    other.write_text("from configs import demo\n\ndef get_config():\n    c = demo.get_config()\n"
                     "    c.model.unet.block_out_channels = (16, 32)\n    return c\n")
    proc = sample(*common, "--mode=i2v", f"--image={image}", f"--config={other}", check=False)
    assert proc.returncode != 0 and "does not match" in proc.stderr, proc.stderr[-2000:]


def test_size_the_unet_cannot_take_is_named():
    """The demo's 2-level UNet halves the latent grid once: 36 px (9 latents) passes the autoencoder, not the UNet."""
    from atomo_jax.models.atomo import build_model
    from atomo_jax.pipelines.i2v import latent_shape
    from configs import demo

    model = build_model(demo.get_config().model)
    params = {"vae": {}}  # the demo's pixel autoencoder has no weights
    assert latent_shape(model, params, 32, 48) == (8, 12)
    with pytest.raises(ValueError, match=r"image size 36x36 is not usable: height and width must be multiples of 8"):
        latent_shape(model, params, 36, 36)
