"""SD 1.5 UNet import: parity vs diffusers at a tiny size (frame by frame, temporal layers at identity; with
diffusers' IP-Adapter processors), UNet3D temporal-conv names, strict errors, round trip, and the original single-file
layout checked against diffusers' own `convert_ldm_unet_checkpoint`."""

from __future__ import annotations

import flax
import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet3DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.resnet import TemporalConvLayer as TorchTemporalConv

from atomo_jax.convert import single_file, torch_io
from atomo_jax.convert import unet as cu
from atomo_jax.models.temporal import TemporalConvLayer
from atomo_jax.models.unet import SpatioTemporalUNet, UNetConfig

CONFIG = UNetConfig(block_out_channels=(32, 64), down_attention=(True, False), layers_per_block=2,
                    num_attention_heads=2, cross_attention_dim=16, norm_num_groups=8, motion_num_heads=2,
                    motion_max_seq_length=8, ip_adapter=True, ip_tokens=4, image_embed_dim=24)
TORCH_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
                    attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8)
# The single-file tests need only PyTorch models: three levels there, so every LDM index pattern occurs (e.g. an
# upsampler after an attention, `output_blocks.{j}.2.conv`).
LDM_TORCH_CONFIG = dict(TORCH_CONFIG, block_out_channels=(32, 64, 64),
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
LDM_LAYOUT = single_file.LDMUNetLayout(2, (True, True, False))
B, F, H, L = 2, 3, 8, 5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def numpy_sd(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Noise on every weight, so norms (ones/zeros at init) and zero-initialised layers are really checked."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))


def sd_unet(config: dict = TORCH_CONFIG) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    perturb(unet, 0)
    return unet


def add_ip_adapter(unet: UNet2DConditionModel, seed: int = 1) -> None:
    """Loads a random IP-Adapter (original file layout) through diffusers' own loader."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: 0.2 * torch.randn(shape, generator=gen)
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    ip = {}
    for i, name in enumerate(cross):
        to_k = unet.get_submodule(name.removesuffix(".processor")).to_k.weight
        ip[f"{2 * i + 1}.to_k_ip.weight"] = rand(*to_k.shape)
        ip[f"{2 * i + 1}.to_v_ip.weight"] = rand(*to_k.shape)
    d, e, t = CONFIG.cross_attention_dim, CONFIG.image_embed_dim, CONFIG.ip_tokens
    proj = {"proj.weight": rand(t * d, e), "proj.bias": rand(t * d), "norm.weight": 1 + rand(d), "norm.bias": rand(d)}
    unet._load_ip_adapter_weights({"image_proj": proj, "ip_adapter": ip}, low_cpu_mem_usage=False)
    unet.eval()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return dict(x=rng.standard_normal((B, F, H, H, 9)).astype(np.float32), t=np.array([999.0, 321.0], np.float32),
                ctx=rng.standard_normal((B, L, CONFIG.cross_attention_dim)).astype(np.float32),
                img=rng.standard_normal((B, CONFIG.image_embed_dim)).astype(np.float32))


@pytest.fixture(scope="module")
def model():
    """Our UNet: jitted init (shared fresh parameters for the new layers) and jitted apply. The RBG key only makes
    XLA compile the initialisers faster than threefry on CPU."""
    unet = SpatioTemporalUNet(CONFIG)
    variables = jax.jit(unet.init)(jax.random.key(0, impl="unsafe_rbg"), *cu._init_inputs(CONFIG))
    return unet, jax.jit(unet.apply), variables["params"]


def torch_frame_by_frame(unet: UNet2DConditionModel, inputs, ip_scale: float | None = None) -> np.ndarray:
    x = torch.from_numpy(inputs["x"][..., :4].reshape(B * F, H, H, 4)).permute(0, 3, 1, 2)
    t = torch.from_numpy(np.repeat(inputs["t"], F))
    ctx = torch.from_numpy(np.repeat(inputs["ctx"], F, axis=0))
    kwargs = {}
    if ip_scale is not None:
        for proc in unet.attn_processors.values():
            if isinstance(proc, IPAdapterAttnProcessor2_0):
                proc.scale = [ip_scale]
        kwargs["added_cond_kwargs"] = {"image_embeds": [torch.from_numpy(np.repeat(inputs["img"], F, 0))[:, None]]}
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=ctx, **kwargs).sample
    return out.permute(0, 2, 3, 1).numpy().reshape(B, F, H, H, 4)


def test_sd_unet_parity_frame_by_frame(model, inputs):
    unet_module, apply, init_params = model
    unet = sd_unet()
    params, report = cu.load_unet_state_dict(numpy_sd(unet), CONFIG, init_params=init_params, source="tiny SD")
    # every SD weight loaded; exactly the temporal and IP-Adapter layers are new, and said so
    assert sorted(report.loaded) == sorted(p for p in torch_io.flatten_shapes(params) if cu.is_spatial(p))
    assert report.newly_initialised and all(cu.is_temporal(p) or cu.is_ip_adapter(p)
                                            for p in report.newly_initialised)
    assert any("conv_in" in n for n in report.notes) and "newly initialised, temporal" in report.summary()
    assert np.all(params["conv_in"]["kernel"][:, :, 4:] == 0)
    ref = torch_frame_by_frame(unet, inputs)
    # mask/image channels hold noise: the zero slices must ignore them; IP branch off via ip_scale=0
    out = apply({"params": params}, inputs["x"], inputs["t"], inputs["ctx"], inputs["img"], ip_scale=0.0)
    assert rel_err(out, ref) < 1e-4


def test_ip_adapter_parity_vs_diffusers_processor(model, inputs):
    _, apply, init_params = model
    unet = sd_unet()
    add_ip_adapter(unet)
    state = numpy_sd(unet)
    assert any(".processor.to_k_ip.0.weight" in k for k in state)
    params, report = cu.load_unet_state_dict(state, CONFIG, init_params=init_params)
    assert report.newly_initialised and all(cu.is_temporal(p) for p in report.newly_initialised)
    for scale in (1.0, 0.6):
        ref = torch_frame_by_frame(unet, inputs, ip_scale=scale)
        out = apply({"params": params}, inputs["x"], inputs["t"], inputs["ctx"], inputs["img"], ip_scale=scale)
        assert rel_err(out, ref) < 1e-4, scale
    plain = torch_frame_by_frame(sd_unet(), inputs)
    assert rel_err(plain, ref) > 1e-2  # the image branch really contributes


def test_temporal_conv_names_and_parity_vs_unet3d():
    table = cu.unet_key_table(cu.unet_param_shapes(CONFIG))
    ours = {r.torch_key: r for r in table if "temp_convs" in r.flax_path}
    with torch.device("meta"):
        unet3d = UNet3DConditionModel(
            block_out_channels=CONFIG.block_out_channels, layers_per_block=2, norm_num_groups=8,
            cross_attention_dim=16, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    theirs = {k: tuple(v.shape) for k, v in unet3d.state_dict().items() if ".temp_convs." in k}
    assert set(ours) == set(theirs)
    shapes = torch_io.flatten_shapes(cu.unet_param_shapes(CONFIG))
    for key, row in ours.items():
        assert cu.to_torch_array(row.transform, np.zeros(shapes[row.flax_path].shape)).shape == theirs[key], key

    # numbers: one diffusers TemporalConvLayer through the table rows of `down_blocks_1/temp_convs_1`
    torch.manual_seed(2)
    layer = TorchTemporalConv(64, 64, norm_num_groups=8).eval()
    perturb(layer, 2, std=0.1)  # conv4 is zero at init
    prefix_t, prefix_f = "down_blocks.1.temp_convs.1.", "down_blocks_1/temp_convs_1/"
    rows = [r for r in table if r.flax_path.startswith(prefix_f)]
    sd = numpy_sd(layer)
    assert {r.torch_key.removeprefix(prefix_t) for r in rows} == set(sd)
    flat = {r.flax_path.removeprefix(prefix_f): cu.to_flax_array(r.transform, sd[r.torch_key.removeprefix(prefix_t)])
            for r in rows}
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    x = np.random.default_rng(1).standard_normal((B, F, 4, 4, 64)).astype(np.float32)
    out = TemporalConvLayer(64, groups=8).apply({"params": params}, x)
    with torch.no_grad():
        ref = layer(torch.from_numpy(x.reshape(B * F, 4, 4, 64)).permute(0, 3, 1, 2), num_frames=F)
    assert rel_err(out, ref.permute(0, 2, 3, 1).numpy().reshape(x.shape)) < 1e-4


def test_round_trip_and_strict_errors(model):
    _, _, init_params = model
    # every parameter random (temporal ones too), exported to torch names and imported back strictly
    leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, torch_io.flatten_shapes(init_params)))
    rng = np.random.default_rng(3)
    params = jax.tree.unflatten(treedef, [rng.standard_normal(v.shape).astype(np.float32) for v in leaves])
    torch_sd = cu.unet_params_to_torch(params)
    back, report = cu.load_unet_state_dict(torch_sd, CONFIG, new_ok=lambda p: False)
    assert not report.newly_initialised and not report.notes
    back = torch_io.flatten_shapes(back)
    assert all(np.array_equal(back[p], params[p]) for p in params)

    sd = numpy_sd(sd_unet())
    broken = dict(sd)
    del broken["down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"]
    broken["down_blocks.0.resnets.0.conv2.weight"] = sd["down_blocks.0.resnets.0.conv2.weight"][:, :16]
    broken["mid_block.extra.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(torch_io.WeightMappingError) as e:
        cu.load_unet_state_dict(broken, CONFIG, init_params=init_params, source="broken.safetensors")
    msg = str(e.value)
    for needle in ("broken.safetensors", "1 missing", "down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k",
                   "1 unexpected", "mid_block.extra.weight", "1 mis-shaped", "down_blocks.0.resnets.0.conv2.weight"):
        assert needle in msg, needle
    # strict mode: an SD checkpoint lacks the temporal layers
    with pytest.raises(torch_io.WeightMappingError, match="missing"):
        cu.load_unet_state_dict(sd, CONFIG, init_params=init_params, new_ok=lambda p: False)


def test_table_covers_our_params_both_ways():
    shapes = torch_io.flatten_shapes(cu.unet_param_shapes(CONFIG))
    table = cu.unet_key_table(cu.unet_param_shapes(CONFIG))
    assert [r.flax_path for r in table] == sorted(shapes)
    keys = {r.flax_path: r.torch_key for r in table}
    assert keys["time_embedding_linear_1/kernel"] == "time_embedding.linear_1.weight"
    assert keys["down_blocks_0/temp_convs_0/conv1_conv/kernel"] == "down_blocks.0.temp_convs.0.conv1.2.weight"
    assert keys["mid_block/temp_convs_1/conv4_norm/scale"] == "mid_block.temp_convs.1.conv4.0.weight"
    assert keys["up_blocks_1/attentions_2/transformer_blocks_0/ff/net_0/proj/kernel"] == \
        "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"
    assert keys["image_proj/norm/scale"] == "encoder_hid_proj.image_projection_layers.0.norm.weight"
    # spatial names are exactly those of diffusers' UNet2DConditionModel
    with torch.device("meta"):
        spatial = set(UNet2DConditionModel(**TORCH_CONFIG).state_dict())
    assert {r.torch_key for r in table if cu.is_spatial(r.flax_path)} == spatial


def test_single_file_matches_diffusers_converter():
    """LDM keys from our inverse mapping; diffusers' converter (the oracle) must recover the exact diffusers state
    dict from them, and our forward conversion must give the very same tensors."""
    sd = numpy_sd(sd_unet(LDM_TORCH_CONFIG))
    ldm = single_file.diffusers_unet_to_ldm(sd, LDM_LAYOUT)
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm
    checkpoint = {**ldm, "first_stage_model.decoder.conv_out.weight": np.zeros(1), "alphas_cumprod": np.zeros(4)}
    ref = convert_ldm_unet_checkpoint(checkpoint, {"layers_per_block": LDM_LAYOUT.layers_per_block})
    assert set(ref) == set(sd) and all(np.array_equal(ref[k], sd[k]) for k in sd)
    ours = single_file.ldm_unet_to_diffusers(checkpoint)
    assert set(ours) == set(ref) and all(np.array_equal(ours[k], ref[k]) for k in ref)
    assert single_file.infer_layout({k.removeprefix(single_file.LDM_UNET_PREFIX): v for k, v in ldm.items()}) \
        == LDM_LAYOUT
    # EMA copies (flat names) are used on request, and refused when absent
    ema = {single_file.LDM_EMA_PREFIX + k.removeprefix("model.").replace(".", ""): v + 1 for k, v in ldm.items()}
    from_ema = single_file.ldm_unet_to_diffusers({**checkpoint, **ema}, use_ema=True)
    assert np.array_equal(from_ema["conv_in.weight"], sd["conv_in.weight"] + 1)
    with pytest.raises(torch_io.WeightMappingError, match="model_ema"):
        single_file.ldm_unet_to_diffusers(checkpoint, use_ema=True)
    with pytest.raises(torch_io.WeightMappingError, match="model.diffusion_model.input_blocks.1.7.weight"):
        single_file.ldm_unet_to_diffusers({**checkpoint, "model.diffusion_model.input_blocks.1.7.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="vae.ckpt: no 'model.diffusion_model.[*]' keys"):
        single_file.ldm_unet_to_diffusers({"first_stage_model.x": np.zeros(1)}, source="vae.ckpt")


def test_read_single_file_safetensors_and_ckpt(tmp_path):
    from safetensors.numpy import save_file

    sd = numpy_sd(sd_unet(LDM_TORCH_CONFIG))
    ldm = single_file.diffusers_unet_to_ldm(sd, LDM_LAYOUT)
    checkpoint = {**ldm, "alphas_cumprod": np.zeros(4, np.float32)}
    save_file(checkpoint, tmp_path / "sd.safetensors")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in checkpoint.items()}, "global_step": 7},
               tmp_path / "sd.ckpt")
    for name in ("sd.safetensors", "sd.ckpt"):
        parts = single_file.read_single_file(tmp_path / name)
        assert set(parts["unet"]) == set(sd) and all(np.array_equal(parts["unet"][k], sd[k]) for k in sd)
        assert parts["ignored"] == ["alphas_cumprod"]
