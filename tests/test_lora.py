"""LoRA: our on-the-fly LoRA forward against PEFT's on the diffusers UNet with the same factors; merged = on the fly;
the exported LoRA files load through diffusers' own loaders (PEFT naming into UNet2DConditionModel and
UNetMotionModel, kohya naming through `load_lora_weights`) and reproduce our output; a LoRA file imports back into
the same update; bad files give clear errors.

Tolerances: fp32 whole-UNet forward torch vs jax 1e-4 relative (as tests/test_export.py); merged vs on the fly 1e-5.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import peft
import pytest
import torch
from diffusers import MotionAdapter, StableDiffusionPipeline, UNet2DConditionModel, UNetMotionModel
from safetensors.numpy import load_file, save_file

from atomo_jax import export
from atomo_jax.convert import lora as cl
from atomo_jax.models import lora
from atomo_jax.models.unet import SpatioTemporalUNet
from atomo_jax.torch_ref.model import AtomoUNet
from tests.test_export import B, CONFIG, F, H, L, random_params, rel_err

SPATIAL = r"attentions_\d+/transformer_blocks_\d+/attn[12]/to_(q|k|v|out_0)/kernel$"
TEMPORAL = r"motion_modules_\d+/transformer_blocks_\d+/attn[12]/to_(q|k|v|out_0)/kernel$"
SPEC = lora.LoraSpec(rank=4, alpha=6.0, dropout=0.0, targets=(SPATIAL, TEMPORAL))


def with_factors(params: dict, spec: lora.LoraSpec, seed: int = 1) -> dict:
    """`params` + factors with a non-zero lora_b (a fresh LoRA is the identity, which would hide every mistake)."""
    tree = lora.add_factors(params, spec, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (np.float32(0.2) * rng.standard_normal(x.shape)).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['lora_b']") else np.asarray(x), tree)


def inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, F, H, H, 9)).astype(np.float32), np.array([999.0, 321.0], np.float32),
            rng.standard_normal((B, L, CONFIG.cross_attention_dim)).astype(np.float32),
            rng.standard_normal((B, CONFIG.image_embed_dim)).astype(np.float32))


def ours(params: dict, spec: lora.LoraSpec, merged: bool = False) -> np.ndarray:
    model = SpatioTemporalUNet(CONFIG)
    if merged:
        return np.asarray(jax.jit(model.apply)({"params": lora.merged(params, spec.scale)}, *inputs()))

    def on_the_fly(p):
        with lora.applied(spec):
            return model.apply({"params": p}, *inputs())

    return np.asarray(jax.jit(on_the_fly)(params))


def torch_forward(model: AtomoUNet) -> np.ndarray:
    x, t, ctx, img = (torch.from_numpy(a) for a in inputs())
    with torch.no_grad():
        return model(x.permute(0, 4, 1, 2, 3), t, ctx, img).permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Random base weights, exported (no LoRA) to a folder AtomoUNet loads; and the same base with factors."""
    params = random_params(CONFIG)
    out = tmp_path_factory.mktemp("lora_base")
    files = export.export_unet(params, CONFIG, out, dtype="fp32", sample_size=H, progress=lambda _: None)
    export.write_atomo_config(out, files=files, unet_config=CONFIG)
    return out, files, with_factors(params, SPEC)


def test_on_the_fly_lora_matches_peft_and_the_merged_weights(base):
    folder, _, params = base
    pairs = lora.factors(params)
    projections = [p for p in cl._flat(params) if re.search(r"attn[12]/to_(q|k|v|out_0)/kernel$", p)]
    assert sorted(pairs) == sorted(projections) and any("motion_modules" in p for p in pairs)
    fly = ours(params, SPEC)
    assert rel_err(ours(params, SPEC, merged=True), fly) < 1e-5
    assert rel_err(ours(lora.without_factors(params), SPEC), fly) > 0.05  # the LoRA matters

    # PEFT's LoRA layers on the diffusers modules (peft.inject_adapter_in_model, the same r and lora_alpha), given
    # our factors: lora_A.weight = lora_a.T, lora_B.weight = lora_b.T.
    model = AtomoUNet.from_export(folder)
    table = {path: module for module, (path, _) in cl._module_table(params).items()}
    for part, owner, temporal in (("unet", model.unet, False), ("motion", model.motion_adapter, True)):
        mine = {table[p]: ab for p, ab in pairs.items() if ("motion_modules" in p) == temporal}
        config = peft.LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, target_modules=sorted(mine))
        peft.inject_adapter_in_model(config, owner, adapter_name="t")
        state = {f"{m}.lora_{n}.weight": torch.from_numpy(np.ascontiguousarray(v.T))
                 for m, (a, b) in mine.items() for n, v in (("A", a), ("B", b))}
        result = peft.set_peft_model_state_dict(owner, state, adapter_name="t")
        assert not result.unexpected_keys, (part, result.unexpected_keys[:3])
    assert rel_err(torch_forward(model), fly) < 1e-4


def test_exported_peft_file_loads_in_diffusers_and_reproduces_our_output(base, tmp_path):
    folder, files, params = base
    out = tmp_path / "export"
    out.mkdir()
    name = export.export_lora(params, SPEC.scale, out, progress=lambda _: None)
    export.export_unet(lora.without_factors(params), CONFIG, out, dtype="fp32", sample_size=H, progress=lambda _: None)
    export.write_atomo_config(out, files={**files, "lora": name}, unet_config=CONFIG)
    state = load_file(str(out / name))
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)

    # AtomoUNet.from_export applies the file through UNet2DConditionModel.load_lora_adapter (+ PEFT on the motion
    # modules): our output.
    assert rel_err(torch_forward(AtomoUNet.from_export(out)), ours(params, SPEC)) < 1e-4

    # The whole file (spatial + temporal) in UNetMotionModel, AnimateDiff's UNet, through diffusers' loader: every
    # module receives its factors, and W + B A equals our merged kernel.
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    motion = UNetMotionModel.from_unet2d(unet, MotionAdapter.from_pretrained(folder / "motion_adapter"))
    motion.load_lora_adapter(str(out / name), prefix="unet", adapter_name="t")
    merged = lora.merged(params, SPEC.scale)
    table = cl._module_table(params)
    for key in (k for k in state if k.endswith("lora_A.weight")):
        module = key.removeprefix("unet.").removesuffix(".lora_A.weight")
        layer = motion.get_submodule(module)
        assert isinstance(layer, peft.tuners.lora.Linear), module
        got = layer.get_delta_weight("t") + layer.base_layer.weight.detach()
        path, _ = table[module]
        want = np.asarray(_at(merged, path)).T
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-6)

    # Importing the file back gives our update, scale included.
    updates = cl.read_file(out / name, params)
    assert updates.fmt == cl.PEFT and not updates.ignored and set(updates.deltas) == set(lora.factors(params))
    for path, (a, b) in lora.factors(params).items():
        np.testing.assert_allclose(updates.deltas[path], SPEC.scale * (a @ b).T, rtol=1e-5, atol=1e-7)


def _at(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def test_kohya_file_loads_through_load_lora_weights(base, tmp_path):
    """A spatial-only LoRA in kohya naming: diffusers' `load_lora_weights` (its kohya conversion, alpha honoured)
    into an SD pipeline's UNet gives our output; our importer merges it into the same kernels."""
    folder, _, params = base
    spec = lora.LoraSpec(rank=3, alpha=1.5, dropout=0.0, targets=(SPATIAL,))
    params = with_factors(lora.without_factors(params), spec, seed=2)
    state = cl.to_state_dict(lora.factors(params), spec.scale, params, cl.KOHYA)
    assert all(k.startswith("lora_unet_") for k in state)
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))

    model = AtomoUNet.from_export(folder)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=model.unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    assert rel_err(torch_forward(model), ours(params, spec)) < 1e-4

    merged, updates = cl.merge_file(lora.without_factors(params), path)
    assert updates.fmt == cl.KOHYA
    assert rel_err(np.asarray(jax.jit(SpatioTemporalUNet(CONFIG).apply)({"params": merged}, *inputs())),
                   ours(params, spec)) < 1e-5
    with pytest.raises(ValueError, match="kohya LoRA naming has no temporal layers"):
        cl.to_state_dict(lora.factors(with_factors(lora.without_factors(params), SPEC)), 1.0, params, cl.KOHYA)


def test_bad_lora_input_gives_clear_errors(base, tmp_path):
    _, _, params = base
    unet = lora.without_factors(params)
    with pytest.raises(ValueError, match="matches no kernel"):
        lora.add_factors(unet, lora.LoraSpec(4, 4.0, 0.0, ("no_such_layer",)), jax.random.key(0))
    with pytest.raises(ValueError, match="not dense"):
        lora.add_factors(unet, lora.LoraSpec(4, 4.0, 0.0, ("conv_in/kernel",)), jax.random.key(0))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 7), np.float32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((32, 4), np.float32),
               "unet.down_blocks.9.attn1.to_q.lora_A.weight": np.zeros((4, 32), np.float32),
               "unet.down_blocks.9.attn1.to_q.lora_B.weight": np.zeros((32, 4), np.float32),
               "text_encoder.layers.0.q_proj.lora_A.weight": np.zeros((4, 8), np.float32)}, str(wrong))
    with pytest.raises(ValueError, match=r"2 modules do not fit.*update \(32, 7\).*down_blocks\.9\.attn1\.to_q: no such"):
        cl.read_file(wrong, unet)
    empty = tmp_path / "empty.safetensors"
    save_file({"text_encoder.q.lora_A.weight": np.zeros((4, 8), np.float32)}, str(empty))
    with pytest.raises(ValueError, match="no UNet LoRA modules"):
        cl.read_file(empty, unet)
