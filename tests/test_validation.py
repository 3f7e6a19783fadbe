"""config.validation's inputs: images from a folder or a list, prompts by file name, sizes from the config, and a
clear error for each bad input before training starts. (Validation during a real run, on one and two processes, is
tests/test_buckets.py's CLI test.)"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atomo_jax.configuration import ConfigError, load_config
from atomo_jax.training import validation
from tests.conftest import TINY_DEMO, start


def config_with(**values):
    return load_config("configs/demo.py", [f"--config.validation.{k}={v}" for k, v in values.items()])


@pytest.fixture
def images(tmp_path):
    for name, size in (("b", (20, 30)), ("a", (16, 16))):
        Image.fromarray(np.full(size + (3,), 90, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_or_list_prompts_and_sizes(images):
    vset = validation.load_validation_set(config_with(images=images), None)
    assert vset.names == ("a", "b") and vset.prompts == ("", "")  # sorted, non-images ignored
    assert vset.images.shape == (2, 32, 32, 3) and vset.tokens is None and vset.clip is None
    assert vset.num_frames == 8  # configs/demo.py's sample.num_frames
    (images / "p.jsonl").write_text('{"image": "b.png", "prompt": "bee"}\n{"file": "a", "caption": "ay"}\n')
    vset = validation.load_validation_set(
        config_with(images=f"{images / 'b.png'},{images / 'a.png'}", prompts=images / "p.jsonl", height=16, width=64,
                    num_frames=4), None)
    assert vset.names == ("b", "a") and vset.prompts == ("bee", "ay")  # a list keeps its order
    assert vset.images.shape == (2, 16, 64, 3) and vset.num_frames == 4
    config = config_with(images=images)
    config.data.buckets = ((4, 32, 64),)
    assert validation.sample_size(config) == (8, 32, 64)  # the first bucket's size
    assert validation.load_validation_set(config_with(), None) is None


@pytest.mark.parametrize("case, message", [
    ("missing", "not found: .*nope.png"),
    ("empty_folder", "holds no image file"),
    ("damaged", "broken.png: .*image"),
    ("no_prompt", "no prompt for b.png in .*p.csv"),
    ("twice", "several images are named a"),
])
def test_bad_inputs_name_the_key_and_file(images, tmp_path_factory, case, message):
    values = {"images": images}
    if case == "missing":
        values["images"] = f"{images / 'a.png'},{images / 'nope.png'}"
    elif case == "empty_folder":
        values["images"] = tmp_path_factory.mktemp("empty")
    elif case == "damaged":
        (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif case == "no_prompt":
        (images / "p.csv").write_text("image,prompt\na.png,ay\n")
        values["prompts"] = images / "p.csv"
    elif case == "twice":
        other = tmp_path_factory.mktemp("other")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "a.jpg")
        values["images"] = f"{images / 'a.png'},{other / 'a.jpg'}"
    with pytest.raises(ConfigError, match=f"config.validation.*{message}"):
        validation.load_validation_set(config_with(**values), None)


def test_trainer_refuses_a_bad_validation_image_before_training(images, tmp_path):
    proc = start("atomo_jax.train", f"--workdir={tmp_path / 'run'}", *TINY_DEMO, f"--config.validation.images={images}",
                 "--config.validation.width=18")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:]
    assert "config.validation.width=18: expected 0 or a multiple of" in out, out[-3000:]
    assert "Traceback" not in out and "[train] devices" not in out, out[-3000:]
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    proc = start("atomo_jax.train", f"--workdir={tmp_path / 'run'}", *TINY_DEMO, f"--config.validation.images={images}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:]
    assert "error: config.validation:" in out and "broken.png" in out, out[-3000:]
    saved = list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
    assert "Traceback" not in out and "[train] step" not in out and not saved, out[-3000:]
