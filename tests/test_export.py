"""Export to PyTorch: forward parity of `atomo_jax.torch_ref` vs our Flax UNet, diffusers loads every folder, the
full-size model loads strictly on the meta device, Flax -> PyTorch -> Flax is exact, the PyTorch sampler reproduces
the JAX video of a trained demo checkpoint, and bad input gives clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, MotionAdapter, StableDiffusionPipeline, UNet2DConditionModel,
                       UNet3DConditionModel)
from safetensors.numpy import load_file
from transformers import CLIPTextModel, CLIPVisionModelWithProjection

from atomo_jax import export
from atomo_jax.convert import clip as cc
from atomo_jax.convert import ip_adapter, motion, torch_io
from atomo_jax.convert import vae as cv
from atomo_jax.convert import unet as cu
from atomo_jax.models.unet import SpatioTemporalUNet, UNetConfig
from atomo_jax.torch_ref.model import AtomoUNet
from tests.conftest import ROOT

# Two levels (four cross-attentions: the IP-Adapter numbering is exercised), 4 IP tokens (the count diffusers'
# IP-Adapter loader assumes).
CONFIG = UNetConfig(block_out_channels=(32, 64), down_attention=(True, False), layers_per_block=1,
                    num_attention_heads=2, cross_attention_dim=16, norm_num_groups=8, motion_num_heads=2,
                    motion_max_seq_length=8, ip_adapter=True, ip_tokens=4, image_embed_dim=12)
B, F, H, L = 2, 3, 8, 5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in torch_io.flatten_shapes(tree).items()}


def unflat(d: dict[str, np.ndarray]) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in d.items()})


def random_params(config: UNetConfig, seed: int = 0) -> dict:
    """Random weights of the right shapes (no zero-initialised layer, norms away from 1/0, so every parameter
    matters), without compiling our init."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in torch_io.flatten_shapes(cu.unet_param_shapes(config)).items():
        noise = rng.standard_normal(s.shape).astype(np.float32)
        if path.endswith("/kernel"):
            out[path] = noise / np.float32(np.sqrt(np.prod(s.shape[:-1])))
        else:
            out[path] = np.float32(1.0 if path.endswith("/scale") else 0.0) + np.float32(0.1) * noise
    assert all(v.dtype == np.float32 for v in out.values())
    return unflat(out)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    params = random_params(CONFIG)
    out = tmp_path_factory.mktemp("export_small")
    files = export.export_unet(params, CONFIG, out, dtype="fp32", sample_size=H, progress=lambda _: None)
    export.write_atomo_config(out, files=files, unet_config=CONFIG)
    return params, out


def test_forward_parity_with_flax(small):
    params, out = small
    model = AtomoUNet.from_export(out)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, F, H, H, 9)).astype(np.float32)
    t = np.array([999.0, 321.0], np.float32)
    ctx = rng.standard_normal((B, L, CONFIG.cross_attention_dim)).astype(np.float32)
    img = rng.standard_normal((B, CONFIG.image_embed_dim)).astype(np.float32)
    ours = jax.jit(SpatioTemporalUNet(CONFIG).apply)({"params": params}, x, t, ctx, img, ip_scale=0.7)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(t), torch.from_numpy(ctx),
                    torch.from_numpy(img), ip_scale=0.7)
    err = rel_err(ref.permute(0, 2, 3, 4, 1).numpy(), ours)
    assert err < 1e-4, err


def test_diffusers_loads_every_folder_and_the_ip_adapter_file(small):
    _, out = small
    unet, info = UNet2DConditionModel.from_pretrained(out / "unet", output_loading_info=True)
    assert unet.config.in_channels == 9 and unet.conv_in.weight.shape[1] == 9
    assert not any(info.values()), info
    adapter, info = MotionAdapter.from_pretrained(out / "motion_adapter", output_loading_info=True)
    assert not any(info.values()), info
    # temporal convolutions: exactly UNet3DConditionModel's temp-conv keys and shapes
    with torch.device("meta"):
        unet3d = UNet3DConditionModel(block_out_channels=CONFIG.block_out_channels, layers_per_block=1,
                                      norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
                                      down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                      up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    temp = load_file(str(out / export.TEMPORAL_CONVS_FILE))
    theirs = {k: tuple(v.shape) for k, v in unet3d.state_dict().items() if ".temp_convs." in k}
    assert {k: v.shape for k, v in temp.items()} == theirs
    # IP-Adapter: diffusers' own loader (pipeline.load_ip_adapter) reads the file into the same weights as ours
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(out), subfolder="", weight_name=export.IP_ADAPTER_FILE, image_encoder_folder=None)
    ours = AtomoUNet.from_export(out).unet.state_dict()
    theirs = pipe.unet.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_round_trip_flax_torch_flax_is_exact(small):
    params, out = small
    spatial_temporal = {**load_file(str(out / "unet" / export.DIFFUSERS_WEIGHTS)),
                        **load_file(str(out / export.TEMPORAL_CONVS_FILE))}
    zeros = jax.tree.map(np.zeros_like, params)
    back, _ = cu.load_unet_state_dict(spatial_temporal, CONFIG, init_params=zeros,
                                      new_ok=lambda p: motion.is_motion_param(p) or cu.is_ip_adapter(p))
    motion_params = motion.motion_modules_params(
        load_file(str(out / "motion_adapter" / export.DIFFUSERS_WEIGHTS)), CONFIG)  # checks the position tables
    ip_params = ip_adapter.ip_adapter_params(load_file(str(out / export.IP_ADAPTER_FILE)), CONFIG)
    back = {**flat(back), **flat(motion_params), **flat(ip_params)}
    original = flat(params)
    assert set(back) == set(original)
    assert all(np.array_equal(back[k], original[k]) for k in original)


def test_full_size_model_loads_strictly_on_meta():
    config = UNetConfig()
    shapes = export.unet_export_shapes(config)
    with torch.device("meta"):
        model = AtomoUNet.from_configs(
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
            export.diffusers_unet_config(config), export.motion_adapter_config(config))
        parts = {part: {k: torch.empty(s) for k, s in keys.items()} for part, keys in shapes.items()}
    n_before = sum(int(np.prod(v.shape)) for v in model.state_dict().values())
    model.load_parts(parts)  # strict: raises on any missing or unexpected key or wrong shape
    n_exported = sum(int(np.prod(s)) for keys in shapes.values() for s in keys.values())
    assert n_exported == n_before
    counts = cu.count_params(cu.unet_param_shapes(config))
    positions = sum(int(np.prod(s)) for k, s in shapes["motion_adapter"].items() if k.endswith(".pe"))
    assert n_exported == counts["total"] + positions  # every parameter once, plus MotionAdapter's fixed tables
    assert counts["total"] > 1.4e9


def test_sd_vae_and_text_encoder_folders(tmp_path):
    """A real (tiny) AutoencoderKL and CLIP text encoder: diffusers / transformers load the folders with no key left
    over, and the importers read them back exactly."""
    from configs import demo as demo_config

    from atomo_jax.models.atomo import build_model

    c = demo_config.get_config().model
    c.vae.update(dict(kind="sd", block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                      scaling_factor=0.5))
    c.text_encoder.update(dict(kind="clip_text", vocab_size=100, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8))
    model = build_model(c)
    shapes = jax.eval_shape(lambda: flax.linen.meta.unbox(model.init(jax.random.key(0), num_frames=1,
                                                                      resolution=16)))
    rng = np.random.default_rng(0)
    params = {part: unflat({k: rng.standard_normal(v.shape).astype(np.float32)
                            for k, v in torch_io.flatten_shapes(shapes[part]).items()})
              for part in ("vae", "image_encoder", "text_encoder")}
    files = export.export_encoders(model, params, tmp_path, dtype="fp32", sample_size=16, progress=lambda _: None)
    assert files == {"vae": "vae", "image_encoder": "image_encoder", "text_encoder": "text_encoder"}
    for cls, folder in ((AutoencoderKL, "vae"), (CLIPVisionModelWithProjection, "image_encoder"),
                        (CLIPTextModel, "text_encoder")):
        _, info = cls.from_pretrained(tmp_path / folder, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (folder, info)
    back = {"vae": cv.load_vae(tmp_path / "vae")[1]["params"],
            "image_encoder": cc.load_image_encoder(tmp_path / "image_encoder")[1]["params"],
            "text_encoder": cc.load_text_encoder(tmp_path / "text_encoder")[1]["params"]}
    for part, tree in back.items():
        ours, theirs = flat(params[part]), flat(tree)
        assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours), part


# ---------------------------------------------------------------------------------------------------------------
# A demo checkpoint: export CLI, PyTorch sampling vs the JAX pipeline.

def write_demo_checkpoint(workdir) -> None:
    """A checkpoint of the demo config (4 frames), written by the trainer's Checkpointer, with random weights
    everywhere and EMA != raw. Random rather than trained: a short CPU training run costs minutes of compilation
    here and leaves the zero-initialised temporal layers near the identity, which would hide their mistakes."""
    from configs import demo as demo_config
    from data_pipelines.loader import make_loader

    from atomo_jax.models.atomo import PARTS, build_model
    from atomo_jax.training.checkpoint import Checkpointer
    from atomo_jax.training.optimizer import make_optimizer
    from atomo_jax.training.setup import boxed_abstract_params
    from atomo_jax.training.state import TrainState, split_trainable

    c = demo_config.get_config()
    c.data.num_frames = c.sample.num_frames = 4
    c.sample.num_steps = 2
    c.checkpoint.async_save = False
    rng = np.random.default_rng(5)
    shapes = torch_io.flatten_shapes(boxed_abstract_params(build_model(c.model)))
    params = {part: {} for part in PARTS}  # parts without parameters (pixel autoencoder, no text encoder) stay {}
    params.update(unflat({k: (rng.standard_normal(v.shape) / np.sqrt(np.prod(v.shape[:-1]) if len(v.shape) > 1 else 10)
                         ).astype(np.float32) + np.float32(k.endswith("/scale")) for k, v in shapes.items()}))
    trainable, frozen_unet = split_trainable(params["unet"], c.train.trainable)
    ema = jax.tree.map(lambda x: x + np.float32(0.01) * rng.standard_normal(x.shape).astype(np.float32), trainable)
    state = TrainState(step=jnp.array(7, jnp.int32), trainable=trainable, frozen={**params, "unet": frozen_unet},
                       opt_state=make_optimizer(c.train).init(trainable), ema=ema,
                       rng=jax.random.key_data(jax.random.key(0)), skipped_steps=jnp.zeros((), jnp.int32))
    loader = make_loader(c.data, global_batch_size=1, seed=0, shard_index=0, shard_count=1)
    checkpointer = Checkpointer(str(workdir), c.checkpoint)
    checkpointer.save(7, state, iter(loader), c, {"skipped_samples": 0})
    checkpointer.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir, out = tmp_path_factory.mktemp("demo"), tmp_path_factory.mktemp("demo_export") / "torch"
    write_demo_checkpoint(workdir)
    result = subprocess.run([sys.executable, "-m", "atomo_jax.export", "--checkpoint", str(workdir), "--out",
                             str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[4/4]" in result.stderr and "done:" in result.stderr  # progress output
    return workdir, out


def test_torch_sampling_reproduces_the_jax_video(demo):
    """Same checkpoint (EMA), same image, same initial noise: PyTorch DDIM + guidance vs our jitted pipeline.
    Tolerance: latents relative error < 1e-4, pixels max abs difference < 1e-3 (1/8 of a uint8 level)."""
    from atomo_jax.pipelines import i2v
    from atomo_jax.torch_ref import sample as torch_sample
    from atomo_jax.training.checkpoint import load_inference

    workdir, out = demo
    meta = json.loads((out / export.ATOMO_CONFIG).read_text())
    assert meta["weights"] == "ema" and meta["dtype"] == "fp32" and meta["files"]["text_encoder"] is None
    config, model, params = load_inference(str(workdir))
    sampler, guidance = i2v.configs_from(config, image_scale=1.5, text_scale=1.0, rescale=0.7)
    assert guidance.branches == ("u", "i", "it")  # all three branches and the rescale are exercised
    image = np.clip(np.random.default_rng(2).standard_normal((1, 32, 32, 3)) * 0.5, -1, 1).astype(np.float32)
    key = jax.random.key(3)
    video = i2v.image_to_video(model, params, jnp.asarray(image), key, num_frames=4, sampler=sampler,
                               guidance=guidance, progress=False)
    noise = jax.random.normal(jax.random.split(key)[0], video.latents.shape, jnp.float32)  # i2v's x_T

    pipe = torch_sample.load_pipeline(out)
    t_video, t_latents = torch_sample.image_to_video(
        pipe, torch.from_numpy(image).permute(0, 3, 1, 2), num_frames=4, num_steps=sampler.num_steps,
        image_scale=guidance.image_scale, text_scale=guidance.text_scale, rescale=guidance.rescale,
        noise=torch.from_numpy(np.array(noise)).permute(0, 4, 1, 2, 3))
    err = rel_err(t_latents.permute(0, 2, 3, 4, 1).numpy(), video.latents)
    assert err < 1e-4, err
    assert np.max(np.abs(t_video.permute(0, 2, 3, 4, 1).numpy() - video.video)) < 1e-3


def test_raw_bf16_export_and_encoder_round_trip(demo, tmp_path):
    from atomo_jax.training.checkpoint import load_inference

    workdir, out = demo
    # the CLIP image encoder went out in transformers names and comes back exactly
    config, model, ema = load_inference(str(workdir))
    state = load_file(str(out / "image_encoder" / "model.safetensors"))
    back = cc.vision_params_from_torch(state, model.image_encoder.config)["params"]
    original = flat(ema["image_encoder"])
    assert all(np.array_equal(v, original[k]) for k, v in flat(back).items()) and len(flat(back)) == len(original)
    assert json.loads((out / "vae" / "config.json").read_text())["_class_name"] == "PixelAutoencoder"

    _, _, raw = load_inference(str(workdir), use_ema=False)
    bf16 = export.export_checkpoint(workdir, tmp_path / "bf16", weights="raw", dtype="bf16", progress=lambda _: None)
    from safetensors.torch import load_file as load_torch

    conv_in = load_torch(str(bf16 / "unet" / export.DIFFUSERS_WEIGHTS))["conv_in.weight"]
    assert conv_in.dtype == torch.bfloat16
    expected = torch.from_numpy(cu.to_torch_array(cu.CONV, np.array(raw["unet"]["conv_in"]["kernel"]))).bfloat16()
    assert torch.equal(conv_in, expected)
    loaded = AtomoUNet.from_export(bf16)  # computes in fp32 by default
    assert torch.equal(loaded.unet.conv_in.weight, conv_in.float())
    ema_conv_in = np.asarray(ema["unet"]["conv_in"]["kernel"])
    assert not np.array_equal(ema_conv_in, np.asarray(raw["unet"]["conv_in"]["kernel"]))  # raw really is raw
    assert json.loads((bf16 / export.ATOMO_CONFIG).read_text())["weights"] == "raw"


_TORCH_ONLY_CLI = """
import sys
from atomo_jax.torch_ref import sample
code = sample.main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in ("jax", "flax")], "torch_ref imported jax"
sys.exit(code)
"""


def test_torch_sample_cli_writes_a_video_without_jax(demo, tmp_path):
    from PIL import Image

    from atomo_jax.pipelines.video_io import read_video

    _, out = demo
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    video = tmp_path / "video.mp4"
    result = subprocess.run([sys.executable, "-c", _TORCH_ONLY_CLI, "--export", str(out), "--image", str(image),
                             "--out", str(video), "--steps", "2", "--num_frames", "3"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_video(str(video)).shape == (3, 32, 32, 3) and (tmp_path / "video.gif").is_file()
    result = subprocess.run([sys.executable, "-c", _TORCH_ONLY_CLI, "--export", str(tmp_path), "--image", str(image),
                             "--out", str(video)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "not an atomo_jax export" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Bad input.

def test_bad_inputs_give_clear_errors(tmp_path, capsys, small):
    assert export.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert export.main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "no finished checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--dtype", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    _, out = small
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export_checkpoint(tmp_path / "empty", out)
    with pytest.raises(FileNotFoundError, match="not an atomo_jax export"):
        AtomoUNet.from_export(tmp_path / "empty")
    # a file that does not fit the model: the strict load names the key
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model = AtomoUNet.from_export(out)
        model.load_parts({"unet": {**model.unet.state_dict(), "bogus.weight": torch.zeros(1)}})
