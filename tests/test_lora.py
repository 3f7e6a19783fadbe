"""LoRA: our on-the-fly LoRA forward against PEFT's on the diffusers UNet with the same factors; merged = on the fly;
the exported LoRA files load through diffusers' own loaders (PEFT naming into UNet2DConditionModel and
UNetMotionModel, kohya naming through `load_lora_weights`) and reproduce our output; a LoRA file imports back into
the same update; bad files give clear errors.

Tolerances: fp32 whole-UNet forward torch vs jax 1e-4 relative (as tests/test_export.py); merged vs on the fly 1e-5.
"""

from __future__ import annotations

import re
import shutil

import jax
import numpy as np
import peft
import pytest
import torch
from PIL import Image
from diffusers import MotionAdapter, StableDiffusionPipeline, UNet2DConditionModel, UNetMotionModel
from safetensors.numpy import load_file, save_file

from atomo_jax import export
from atomo_jax.convert import lora as cl
from atomo_jax.convert import torch_io
from atomo_jax.models import lora
from atomo_jax.models.unet import SpatioTemporalUNet
from atomo_jax.torch_ref.model import AtomoUNet, read_atomo_config
from atomo_jax.training.checkpoint import load_inference
from tests.conftest import TINY_DEMO, cli_env, losses, run
from tests.test_export import B, CONFIG, F, H, L, rel_err, small  # noqa: F401 (small: a fixture)

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
def base(small):
    """tests/test_export.py's random base weights exported with no LoRA (a folder AtomoUNet loads), its files, and the
    same weights with factors."""
    params, out = small
    return out, read_atomo_config(out)["files"], with_factors(params, SPEC)


def test_on_the_fly_lora_matches_peft_and_the_merged_weights(base):
    folder, _, params = base
    pairs = lora.factors(params)
    projections = [p for p in torch_io.flatten_shapes(params) if re.search(r"attn[12]/to_(q|k|v|out_0)/kernel$", p)]
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
    unpaired = tmp_path / "unpaired.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": np.zeros((4, 64), np.float32),
               "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": np.zeros((64, 3), np.float32)},
              str(unpaired))
    with pytest.raises(ValueError, match=r"lora_up.weight \(64, 3\) does not pair with lora_down.weight \(4, 64\)"):
        cl.read_file(unpaired, unet)
    empty = tmp_path / "empty.safetensors"
    save_file({"text_encoder.q.lora_A.weight": np.zeros((4, 8), np.float32)}, str(empty))
    with pytest.raises(ValueError, match="no UNet LoRA modules"):
        cl.read_file(empty, unet)


# ---- training through the CLI, as a user runs it ------------------------------------------------------------------

# Spatial + temporal attention LoRA (rank 4, alpha 8, dropout 0.1) beside a fully trainable set (conv_in and the
# motion modules' proj_out: zero at init, as AnimateDiff's is, it would keep the temporal LoRA's gradients at zero if
# frozen), on the tiny demo with batch 8 (so 8 fake devices take one example each); checkpoints every 2 steps and
# the end-of-run sample on.
LORA_RUN = [*TINY_DEMO, "--config.train.batch_size=8", "--config.train.num_steps=4", "--config.train.log_every=1",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3", "--config.sample.num_steps=2",
            "--config.train.trainable=('^conv_in/','motion_modules_[0-9]+/proj_out/')", "--config.train.lora.rank=4", "--config.train.lora.alpha=8",
            "--config.train.lora.dropout=0.1", "--config.train.lora.targets=('attn[12]/to_(q|k|v|out_0)/kernel$',)"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_run")
    out = run("atomo_jax.train", *LORA_RUN, f"--workdir={workdir}")
    assert "sample written" in out, out[-3000:]
    return workdir


def test_lora_training_changes_only_the_lora_and_the_trainable_set(lora_run):
    _, _, at2 = load_inference(str(lora_run / "checkpoints" / "2"), use_ema=False, merge_lora=False)
    _, _, at4 = load_inference(str(lora_run / "checkpoints" / "4"), use_ema=False, merge_lora=False)
    before, after = torch_io.flatten_shapes(at2["unet"]), torch_io.flatten_shapes(at4["unet"])
    assert set(before) == set(after)
    changed = sorted(p for p in before if not np.array_equal(before[p], after[p]))
    factors = [p for p in before if p.endswith(("/lora_a", "/lora_b"))]
    trainable = {p for p in before if p.startswith("conv_in/") or re.search(r"motion_modules_\d+/proj_out/", p)}
    # Nothing frozen moved; every fully trainable leaf and every lora_b did, but those of the spatial cross-attention
    # keys/values: the demo has no text encoder, so they see a zero context and get no gradient.
    assert set(changed) <= set(factors) | trainable, sorted(set(changed) - set(factors) - trainable)
    learning = {p for p in factors if p.endswith("lora_b") and not re.search(r"attentions_.*attn2/to_[kv]/", p)}
    assert learning | trainable <= set(changed), sorted(learning | trainable - set(changed))
    assert any("motion_modules" in p for p in factors) and any("/attentions_" in p for p in factors)
    for part in ("vae", "image_encoder"):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(at2[part]), jax.tree.leaves(at4[part])))


def test_lora_resume_is_exact_and_8_devices_match_one(lora_run, tmp_path):
    full = losses(lora_run)
    assert sorted(full) == [1, 2, 3, 4]
    # Resume from step 2 (the step-4 checkpoint removed): steps 3 and 4 again, bitwise.
    resumed = tmp_path / "resumed"
    shutil.copytree(lora_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    out = run("atomo_jax.train", *LORA_RUN, f"--workdir={resumed}", "--config.sample.at_end=False")
    assert "resumed from checkpoint at step 2" in out
    again = losses(resumed)
    assert again[3] == full[3] and again[4] == full[4], (again, full)
    # The same run on 8 fake devices, fsdp 8 (LoRA factors sharded by the rules, one example per device): the same
    # losses to fp32 reduction order (the dropout masks come from each example's key, not its device).
    sharded = tmp_path / "fsdp8"
    run("atomo_jax.train", *LORA_RUN, f"--workdir={sharded}", "--config.mesh.data=1", "--config.mesh.fsdp=8",
        "--config.sample.at_end=False", env=cli_env(8))
    eight = losses(sharded)
    np.testing.assert_allclose([eight[s] for s in range(1, 5)], [full[s] for s in range(1, 5)], rtol=2e-5)


def test_lora_export_separate_loads_in_torch_and_matches_the_merged_export(lora_run, tmp_path):
    merged_dir, separate_dir = tmp_path / "merged", tmp_path / "separate"
    run("atomo_jax.export", "--checkpoint", str(lora_run), "--out", str(merged_dir))
    run("atomo_jax.export", "--checkpoint", str(lora_run), "--out", str(separate_dir), "--lora=separate")
    assert (separate_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (merged_dir / "lora").exists()
    config, model, params = load_inference(str(lora_run))  # EMA weights, LoRA merged: what sampling runs
    unet_config = model.unet_config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 4, 4, unet_config.in_channels)).astype(np.float32)
    t = np.array([500.0], np.float32)
    ctx = rng.standard_normal((1, 1, unet_config.cross_attention_dim)).astype(np.float32)
    img = rng.standard_normal((1, unet_config.image_embed_dim)).astype(np.float32)
    want = np.asarray(jax.jit(model.unet.apply)({"params": params["unet"]}, x, t, ctx, img))

    def torch_out(folder):
        m = AtomoUNet.from_export(folder)
        with torch.no_grad():
            y = m(*(torch.from_numpy(a) for a in (x.transpose(0, 4, 1, 2, 3), t, ctx, img)))
        return y.permute(0, 2, 3, 4, 1).numpy()

    assert rel_err(torch_out(separate_dir), want) < 1e-4  # base folders + the LoRA through diffusers' loader
    assert rel_err(torch_out(merged_dir), want) < 1e-4

    # Our importer reads the exported file back: merged at strength -1 into the merged weights it gives the base.
    lora_file = separate_dir / "lora" / "pytorch_lora_weights.safetensors"
    _, _, raw = load_inference(str(lora_run), merge_lora=False)
    undone, updates = cl.merge_file(params["unet"], lora_file, -1.0)
    base_flat, undone_flat = torch_io.flatten_shapes(lora.without_factors(raw["unet"])), torch_io.flatten_shapes(undone)
    assert set(undone_flat) == set(base_flat) and len(updates.deltas) == len(lora.factors(raw["unet"]))
    for p in base_flat:
        np.testing.assert_allclose(undone_flat[p], base_flat[p], rtol=0, atol=2e-6, err_msg=p)

    # The sample CLI applies LoRA files the same way (--lora FILE[:STRENGTH]).
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(image)
    out = run("atomo_jax.sample", f"--checkpoint={lora_run}", f"--image={image}", "--steps=2", "--num_frames=4",
              f"--lora={lora_file}:0.5", f"--out={tmp_path / 'v.mp4'}")
    assert f"LoRA {lora_file} (peft naming, strength 0.5): {len(updates.deltas)} layers merged" in out
    assert (tmp_path / "v.mp4").stat().st_size > 0
