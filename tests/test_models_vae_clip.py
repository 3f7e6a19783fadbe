"""VAE, CLIP text/vision, tokenizer, pixel autoencoder and weight loading, against diffusers/transformers/open_clip.

Parity: small random PyTorch models -> our converters -> same inputs, fp32, relative error < 1e-4.
Single-file (original SD) layout: diffusers' own `convert_ldm_vae_checkpoint` / `convert_ldm_clip_checkpoint` (and
transformers' loader) are the oracle for what an original-layout dict means.
Full size: meta-device PyTorch models; every key must land on `jax.eval_shape` of our model with the right shape.
"""

import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from atomo_jax.convert import torch_io
from atomo_jax.convert.clip import load_image_encoder, load_text_encoder, text_params_from_torch, \
    text_param_shapes, vision_param_shapes, vision_params_from_torch
from atomo_jax.convert.vae import load_vae, vae_param_shapes, vae_params_from_torch
from atomo_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from atomo_jax.models.pixel_autoencoder import PixelAutoencoder, PixelAutoencoderConfig
from atomo_jax.models.tokenizer import TokenizerError, build_clip_tokenizer_files, load_clip_tokenizer, \
    open_clip_bpe_path, tokenize
from atomo_jax.models.vae import AutoencoderKL, VAEConfig

TOL = 1e-4


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def numpy_state_dict(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def perturb(module, seed=0):
    """Random init leaves norms at 1/0 and biases small: shake every parameter so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def count(shapes):
    return sum(int(np.prod(s.shape)) for s in torch_io.flatten_shapes(shapes).values())


def zeros_like_shapes(state_dict):
    """Full-size stand-ins that cost no memory: stride-0 views of one zero."""
    return {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------------- VAE

TINY_VAE = dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4)


def torch_vae(block_out_channels, layers_per_block, norm_num_groups, latent_channels, **kw):
    n = len(block_out_channels)
    return TorchAutoencoderKL(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                              norm_num_groups=norm_num_groups, latent_channels=latent_channels,
                              down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                              **kw)


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return perturb(torch_vae(**TINY_VAE))


def test_vae_parity_encode_decode(tiny_vae):
    cfg = VAEConfig(**TINY_VAE)
    params = vae_params_from_torch(numpy_state_dict(tiny_vae), cfg)
    model = AutoencoderKL(cfg)
    rs = np.random.RandomState(0)
    x = rs.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z = rs.randn(2, 4, 4, 4).astype(np.float32)
    with torch.no_grad():
        posterior = tiny_vae.encode(torch.from_numpy(x)).latent_dist
        decoded = tiny_vae.decode(torch.from_numpy(z)).sample.numpy()
    mean, logvar = model.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), method="encode")
    out = model.apply(params, jnp.asarray(z.transpose(0, 2, 3, 1)), method="decode")
    assert rel(nchw(mean), posterior.mean.numpy()) < TOL
    assert rel(nchw(logvar), posterior.logvar.numpy()) < TOL
    assert rel(nchw(out), decoded) < TOL
    # Extra leading axes (B, F, H, W, C) are independent images.
    video = jnp.asarray(x.transpose(0, 2, 3, 1))[None]
    mean5, _ = model.apply(params, video, method="encode")
    np.testing.assert_allclose(mean5[0], mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.apply(params, jnp.zeros((1, 10, 16, 3)), method="encode")


def diffusers_vae_to_ldm(sd, num_blocks):
    """Test-only: diffusers VAE keys -> original (LDM) keys, validated below by diffusers' own LDM converter."""
    out = {}
    for key, v in sd.items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        m = re.match(r"(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k)
        if m:
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
            k = f"{m[1]}mid.attn_1.{name}.{m[3]}"
            if name != "norm" and m[3] == "weight":
                v = v[:, :, None, None]  # the original mid attention uses 1x1 convs
        out["first_stage_model." + k] = v
    return out


def _diffusers_vae_config(n):
    return {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


def test_vae_single_file_matches_diffusers_oracle(tiny_vae, tmp_path):
    sd = numpy_state_dict(tiny_vae)
    ldm = diffusers_vae_to_ldm(sd, 3)
    # The oracle: diffusers' own single-file converter must read our original-layout dict back as the same model.
    oracle = convert_ldm_vae_checkpoint(dict(ldm), _diffusers_vae_config(3))
    assert set(oracle) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(oracle[k], sd[k], err_msg=k)
    # A full single-file checkpoint on disk (VAE + text encoder + UNet keys), read by our loader in two formats.
    full = dict(ldm)
    full["model.diffusion_model.input_blocks.0.0.weight"] = np.ones((4, 4, 3, 3), np.float32)
    full["first_stage_model.loss.logvar"] = np.zeros((), np.float32)  # training-loss weight: ignored
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in full.items()}
    save_file(tensors, str(tmp_path / "sd.safetensors"))
    torch.save({"state_dict": tensors, "global_step": 7}, str(tmp_path / "sd.ckpt"))
    cfg = VAEConfig(**TINY_VAE)
    reference = vae_params_from_torch(sd, cfg)
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    with torch.no_grad():
        expected = tiny_vae.encode(torch.from_numpy(nchw(x).copy())).latent_dist.mean.numpy()
    for name in ("sd.safetensors", "sd.ckpt"):
        params = vae_params_from_torch(torch_io.load_state_dict(tmp_path / name), cfg)
        jax.tree.map(np.testing.assert_array_equal, params, reference)
        assert rel(nchw(AutoencoderKL(cfg).apply(params, x, method="encode")[0]), expected) < TOL
    # A diffusers folder: config.json gives the config.
    tiny_vae.save_pretrained(tmp_path / "vae")
    folder_cfg, params = load_vae(tmp_path / "vae")
    assert folder_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    raw = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**raw, "shift_factor": 0.1}))
    with pytest.raises(ValueError, match=r"vae/config.json: unsupported architecture: shift_factor=0.1"):
        load_vae(tmp_path / "vae")


# ----------------------------------------------------------------------------------------------------- CLIP

TINY_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                   patch_size=14, projection_dim=16)


def _ids():
    ids = np.random.RandomState(0).randint(3, 90, (2, 16))
    ids[:, 0] = 98  # bos
    ids[0, 5], ids[0, 6:] = 99, 1  # eos then pad
    ids[1, 9], ids[1, 10:] = 99, 99  # eos repeated as padding (SD's tokenizer pads with eos)
    return ids


@pytest.mark.parametrize("eos_token_id", [2, 99])  # 2: the legacy argmax rule of SD 1.5's config
def test_clip_text_parity(eos_token_id):
    torch.manual_seed(0)
    tconf = transformers.CLIPTextConfig(**TINY_TEXT, eos_token_id=eos_token_id, bos_token_id=98, pad_token_id=1)
    ref = perturb(transformers.CLIPTextModel(tconf))
    cfg = CLIPTextConfig(**TINY_TEXT, eos_token_id=eos_token_id)
    params = text_params_from_torch(numpy_state_dict(ref), cfg)
    ids = _ids()
    mask = (np.arange(16)[None] < np.array([[7], [16]])).astype(np.int64)
    model = CLIPTextModel(cfg)
    for attention_mask in (None, mask):
        with torch.no_grad():
            want = ref(torch.from_numpy(ids), None if attention_mask is None else torch.from_numpy(attention_mask))
        got = model.apply(params, jnp.asarray(ids), attention_mask)
        assert rel(got.last_hidden_state, want.last_hidden_state.numpy()) < TOL
        assert rel(got.pooled_output, want.pooler_output.numpy()) < TOL


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_clip_vision_parity(hidden_act, tmp_path):
    torch.manual_seed(0)
    ref = perturb(transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**TINY_VISION, hidden_act=hidden_act)))
    cfg = CLIPVisionConfig(**TINY_VISION, hidden_act=hidden_act)
    params = vision_params_from_torch(numpy_state_dict(ref), cfg)
    x = np.random.RandomState(0).randn(2, 3, 28, 28).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), output_hidden_states=True)
    got = CLIPVisionModelWithProjection(cfg).apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert rel(got.image_embeds, want.image_embeds.numpy()) < TOL
    assert rel(got.last_hidden_state, want.last_hidden_state.numpy()) < TOL
    assert rel(got.penultimate_hidden_state, want.hidden_states[-2].numpy()) < TOL
    ref.save_pretrained(tmp_path)  # an image_encoder folder, as IP-Adapter ships it
    folder_cfg, from_folder = load_image_encoder(tmp_path)
    assert folder_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, from_folder, params)


def test_text_encoder_single_file_matches_transformers_oracle(tmp_path):
    torch.manual_seed(1)
    tconf = transformers.CLIPTextConfig(**TINY_TEXT, eos_token_id=2, bos_token_id=98, pad_token_id=1)
    ref = perturb(transformers.CLIPTextModel(tconf))
    # Original SD files store transformers' on-disk names (with `text_model.`) and the position_ids buffer.
    ldm = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in numpy_state_dict(ref).items()}
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(16)[None]
    ldm["first_stage_model.encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3), np.float32)  # not ours: ignored
    # Oracle: diffusers strips the prefix, transformers' loader reads the result as a CLIPTextModel folder.
    oracle_sd = convert_ldm_clip_checkpoint(dict(ldm))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in oracle_sd.items()},
              str(tmp_path / "model.safetensors"))
    tconf.save_pretrained(tmp_path)
    oracle, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = CLIPTextConfig(**TINY_TEXT)
    params = text_params_from_torch(ldm, cfg)
    ids = _ids()
    with torch.no_grad():
        want = oracle.eval()(torch.from_numpy(ids))
    got = CLIPTextModel(cfg).apply(params, jnp.asarray(ids))
    assert rel(got.last_hidden_state, want.last_hidden_state.numpy()) < TOL
    assert rel(got.pooled_output, want.pooler_output.numpy()) < TOL
    # The same weights from the transformers folder (config.json read) give the same params.
    folder_cfg, from_folder = load_text_encoder(tmp_path)
    assert folder_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, from_folder, params)


# ----------------------------------------------------------------------------------------------------- full size

def _report(name, torch_model, shapes):
    n_torch = sum(p.numel() for p in torch_model.parameters())
    n_ours = count(shapes)
    print(f"{name}: torch {n_torch:,} parameters, ours {n_ours:,}")
    assert n_torch == n_ours


def test_full_size_keys_map_without_weights():
    with torch.device("meta"):
        vae = torch_vae((128, 256, 512, 512), 2, 32, 4, sample_size=512)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1))
        vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
            patch_size=14, projection_dim=1024, hidden_act="gelu"))
    # Converting must succeed: every key placed with the right shape, none missing, none left over.
    vae_sd = zeros_like_shapes(vae.state_dict())
    vae_params_from_torch(vae_sd, VAEConfig())
    ldm = diffusers_vae_to_ldm(vae_sd, 4)
    assert set(convert_ldm_vae_checkpoint(dict(ldm), _diffusers_vae_config(4))) == set(vae_sd)
    vae_params_from_torch(ldm, VAEConfig())
    text_sd = zeros_like_shapes(text.state_dict())
    text_params_from_torch(text_sd, CLIPTextConfig())
    text_params_from_torch({f"cond_stage_model.transformer.text_model.{k}": v for k, v in text_sd.items()},
                           CLIPTextConfig())
    vision_params_from_torch(zeros_like_shapes(vision.state_dict()), CLIPVisionConfig())
    _report("SD 1.5 VAE", vae, vae_param_shapes(VAEConfig()))
    _report("CLIP ViT-L/14 text", text, text_param_shapes(CLIPTextConfig()))
    _report("CLIP ViT-H/14 vision + projection", vision, vision_param_shapes(CLIPVisionConfig()))


# ----------------------------------------------------------------------------------------------------- loading

def test_assign_reports_every_problem_at_once():
    cfg = VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)
    with torch.device("meta"):
        ref = torch_vae((8,), 1, 4, 4)
    sd = zeros_like_shapes(ref.state_dict())
    del sd["encoder.conv_in.bias"]
    sd["decoder.conv_out.weight"] = np.zeros((3, 8, 5, 5), np.float32)
    sd["encoder.surprise.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(torch_io.WeightMappingError) as err:
        vae_params_from_torch(sd, cfg, source="bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg and "nothing was loaded" in msg
    assert "1 missing" in msg and "params/encoder/conv_in/bias" in msg
    assert "1 unexpected" in msg and "encoder.surprise.weight" in msg
    assert "1 mis-shaped" in msg and "(5, 5, 8, 3)" in msg and "(3, 3, 8, 3)" in msg


def test_load_state_dict_formats_and_refusals(tmp_path):
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.float16)
    # Sharded diffusers folder.
    save_file({"a": a}, str(tmp_path / "s1.safetensors"))
    save_file({"b": b}, str(tmp_path / "s2.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    sd = torch_io.load_state_dict(tmp_path)
    assert set(sd) == {"a", "b"} and sd["b"].dtype == np.float32
    np.testing.assert_array_equal(sd["a"], a.numpy())
    # transformers-style .bin, read with weights_only.
    (tmp_path / "bin").mkdir()
    torch.save({"a": a}, str(tmp_path / "bin" / "pytorch_model.bin"))
    np.testing.assert_array_equal(torch_io.load_state_dict(tmp_path / "bin")["a"], a.numpy())
    # A pickle carrying an arbitrary object is refused, never executed.
    torch.save({"a": a, "evil": _Pickled()}, str(tmp_path / "evil.ckpt"))
    with pytest.raises(ValueError, match="weights_only=True"):
        torch_io.load_state_dict(tmp_path / "evil.ckpt")
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown weight format '\.h5'.*\.safetensors.*\.ckpt"):
        torch_io.load_state_dict(tmp_path / "w.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        torch_io.load_state_dict(tmp_path / "empty")


class _Pickled:
    pass


# ----------------------------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def built_tokenizer(tmp_path_factory):
    folder = build_clip_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))
    return load_clip_tokenizer(folder)


def test_built_tokenizer_matches_open_clip(built_tokenizer):
    # open_clip/__init__ needs torchvision: load its tokenizer module on its own.
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", open_clip_bpe_path().parent / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.SimpleTokenizer()
    sentences = ["A photo of a cat riding a bicycle!", "An astronaut's helmet, 4K, ultra-detailed;   hyper-realistic",
                 "Café déjà vu — naïve résumé 123", "a" * 60 + " antidisestablishmentarianism", "",
                 "Two dogs   playing in the SNOW at sunset, cinematic lighting"]
    assert built_tokenizer.vocab_size == reference.vocab_size == 49408
    for s in sentences:
        want = reference(s)[0].tolist()  # <sot> ... <eot>, zero padded to 77
        got = tokenize(built_tokenizer, [s])[0].tolist()  # padded with <|endoftext|> as SD's tokenizer does
        n = want.index(reference.eot_token_id) + 1
        assert got[:n] == want[:n], s
        assert all(t == reference.eot_token_id for t in got[n:])


def test_broken_tokenizer_refused(tmp_path):
    with pytest.raises(TokenizerError, match=r"does not exist.*vocab\.json \+ merges\.txt"):
        load_clip_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=rf"{tmp_path}.*expected vocab\.json \+ merges\.txt"):
        load_clip_tokenizer(tmp_path)
    # Files present but holding only placeholders: transformers loads it silently; we refuse.
    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    assert transformers.CLIPTokenizer.from_pretrained(str(tmp_path)).vocab_size == 2
    with pytest.raises(TokenizerError, match="vocab_size 2, expected 49408"):
        load_clip_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not one known token per word"):
        load_clip_tokenizer(tmp_path, expected_vocab_size=None)


# ----------------------------------------------------------------------------------------------------- pixel AE

def test_pixel_autoencoder_roundtrip():
    model = PixelAutoencoder(PixelAutoencoderConfig(factor=2))
    x = jax.random.uniform(jax.random.key(0), (2, 3, 4, 6, 3), minval=-1, maxval=1)
    assert model.init(jax.random.key(1), x) == {}
    mean, logvar = model.apply({}, x, method="encode")
    assert mean.shape == (2, 3, 2, 3, 4)
    assert jnp.all(jnp.exp(0.5 * logvar) < 1e-6)  # deterministic: sampling the posterior adds no noise
    np.testing.assert_allclose(mean[..., 0], x.reshape(2, 3, 2, 2, 3, 2, 3).mean((3, 5)).sum(-1) / 2, atol=1e-6)
    blocky = jnp.repeat(jnp.repeat(x[..., ::2, ::2, :], 2, -3), 2, -2)  # constant over 2x2 blocks
    back = model.apply({}, model.apply({}, blocky, method="encode")[0], method="decode")
    np.testing.assert_allclose(back, blocky, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 2"):
        model.apply({}, x[..., :3, :, :], method="encode")
