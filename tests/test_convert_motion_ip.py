"""AnimateDiff motion modules and IP-Adapter import: parity vs diffusers at tiny sizes, layout equivalence, bad input,
and full-size key/shape coverage against meta-device PyTorch models."""

from __future__ import annotations

import flax
import jax
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from diffusers.models.embeddings import SinusoidalPositionalEmbedding

from atomo_jax.convert import ip_adapter, motion, torch_io
from atomo_jax.models.unet import SpatioTemporalUNet, UNetConfig

TINY = dict(in_channels=4, block_out_channels=(32, 64), down_attention=(True, False), layers_per_block=1,
            num_attention_heads=2, cross_attention_dim=16, norm_num_groups=8, motion_num_heads=2,
            motion_max_seq_length=8, image_embed_dim=12)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def numpy_sd(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def tiny_unet2d() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8).eval()


def make_adapter(mid_block: bool, max_seq_length: int = 8) -> MotionAdapter:
    torch.manual_seed(1)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=max_seq_length,
                            use_motion_mid_block=mid_block)
    with torch.no_grad():  # the zero-initialised proj_out would hide every other motion weight
        for p in adapter.parameters():
            p.normal_(0.0, 0.2)
    return adapter


@pytest.fixture(scope="module")
def adapter() -> MotionAdapter:
    return make_adapter(mid_block=True)


def spatial_params(unet2d: UNet2DConditionModel, config: UNetConfig) -> dict:
    """The SD spatial weights through the generic torch->flax rules (independent of the SD converter)."""
    shapes = motion.subtree(motion.unet_shapes(config), lambda p: not (
        motion.is_motion_param(p) or "temp_convs_" in p or ip_adapter.is_ip_adapter_param(p)))
    return torch_io.convert_state_dict(
        {k: v for k, v in numpy_sd(unet2d).items() if ".processor." not in k and "encoder_hid_proj" not in k},
        shapes, rename=lambda k: k.replace("time_embedding.linear_", "time_embedding_linear_"))


def full_params(config: UNetConfig, *parts) -> dict:
    """The converted parts; every other parameter (the temporal convs) zero, which keeps those layers at identity
    (their last convolution is zero)."""
    out = {p: np.zeros(s.shape, s.dtype) for p, s in flat(motion.unet_shapes(config)).items()}
    for part in parts:
        for k, v in flat(part).items():
            assert k in out, k
            out[k] = v
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


# ---------------------------------------------------------------------------------------------------------------
# Motion modules


@pytest.mark.parametrize("mid_block", [True, False], ids=["v2_mid_block", "v1_no_mid_block"])
def test_motion_adapter_and_ip_adapter_parity_vs_unet_motion_model(mid_block):
    """Our UNet (motion modules from a MotionAdapter, IP-Adapter from the original layout) vs diffusers'
    UNetMotionModel built from the same UNet2DConditionModel + MotionAdapter with the IP-Adapter loaded by diffusers;
    with a mid-block motion module (AnimateDiff v2+) and without (v1)."""
    adapter = make_adapter(mid_block)
    config = UNetConfig(**{**TINY, "motion_mid_block": mid_block})
    unet2d = tiny_unet2d()
    nested = original_ip_weights(unet2d, config.image_embed_dim)
    reference = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    reference._load_ip_adapter_weights(nested)
    for processor in reference.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.7]
    params = full_params(config, spatial_params(unet2d, config),
                         motion.motion_modules_params(numpy_sd(adapter), config),
                         ip_adapter.ip_adapter_params(flatten_nested(nested), config))
    rng = np.random.RandomState(0)
    b, f = 2, 3
    x = rng.randn(b, f, 8, 8, 4).astype(np.float32)
    context = rng.randn(b, 3, 16).astype(np.float32)
    image = rng.randn(b, config.image_embed_dim).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    apply = jax.jit(lambda p, *a: SpatioTemporalUNet(config).apply({"params": p}, *a, ip_scale=0.7))
    ours = apply(params, x, t, context, image)
    with torch.no_grad():  # UNetMotionModel wants the text context repeated per frame (it repeats the image itself)
        ref = reference(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(t),
                        torch.from_numpy(context).repeat_interleave(f, 0),
                        added_cond_kwargs={"image_embeds": [torch.from_numpy(image)[:, None]]}).sample
    assert rel_err(ours, ref.permute(0, 2, 3, 4, 1).numpy()) < 1e-4


# Independent rename table diffusers -> original AnimateDiff (mm_sd_v15_v2) names.
_TO_ORIGINAL = ((".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."), (".norm1.", ".norms.0."),
                (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."))


def to_original_layout(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in sd.items():
        module, _, rest = key.partition(".motion_modules.")
        index, _, tail = rest.partition(".")
        if tail.endswith("pos_embed.pe"):  # the original has one table per attention block
            block = tail[: -len("pos_embed.pe")]
            for a in (0, 1):
                out[f"{module}.motion_modules.{index}.temporal_transformer.{block}attention_blocks.{a}."
                    f"pos_encoder.pe"] = value
            continue
        for old, new in _TO_ORIGINAL:
            tail = tail.replace(old, new)
        out[f"{module}.motion_modules.{index}.temporal_transformer.{tail}"] = value
    return out


def test_original_motion_checkpoint_matches_diffusers_layout(adapter):
    config = UNetConfig(**TINY, ip_adapter=False)
    diffusers_sd = numpy_sd(adapter)
    original = to_original_layout(diffusers_sd)
    assert "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight" \
        in original
    # the test's table agrees with diffusers' own conversion (which drops the position tables)
    oracle = convert_animatediff_checkpoint_to_diffusers(original)
    assert set(oracle) == {k for k in diffusers_sd if not k.endswith(".pe")}
    assert motion.detect_format(original) == "original" and motion.detect_format(diffusers_sd) == "diffusers"
    a = flat(motion.motion_modules_params(original, config))
    b = flat(motion.motion_modules_params(diffusers_sd, config))
    assert a.keys() == b.keys() and len(a) > 100
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_original_v1_file_converts_with_no_size_flags(tmp_path):
    """An AnimateDiff v1 file as released (original layout, `.ckpt`, no mid-block module, 24 positions) through the
    CLI with no flags: the mid-block's absence and the table length come from the file, and the weights equal the
    diffusers-layout conversion (whose parity vs UNetMotionModel is tested above)."""
    from safetensors.numpy import load_file

    from atomo_jax.convert.__main__ import main

    adapter = make_adapter(mid_block=False, max_seq_length=24)
    original = to_original_layout(numpy_sd(adapter))
    assert not any(k.startswith("mid_block.") for k in original)
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, tmp_path / "mm_sd_v14.ckpt")
    out = tmp_path / "motion.safetensors"
    assert main(["motion", str(tmp_path / "mm_sd_v14.ckpt"), "--out", str(out)]) == 0
    config = UNetConfig(**{**TINY, "motion_mid_block": False, "motion_max_seq_length": 24}, ip_adapter=False)
    expected = {"/".join(k): v for k, v in
                flax.traverse_util.flatten_dict(motion.motion_modules_params(numpy_sd(adapter), config)).items()}
    saved = load_file(str(out))
    assert saved.keys() == expected.keys() and not any(k.startswith("mid_block") for k in saved)
    for key, value in expected.items():
        np.testing.assert_array_equal(saved[key], value)


def test_motion_position_table_is_checked_not_dropped(adapter):
    config = UNetConfig(**TINY, ip_adapter=False)
    sd = numpy_sd(adapter)
    key = "down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe"
    learned = dict(sd, **{key: sd[key] + 0.1})
    with pytest.raises(ValueError, match=r"pos_embed\.pe is not the fixed sinusoidal.*not supported"):
        motion.motion_modules_params(learned, config)
    with pytest.raises(ValueError, match=r"motion_max_seq_length=8"):
        motion.motion_modules_params(sd, UNetConfig(**dict(TINY, motion_max_seq_length=16), ip_adapter=False))
    half = {k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()}  # fp16 checkpoints still load
    motion.motion_modules_params(half, config)


def test_motion_bad_keys_are_listed(adapter):
    config = UNetConfig(**TINY, ip_adapter=False)
    sd = numpy_sd(adapter)
    q = "up_blocks.1.motion_modules.1.transformer_blocks.0.attn1.to_q.weight"
    bad = {k: v for k, v in sd.items() if k != q}
    bad["down_blocks.0.motion_modules.0.extra.weight"] = np.zeros((3, 3), np.float32)
    bad["mid_block.motion_modules.0.proj_in.weight"] = np.zeros((5, 64), np.float32)
    with pytest.raises(torch_io.WeightMappingError) as e:
        motion.motion_modules_params(bad, config, source="mm.safetensors")
    msg = str(e.value)
    assert "mm.safetensors" in msg and "up_blocks_1/motion_modules_1/transformer_blocks_0/attn1/to_q/kernel" in msg
    assert "down_blocks.0.motion_modules.0.extra.weight" in msg
    assert "mid_block_motion_modules" not in msg and "got (64, 5), expected (64, 64)" in msg
    with pytest.raises(ValueError, match="supported formats"):
        motion.motion_modules_params({"conv_in.weight": np.zeros((1,))}, config)


# ---------------------------------------------------------------------------------------------------------------
# IP-Adapter


def original_ip_weights(unet2d: UNet2DConditionModel, embed_dim: int, seed: int = 2) -> dict[str, dict]:
    """IP-Adapter weights in the original nested layout, numbered by diffusers' own `attn_processors` order."""
    g = torch.Generator().manual_seed(seed)
    cross = unet2d.config.cross_attention_dim
    out = {"image_proj": {"proj.weight": torch.randn(4 * cross, embed_dim, generator=g) * 0.2,
                          "proj.bias": torch.randn(4 * cross, generator=g),
                          "norm.weight": torch.randn(cross, generator=g), "norm.bias": torch.randn(cross, generator=g)},
           "ip_adapter": {}}
    modules = dict(unet2d.named_modules())
    for n, name in enumerate(unet2d.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = modules[name[: -len(".processor")]].to_q.out_features
            for w in ("to_k_ip", "to_v_ip"):
                out["ip_adapter"][f"{n}.{w}.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
    return out


def flatten_nested(nested: dict[str, dict]) -> dict[str, np.ndarray]:
    return {f"{group}.{k}": v.numpy() for group, entries in nested.items() for k, v in entries.items()}


def test_ip_adapter_original_and_diffusers_layouts_agree(tmp_path):
    config = UNetConfig(**TINY)
    unet2d = tiny_unet2d()
    nested = original_ip_weights(unet2d, config.image_embed_dim)
    original = flatten_nested(nested)
    assert sorted(original)[-1] == "ip_adapter.7.to_v_ip.weight"  # attn2 of down, up x2, mid: ids 1, 3, 5, 7
    unet2d._load_ip_adapter_weights(nested)
    diffusers_layout = {k: v for k, v in numpy_sd(unet2d).items() if ".processor." in k or "encoder_hid_proj" in k}
    assert ip_adapter.detect_layout(diffusers_layout) == "diffusers"
    a = flat(ip_adapter.ip_adapter_params(original, config))
    b = flat(ip_adapter.ip_adapter_params(diffusers_layout, config))
    assert a.keys() == b.keys() and len(a) == 4 + 2 * 4
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])

    # the nested .bin file and a flat .safetensors read the same
    torch.save(nested, tmp_path / "ip.bin")
    from safetensors.numpy import save_file
    save_file(original, str(tmp_path / "ip.safetensors"))
    for name in ("ip.bin", "ip.safetensors"):
        loaded = flat(ip_adapter.load_ip_adapter(tmp_path / name, config))
        assert all(np.array_equal(loaded[k], a[k]) for k in a)



def test_ip_adapter_bad_input(tmp_path):
    config = UNetConfig(**TINY, use_motion_modules=False)
    original = flatten_nested(original_ip_weights(tiny_unet2d(), config.image_embed_dim))
    bad = {k: v for k, v in original.items() if k != "ip_adapter.3.to_k_ip.weight"}
    bad["ip_adapter.9.to_k_ip.weight"] = original["ip_adapter.1.to_k_ip.weight"]
    bad["image_proj.norm.weight"] = np.zeros((17,), np.float32)
    with pytest.raises(torch_io.WeightMappingError) as e:
        ip_adapter.ip_adapter_params(bad, config, source="ip.bin")
    msg = str(e.value)
    assert "up_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k_ip/kernel" in msg
    assert "ip_adapter.9.to_k_ip.weight" in msg and "got (17,), expected (16,)" in msg
    with pytest.raises(ValueError, match="Plus/Full/FaceID"):
        ip_adapter.ip_adapter_params(dict(original, **{"image_proj.latents": np.zeros((1, 16, 16))}), config)
    with pytest.raises(ValueError, match="supported formats"):
        ip_adapter.ip_adapter_params({"foo.weight": np.zeros(1)}, config)
    torch.save({"image_proj": {"proj.weight": "not a tensor"}, "ip_adapter": {}}, tmp_path / "odd.bin")
    with pytest.raises(ValueError, match="odd.bin"):
        ip_adapter.load_ip_adapter_state_dict(tmp_path / "odd.bin")


# ---------------------------------------------------------------------------------------------------------------
# Full size, no weights: meta-device PyTorch models onto jax.eval_shape of our default UNet.


def meta_as_numpy(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Zero-stride stand-ins with the right shapes (no memory), real sinusoidal tables from diffusers."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".pe"):
            out[k] = SinusoidalPositionalEmbedding(v.shape[-1], v.shape[1]).pe.numpy()
        else:
            out[k] = np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
    return out


def check_full_tree(converted: dict, keep) -> int:
    expected = {p: s.shape for p, s in flat(motion.unet_shapes(UNetConfig())).items() if keep(p)}
    got = {p: v.shape for p, v in flat(converted).items()}
    assert got == expected
    return sum(int(np.prod(s)) for s in got.values())


def test_full_size_animatediff_v2_motion_adapter_maps_completely():
    with torch.device("meta"):
        adapter = MotionAdapter()  # diffusers defaults are the AnimateDiff v2 (mm_sd_v15_v2) layout
    assert tuple(adapter.config.block_out_channels) == (320, 640, 1280, 1280)
    assert adapter.config.motion_max_seq_length == 32 and adapter.config.use_motion_mid_block
    sd = meta_as_numpy(adapter.state_dict())
    count = check_full_tree(motion.motion_modules_params(sd, UNetConfig()), motion.is_motion_param)
    torch_count = sum(p.numel() for p in adapter.parameters())
    print(f"AnimateDiff v2 motion modules: {count:,} parameters (torch: {torch_count:,})")
    assert count == torch_count
    original = to_original_layout(sd)
    assert check_full_tree(motion.motion_modules_params(original, UNetConfig()), motion.is_motion_param) == count


def test_full_size_ip_adapter_sd15_maps_completely():
    with torch.device("meta"):
        unet2d = UNet2DConditionModel(cross_attention_dim=768)  # SD 1.5
    modules = dict(unet2d.named_modules())
    sd = {"image_proj.proj.weight": (4 * 768, 1024), "image_proj.proj.bias": (4 * 768,),
          "image_proj.norm.weight": (768,), "image_proj.norm.bias": (768,)}
    for n, name in enumerate(unet2d.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = modules[name[: -len(".processor")]].to_q.out_features
            sd[f"ip_adapter.{n}.to_k_ip.weight"] = sd[f"ip_adapter.{n}.to_v_ip.weight"] = (hidden, 768)
    assert len(sd) == 4 + 2 * 16 and "ip_adapter.31.to_v_ip.weight" in sd
    arrays = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in sd.items()}
    count = check_full_tree(ip_adapter.ip_adapter_params(arrays, UNetConfig()), ip_adapter.is_ip_adapter_param)
    print(f"IP-Adapter SD 1.5: {count:,} parameters")
    assert count == sum(int(np.prod(s)) for s in sd.values())
