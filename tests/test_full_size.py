"""Full-size SD 1.5 UNet import without weights: the PyTorch models are built on the meta device and our UNet through
`jax.eval_shape`; every key must map onto our parameters with the right shape, none left over.

Weights are stand-ins: zero-stride numpy views (`np.broadcast_to`) of the torch shapes, so the real importer runs at
full size without allocating the model.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

from atomo_jax.convert import single_file, torch_io
from atomo_jax.convert import unet as cu
from atomo_jax.models.unet import UNetConfig

CONFIG = UNetConfig()  # SD 1.5 + temporal conv + AnimateDiff v2 motion modules + IP-Adapter SD 1.5 (ViT-H/14)


def stand_in(shape) -> np.ndarray:
    return np.broadcast_to(np.zeros((), np.float32), tuple(shape))


def sd15_unet_with_ip_adapter() -> UNet2DConditionModel:
    """SD 1.5 UNet (diffusers config of runwayml/stable-diffusion-v1-5) with IP-Adapter SD 1.5 processors, as
    `load_ip_adapter` leaves it."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        procs = {}
        for name, proc in unet.attn_processors.items():
            if name.endswith("attn2.processor"):
                hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.weight.shape[0]
                procs[name] = IPAdapterAttnProcessor2_0(hidden, cross_attention_dim=768, num_tokens=(4,))
            else:
                procs[name] = AttnProcessor2_0()
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(1024, 768, 4)])
    return unet


def torch_shapes(module: torch.nn.Module, keep=lambda k: True) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if keep(k)}


def test_full_size_sd15_keys_map_onto_our_unet():
    ours = cu.unet_param_shapes(CONFIG)
    flat = torch_io.flatten_shapes(ours)
    table = cu.unet_key_table(ours)

    sd = torch_shapes(sd15_unet_with_ip_adapter())
    with torch.device("meta"):
        unet3d = UNet3DConditionModel(cross_attention_dim=768)
        motion = UNetMotionModel(cross_attention_dim=768, motion_max_seq_length=32, motion_num_attention_heads=8,
                                 use_motion_mid_block=True)
    temp_convs = torch_shapes(unet3d, lambda k: ".temp_convs." in k)
    motion_modules = torch_shapes(motion, lambda k: ".motion_modules." in k and not k.endswith(".pos_embed.pe"))
    theirs = {**sd, **temp_convs, **motion_modules}
    assert len(theirs) == len(sd) + len(temp_convs) + len(motion_modules)

    # the table is a bijection onto the union of the diffusers models' keys, with matching shapes
    by_key = {r.torch_key: r for r in table}
    assert set(by_key) == set(theirs), (sorted(set(by_key) - set(theirs))[:5], sorted(set(theirs) - set(by_key))[:5])
    for key, row in by_key.items():
        shape = cu.to_torch_array(row.transform, stand_in(flat[row.flax_path].shape)).shape
        if key == "conv_in.weight":  # our 9 input channels; SD's 4 go into the noise slice
            assert shape == (320, 9, 3, 3) and theirs[key] == (320, 4, 3, 3)
        else:
            assert shape == theirs[key], key

    # the real importer on the SD + IP-Adapter state dict: all spatial and IP weights load, temporal ones are new
    init = {p: stand_in(v.shape) for p, v in flat.items()}
    params, report = cu.load_unet_state_dict({k: stand_in(s) for k, s in sd.items()}, CONFIG, init_params=init,
                                             source="SD 1.5 + IP-Adapter (meta)")
    assert sorted(report.newly_initialised) == sorted(p for p in flat if cu.is_temporal(p))
    assert len(report.loaded) == len(sd)
    print("\n" + report.summary())

    counts = cu.count_params(ours)
    sd_spatial = sum(int(np.prod(s)) for k, s in sd.items() if cu.is_spatial(k))
    assert counts["spatial"] == sd_spatial + 5 * 320 * 9  # the 5 extra input channels of conv_in
    assert counts["temporal"] == sum(int(np.prod(s)) for s in {**temp_convs, **motion_modules}.values())
    assert counts["ip_adapter"] == sum(int(np.prod(s)) for k, s in sd.items() if cu.is_ip_adapter(k))
    assert counts["total"] == counts["spatial"] + counts["temporal"] + counts["ip_adapter"]
    temp_conv_count = sum(int(np.prod(s)) for s in temp_convs.values())
    print(f"our full-size UNet: {counts['total'] / 1e6:.2f} M parameters = spatial {counts['spatial'] / 1e6:.2f} M "
          f"(SD 1.5: {sd_spatial / 1e6:.2f} M) + temporal {counts['temporal'] / 1e6:.2f} M (temporal conv "
          f"{temp_conv_count / 1e6:.2f} M, motion modules {(counts['temporal'] - temp_conv_count) / 1e6:.2f} M) "
          f"+ IP-Adapter {counts['ip_adapter'] / 1e6:.2f} M")


def test_full_size_single_file_layout_matches_diffusers_converter():
    with torch.device("meta"):
        shapes = torch_shapes(UNet2DConditionModel(cross_attention_dim=768))
    sd = {k: stand_in(s) for k, s in shapes.items()}
    ldm = single_file.diffusers_unet_to_ldm(sd)  # default layout: SD 1.5
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in ldm  # diffusers' SD v1 marker key
    assert "model.diffusion_model.output_blocks.8.2.conv.weight" in ldm  # last upsampler, after an attention
    ref = convert_ldm_unet_checkpoint(ldm, {"layers_per_block": 2})
    ours = single_file.ldm_unet_to_diffusers(ldm)
    assert set(ref) == set(ours) == set(sd)
    assert all(ours[k].shape == ref[k].shape == sd[k].shape for k in sd)
    assert single_file.infer_layout({k.removeprefix(single_file.LDM_UNET_PREFIX): v for k, v in ldm.items()}) \
        == single_file.LDMUNetLayout()
