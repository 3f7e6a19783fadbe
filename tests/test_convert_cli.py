"""`python -m atomo_jax.convert`: help, compose on tiny random diffusers/transformers parts saved to disk, single-part
commands, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flax
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from atomo_jax.configuration import load_config
from atomo_jax.convert import compose
from atomo_jax.convert.__main__ import main
from atomo_jax.models.atomo import build_model
from atomo_jax.training import checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = '''
import ml_collections
from configs import demo

def get_config():
    c = demo.get_config()
    c.model.unet.update(dict(ip_tokens=4, motion_max_seq_length=16))
    c.model.vae.update(dict(kind="sd", block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                            scaling_factor=0.18215))
    c.model.text_encoder.update(dict(
        kind="clip_text", vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, eos_token_id=2))
    return c
'''


class NotATensor:
    """Pickled into a .ckpt: torch.load(weights_only=True) must refuse it."""


def flat(tree) -> dict:
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """Tiny random pretrained parts in their on-disk formats (matching TINY_CONFIG)."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    sd = root / "sd"
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=4,
                         cross_attention_dim=32, norm_num_groups=8).save_pretrained(sd / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(sd / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, eos_token_id=2)
                  ).save_pretrained(sd / "text_encoder")
    (sd / "scheduler").mkdir()
    (sd / "scheduler" / "scheduler_config.json").write_text("{}")
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=4,
                            motion_norm_num_groups=8, motion_max_seq_length=16)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0.0, 0.1)
    adapter.save_pretrained(root / "motion")
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=32, hidden_act="gelu")).save_pretrained(root / "image_encoder")
    g = torch.Generator().manual_seed(1)
    ip = {"image_proj": {"proj.weight": torch.randn(4 * 32, 32, generator=g),
                         "proj.bias": torch.randn(128, generator=g), "norm.weight": torch.randn(32, generator=g),
                         "norm.bias": torch.randn(32, generator=g)},
          "ip_adapter": {}}
    for n, hidden in ((1, 32), (3, 32), (5, 32), (7, 64)):  # attn2 of down 0, up 1 (x2), mid
        for w in ("to_k_ip", "to_v_ip"):
            ip["ip_adapter"][f"{n}.{w}.weight"] = torch.randn(hidden, 32, generator=g)
    torch.save(ip, root / "ip-adapter_tiny.bin")
    (root / "tiny_config.py").write_text(TINY_CONFIG)
    return {"root": root, "sd": sd, "motion": root / "motion", "image_encoder": root / "image_encoder",
            "ip": root / "ip-adapter_tiny.bin", "config": root / "tiny_config.py"}


def test_help():
    out = subprocess.run([sys.executable, "-m", "atomo_jax.convert", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("compose", "unet", "vae", "clip-text", "clip-vision", "motion", "ip-adapter"):
        assert command in out.stdout
    with pytest.raises(SystemExit) as e:
        main(["compose", "--help"])
    assert e.value.code == 0


def test_compose_loads_reports_and_restores(parts, tmp_path, capsys):
    """Non-standard sizes composed with no --config at all: every size, head count and norm comes from the files."""
    out = tmp_path / "init"
    # A kohya-named community LoRA (a dense layer, a LoCon 1x1 conv and a text-encoder key, which we skip) merged
    # into the composed base at strength 0.5.
    torch_unet = load_file(str(parts["sd"] / "unet" / "diffusion_pytorch_model.safetensors"))
    q, proj = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in"
    rng = np.random.default_rng(0)
    community = {}
    for module in (q, proj):
        out_dim, in_dim = torch_unet[f"{module}.weight"].shape[:2]
        name = "lora_unet_" + module.replace(".", "_")
        community[f"{name}.lora_down.weight"] = rng.standard_normal((2, in_dim) + ((1, 1) if module == proj else ()))
        community[f"{name}.lora_up.weight"] = rng.standard_normal((out_dim, 2) + ((1, 1) if module == proj else ()))
        community[f"{name}.alpha"] = np.array(1.0)
    community["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = np.ones((2, 4))
    community["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = np.ones((4, 2))
    lora_file = tmp_path / "community.safetensors"
    save_file({k: v.astype(np.float32) for k, v in community.items()}, str(lora_file))
    code = main(["compose", "--sd", str(parts["sd"]), "--motion", str(parts["motion"]), "--ip_adapter",
                 str(parts["ip"]), "--image_encoder", str(parts["image_encoder"]), "--lora", f"{lora_file}:0.5",
                 "--out", str(out)])
    captured = capsys.readouterr()
    text = captured.out
    assert code == 0, captured.err
    assert "(kohya naming, strength 0.5): 2 layers merged; 1 modules of other parts skipped" in text
    for part in ("[unet]", "[vae]", "[text_encoder]", "[image_encoder]"):
        assert part in text
    unet_block = text.split("[unet]")[1].split("[vae]")[0]
    assert "newly initialised: " in unet_block and "temp_convs" in unet_block  # only the temporal convs are new
    assert "motion_modules" not in unet_block.split("newly initialised")[1].split("ignored")[0]
    assert "position tables" in unet_block and "conv_in" in unet_block  # checked tables, 4 -> 9 channel note
    assert "scheduler/" in text and "model_index.json" in text  # ignored entries of the SD folder

    config = checkpoint.load_config(str(out))  # what compose found, over configs/base.py
    tiny = load_config(parts["config"]).model
    for section in ("unet", "vae", "image_encoder", "text_encoder"):
        for key, value in tiny[section].items():
            if key not in ("dtype", "remat", "attention_impl", "factor"):
                assert config.model[section][key] == value, (section, key)
    model = build_model(config.model)
    abstract = flax.linen.meta.unbox(jax.eval_shape(lambda r: model.init(r, num_frames=8, resolution=32),
                                                    jax.random.key(0)))
    restored = compose.restore_params(out, abstract)
    unet = flat(restored["unet"])
    conv_in = np.asarray(unet["conv_in/kernel"])
    for module, path in ((q, "mid_block/attentions_0/transformer_blocks_0/attn1/to_q/kernel"),
                         (proj, "mid_block/attentions_0/proj_in/kernel")):
        name = "lora_unet_" + module.replace(".", "_")
        up, down = community[f"{name}.lora_up.weight"], community[f"{name}.lora_down.weight"]
        delta = 0.5 * 0.5 * (up.reshape(up.shape[0], 2) @ down.reshape(2, -1))  # strength x alpha / rank
        want = torch_unet[f"{module}.weight"].reshape(delta.shape) + delta
        got = np.asarray(unet[path]).reshape(-1, delta.shape[0]).T  # (in, out) or (1, 1, in, out) -> (out, in)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=module)
    np.testing.assert_array_equal(conv_in[..., :4, :], torch_unet["conv_in.weight"].transpose(2, 3, 1, 0))
    assert not conv_in[..., 4:, :].any()
    torch_motion = load_file(str(parts["motion"] / "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(unet["mid_block/motion_modules_0/proj_in/kernel"],
                                  torch_motion["mid_block.motion_modules.0.proj_in.weight"].T)
    ip = torch.load(parts["ip"], weights_only=True)
    np.testing.assert_array_equal(unet["mid_block/attentions_0/transformer_blocks_0/attn2/to_v_ip/kernel"],
                                  ip["ip_adapter"]["7.to_v_ip.weight"].numpy().T)
    assert not np.asarray(unet["down_blocks_0/temp_convs_0/conv4_conv/kernel"]).any()  # identity at start
    vae = load_file(str(parts["sd"] / "vae" / "diffusion_pytorch_model.safetensors"))
    restored_vae = flat(restored["vae"])
    for key in ("encoder/conv_out/bias", "decoder/conv_out/bias"):
        if key in restored_vae or key.startswith("encoder"):  # the decoder only where the model has one
            np.testing.assert_array_equal(restored_vae[key], vae[key.replace("/", ".")])
    assert flat(restored["text_encoder"]).keys() == flat(abstract["text_encoder"]).keys()
    assert flat(restored["image_encoder"]).keys() == flat(abstract["image_encoder"]).keys()

    with pytest.raises(SystemExit):  # an existing --out is refused
        main(["compose", "--motion", str(parts["motion"]), "--out", str(out), "--config", str(parts["config"])])


def test_single_part_commands(parts, tmp_path, capsys):
    config = ["--config", str(parts["config"])]
    assert main(["motion", str(parts["motion"]), "--out", str(tmp_path / "m.safetensors")] + config) == 0
    saved = load_file(str(tmp_path / "m.safetensors"))
    assert saved and all("motion_modules_" in k for k in saved)
    assert main(["ip-adapter", str(parts["ip"]), "--out", str(tmp_path / "ip.msgpack")] + config) == 0
    restored = flax.serialization.msgpack_restore((tmp_path / "ip.msgpack").read_bytes())
    assert "image_embeds" in restored["image_proj"]
    assert main(["clip-vision", str(parts["image_encoder"]), "--out", str(tmp_path / "v.safetensors")]) == 0
    assert main(["vae", str(parts["sd"] / "vae"), "--out", str(tmp_path / "vae.safetensors")]) == 0
    assert "parameters" in capsys.readouterr().out


def test_bad_inputs_give_clear_errors(parts, tmp_path, capsys):
    config = ["--config", str(parts["config"])]
    good = load_file(str(parts["motion"] / "diffusion_pytorch_model.safetensors"))

    def run(state: dict, name: str = "mm.safetensors") -> str:
        save_file(state, str(tmp_path / name))
        assert main(["motion", str(tmp_path / name), "--out", str(tmp_path / "o.safetensors")] + config) == 1
        return capsys.readouterr().err

    key = "down_blocks.1.motion_modules.0.transformer_blocks.0.attn1.to_k.weight"
    err = run({k: v for k, v in good.items() if k != key})
    assert "mm.safetensors" in err and "1 missing" in err and "down_blocks_1/motion_modules_0" in err
    err = run(dict(good, **{"down_blocks.0.motion_modules.0.bogus.weight": np.zeros(2, np.float32)}))
    assert "1 unexpected" in err and "down_blocks.0.motion_modules.0.bogus.weight" in err
    err = run(dict(good, **{key: np.zeros((64, 3), np.float32)}))
    assert "1 mis-shaped" in err and key in err

    (tmp_path / "weights.xyz").write_bytes(b"junk")
    assert main(["motion", str(tmp_path / "weights.xyz"), "--out", str(tmp_path / "o.safetensors")] + config) == 1
    err = capsys.readouterr().err
    assert "unknown weight format '.xyz'" in err and ".safetensors" in err

    torch.save({"state_dict": {"w": torch.zeros(2)}, "trainer": NotATensor()}, tmp_path / "evil.ckpt")
    for command in (["motion"], ["ip-adapter"]):
        assert main(command + [str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "o.safetensors")] + config) == 1
        err = capsys.readouterr().err
        assert "evil.ckpt" in err and "weights_only=True" in err

    with pytest.raises(SystemExit):  # unknown output format is refused before any work
        main(["motion", str(parts["motion"]), "--out", str(tmp_path / "o.pt")] + config)
    assert "supported: .safetensors, .msgpack" in capsys.readouterr().err
    assert main(["compose", "--sd", str(parts["motion"]), "--out", str(tmp_path / "c")] + config) == 1
    assert "not a diffusers SD folder" in capsys.readouterr().err


def test_unet_command_reads_original_single_file(parts, tmp_path, capsys):
    from atomo_jax.convert import single_file

    torch_unet = load_file(str(parts["sd"] / "unet" / "diffusion_pytorch_model.safetensors"))
    layout = single_file.LDMUNetLayout(layers_per_block=1, down_attention=(True, False))
    ldm = single_file.diffusers_unet_to_ldm(torch_unet, layout)
    ldm["model_ema.decay"] = np.zeros((), np.float32)
    save_file(ldm, str(tmp_path / "sd_tiny.safetensors"))
    out = tmp_path / "unet.safetensors"
    assert main(["unet", str(tmp_path / "sd_tiny.safetensors"), "--out", str(out), "--config",
                 str(parts["config"])]) == 0, capsys.readouterr().err
    saved = load_file(str(out))
    np.testing.assert_array_equal(saved["down_blocks_0/resnets_0/conv1/kernel"],
                                  torch_unet["down_blocks.0.resnets.0.conv1.weight"].transpose(2, 3, 1, 0))
    assert "newly initialised" in capsys.readouterr().out


def test_wrong_head_counts_are_refused_naming_file_field_and_values(parts, tmp_path, capsys):
    """Head counts never show in tensor shapes: only the checkpoint's config.json can catch a wrong one (the parts
    have 4 spatial and 4 motion heads)."""
    config = ["--config", str(parts["config"])]
    wrong_heads = "--config.model.unet.num_attention_heads=8"
    code = main(["compose", "--sd", str(parts["sd"]), "--out", str(tmp_path / "a"), *config, wrong_heads])
    err = capsys.readouterr().err
    assert code == 1 and "model.unet.num_attention_heads: 4 in " in err and "unet/config.json (attention_head_dim)" in err
    assert "but 8 in the config" in err
    assert not (tmp_path / "a").exists()
    assert main(["unet", str(parts["sd"]), "--out", str(tmp_path / "u.safetensors"), *config, wrong_heads]) == 1
    assert "num_attention_heads" in capsys.readouterr().err
    wrong_motion = "--config.model.unet.motion_num_heads=8"
    assert main(["motion", str(parts["motion"]), "--out", str(tmp_path / "m.safetensors"), *config,
                 wrong_motion]) == 1
    err = capsys.readouterr().err
    assert "model.unet.motion_num_heads: 4 in " in err and "motion/config.json (motion_num_attention_heads)" in err
    code = main(["compose", "--motion", str(parts["motion"]), "--out", str(tmp_path / "b"), *config,
                 "--config.model.unet.motion_max_seq_length=32"])
    assert code == 1 and "model.unet.motion_max_seq_length: 16 in " in capsys.readouterr().err


def damaged_files(root: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """{case: (file, what the error must say)}: truncated and foreign files in both formats, and a pickle with code."""
    data = good.read_bytes()
    cases = {"truncated.safetensors": data[: len(data) // 2], "header.safetensors": data[:20],
             "text.safetensors": b"not weights at all\n"}
    torch.save({"w": torch.zeros(64)}, root / "good.ckpt")
    ckpt = (root / "good.ckpt").read_bytes()
    cases.update({"truncated.ckpt": ckpt[: len(ckpt) // 2], "text.bin": b"not weights at all\n"})
    out = {}
    for name, content in cases.items():
        (root / name).write_bytes(content)
        kind = "safetensors file" if name.endswith(".safetensors") else "PyTorch checkpoint"
        out[name] = root / name, f"damaged or not a {kind}"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "trainer": NotATensor()}, root / "code.ckpt")
    out["code.ckpt"] = root / "code.ckpt", "not allowed: it holds pickled objects other than tensors"
    return out


@pytest.mark.parametrize("command", [["compose", "--sd"], ["compose", "--motion"], ["compose", "--ip_adapter"],
                                     ["unet"], ["motion"], ["ip-adapter"], ["vae"], ["clip-text"]])
def test_damaged_and_foreign_files_are_one_line_naming_the_file(parts, tmp_path, capsys, command):
    cases = damaged_files(tmp_path, parts["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    for name, (path, message) in cases.items():
        out = ["--out", str(tmp_path / ("c" if command[0] == "compose" else "o.safetensors")), "--force"]
        code = main(command + [str(path)] + out[: 2 if command[0] != "compose" else 3])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(err) == 1, (name, err)
        assert err[0].startswith(f"error: {path}: {message}"), (name, err[0])
    assert "Traceback" not in capsys.readouterr().err


def test_damaged_file_through_the_real_cli(parts, tmp_path):
    path, message = damaged_files(tmp_path, parts["motion"] / "diffusion_pytorch_model.safetensors")[
        "truncated.safetensors"]
    out = subprocess.run([sys.executable, "-m", "atomo_jax.convert", "motion", str(path), "--out",
                          str(tmp_path / "m.safetensors")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: {path}: {message} (incomplete metadata, file not fully " \
                                                  f"covered)"


def test_single_file_composes_and_trains_with_no_size_flags(parts, tmp_path):
    """An original single-file SD 1.x checkpoint at a size no config has (widths 32/64, one resnet per level, 64-wide
    CLIP text): compose reads every size off its shapes, training takes the model from the composed checkpoint,
    and neither command is told a size."""
    from atomo_jax.convert import single_file
    from atomo_jax.models.tokenizer import build_clip_tokenizer_files
    from tests.conftest import run
    from tests.test_models_vae_clip import diffusers_vae_to_ldm

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                attention_head_dim=8, cross_attention_dim=64, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, max_position_embeddings=77, eos_token_id=2))
    numpy = lambda module: {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}  # noqa: E731
    layout = single_file.LDMUNetLayout(layers_per_block=1, down_attention=(True, False))
    ldm = single_file.diffusers_unet_to_ldm(numpy(unet), layout)
    ldm.update(diffusers_vae_to_ldm(numpy(vae), 2))  # with its first_stage_model. prefix
    ldm.update({f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
                for k, v in numpy(text).items()})
    single = tmp_path / "sd_tiny.safetensors"
    save_file(ldm, str(single))
    tokenizer = build_clip_tokenizer_files(tmp_path / "tokenizer")
    runtime = ["--config=configs/base.py", "--config.model.unet.dtype=float32", "--config.model.unet.remat=none"]

    init = tmp_path / "init"
    run("atomo_jax.convert", "compose", "--sd", str(single), "--image_encoder", str(parts["image_encoder"]),
        "--out", str(init), *runtime)
    composed = json.loads((init / "atomo_config.json").read_text())["model"]
    assert composed["unet"]["block_out_channels"] == [32, 64] and composed["unet"]["layers_per_block"] == 1
    assert composed["unet"]["down_attention"] == [True, False] and composed["unet"]["cross_attention_dim"] == 64
    assert composed["unet"]["image_embed_dim"] == 32  # the image encoder's projection
    assert composed["vae"]["block_out_channels"] == [32, 64] and composed["vae"]["kind"] == "sd"
    assert composed["text_encoder"]["hidden_size"] == 64 and composed["text_encoder"]["num_attention_heads"] == 1
    assert composed["image_encoder"]["hidden_size"] == 32

    exported = tmp_path / "torch"  # what you would train from, back in PyTorch: the composed checkpoint exports
    run("atomo_jax.export", "--checkpoint", str(init), "--out", str(exported))
    back, info = UNet2DConditionModel.from_pretrained(exported / "unet", output_loading_info=True)
    assert not any(info.values()), info
    np.testing.assert_array_equal(back.state_dict()["up_blocks.1.attentions.0.proj_in.weight"].numpy(),
                                  unet.state_dict()["up_blocks.1.attentions.0.proj_in.weight"].numpy())

    workdir = tmp_path / "run"
    run("atomo_jax.train", f"--workdir={workdir}", *runtime, f"--config.init.checkpoint={init}",
        f"--config.model.text_encoder.tokenizer={tokenizer}", "--config.data.kind=synthetic",
        "--config.data.num_frames=4", "--config.data.resolution=32", "--config.data.worker_count=0",
        "--config.data.num_given_frames=2", "--config.train.num_steps=1", "--config.train.batch_size=2",
        "--config.sample.at_end=False")
    trained = checkpoint.load_config(str(workdir)).model.to_dict()
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON has lists
    for section in ("unet", "vae", "text_encoder", "image_encoder"):
        for key, value in composed[section].items():
            if key != "tokenizer":
                assert plain(trained[section][key]) == value, (section, key)
