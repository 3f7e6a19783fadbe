"""Export a trained checkpoint to PyTorch: safetensors + JSON configs under diffusers / transformers names.

  python -m atomo_jax.export --checkpoint /tmp/atomo_demo --out /tmp/atomo_demo_torch [--weights ema|raw] \
      [--dtype fp32|bf16|fp16] [--lora merge|separate] [--lora_format peft|kohya]

`--checkpoint` is a training workdir (its latest checkpoint), its `checkpoints/` folder or one step folder.
The export folder holds, wherever diffusers or transformers has the part, a folder its `from_pretrained` loads:
  unet/                      UNet2DConditionModel: the spatial SD 1.5 layers with the 9-channel conv_in
  motion_adapter/            MotionAdapter: the temporal attention (AnimateDiff motion modules)
  temporal_convs.safetensors the temporal convolutions, in UNet3DConditionModel names (down_blocks.0.temp_convs.0...)
  lora/                      with --lora=separate, a LoRA run's LoRA alone (the folders above then hold the base):
                             pytorch_lora_weights.safetensors (PEFT/diffusers naming, `pipe.load_lora_weights`) or
                             lora_kohya.safetensors (--lora_format=kohya); by default the LoRA is merged instead
  ip_adapter.safetensors     IP-Adapter, original layout (image_proj.*, ip_adapter.{1,3,...}.to_{k,v}_ip.weight),
                             as diffusers' `load_ip_adapter` reads it
  vae/                       AutoencoderKL (an SD VAE), or only config.json for the demo's weightless pixel autoencoder
  image_encoder/             CLIPVisionModelWithProjection
  text_encoder/              CLIPTextModel (absent when the model has no text encoder)
  scheduler/                 DDIMScheduler config of our noise schedule (zero SNR, trailing, v-prediction)
  atomo_config.json          our training config, the UNet config and what the export holds
`atomo_jax.torch_ref` runs the export in PyTorch with our outputs. Names come from the import converters' tables
(`atomo_jax.convert`), inverted, and every file is checked against the diffusers / transformers model built from the
written config (on the meta device) before it is written: no key missing, none left over, every shape right.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from atomo_jax.convert import clip as cc
from atomo_jax.convert import ip_adapter as ip
from atomo_jax.convert import lora as cl
from atomo_jax.convert import torch_io
from atomo_jax.convert import unet as cu
from atomo_jax.convert import vae as cv
from atomo_jax.models import lora
from atomo_jax.models.embeddings import sinusoidal_positions
from atomo_jax.models.pixel_autoencoder import PixelAutoencoder
from atomo_jax.training import checkpoint as ckpt

FORMAT_VERSION = 1
DTYPES = ("fp32", "bf16", "fp16")
WEIGHTS = ("ema", "raw")
UNET_DIR, MOTION_DIR, VAE_DIR = "unet", "motion_adapter", "vae"
IMAGE_ENCODER_DIR, TEXT_ENCODER_DIR, SCHEDULER_DIR = "image_encoder", "text_encoder", "scheduler"
TEMPORAL_CONVS_FILE, IP_ADAPTER_FILE, ATOMO_CONFIG = "temporal_convs.safetensors", "ip_adapter.safetensors", \
    "atomo_config.json"
DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS = "diffusion_pytorch_model.safetensors", "model.safetensors"
LORA_MODES, LORA_DIR = ("merge", "separate"), "lora"
# diffusers' default LoRA weight name, so `pipe.load_lora_weights(EXPORT/lora)` finds the PEFT file.
LORA_FILES = {cl.PEFT: "pytorch_lora_weights.safetensors", cl.KOHYA: "lora_kohya.safetensors"}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Configs of the diffusers / transformers models that hold our parts.

def diffusers_unet_config(config: Any, sample_size: int = 64) -> dict[str, Any]:
    """Our UNetConfig -> `UNet2DConditionModel` kwargs of its spatial layers (SD 1.5 layout, our in_channels)."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.down_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.down_attention))
    return dict(sample_size=sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
                flip_sin_to_cos=True, freq_shift=0, down_block_types=down, mid_block_type="UNetMidBlock2DCrossAttn",
                up_block_types=up, block_out_channels=tuple(config.block_out_channels),
                layers_per_block=config.layers_per_block, norm_num_groups=config.norm_num_groups,
                norm_eps=config.norm_eps, cross_attention_dim=config.cross_attention_dim,
                transformer_layers_per_block=config.transformer_layers,
                attention_head_dim=config.num_attention_heads, act_fn="silu", use_linear_projection=False)


def motion_adapter_config(config: Any) -> dict[str, Any]:
    """Our UNetConfig -> `MotionAdapter` kwargs."""
    return dict(block_out_channels=tuple(config.block_out_channels), motion_layers_per_block=config.layers_per_block,
                motion_transformer_layers_per_block=config.motion_layers, motion_mid_block_layers_per_block=1,
                motion_transformer_layers_per_mid_block=config.motion_layers,
                motion_num_attention_heads=config.motion_num_heads, motion_norm_num_groups=config.norm_num_groups,
                motion_max_seq_length=config.motion_max_seq_length, use_motion_mid_block=config.motion_mid_block)


def autoencoder_kl_config(config: Any, sample_size: int) -> dict[str, Any]:
    """Our VAEConfig -> `AutoencoderKL` kwargs."""
    n = len(config.block_out_channels)
    return dict(in_channels=config.in_channels, out_channels=config.out_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
                act_fn="silu", latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
                sample_size=sample_size, scaling_factor=config.scaling_factor,
                mid_block_add_attention=config.mid_block_add_attention)


def clip_config_dict(config: Any) -> dict[str, Any]:
    """Our CLIPTextConfig / CLIPVisionConfig -> the transformers config kwargs (same field names)."""
    return dataclasses.asdict(config)


def ddim_scheduler_config(diffusion: Mapping[str, Any]) -> dict[str, Any]:
    """The training noise schedule as `DDIMScheduler` kwargs, with our sampler's settings (trailing spacing, final
    alpha 1, no clipping)."""
    return dict(num_train_timesteps=int(diffusion["num_train_timesteps"]), beta_start=float(diffusion["beta_start"]),
                beta_end=float(diffusion["beta_end"]), beta_schedule=str(diffusion["beta_schedule"]),
                rescale_betas_zero_snr=bool(diffusion["rescale_zero_snr"]),
                prediction_type=str(diffusion["prediction_type"]), timestep_spacing="trailing", clip_sample=False,
                set_alpha_to_one=True, steps_offset=0)


# ---------------------------------------------------------------------------------------------------------------
# Key tables: (flax_path, torch_key, transform) rows per exported file, from the import converters' tables.

def unet_export_tables(shapes: Any, config: Any) -> dict[str, list]:
    """Rows of the four UNet files: {"unet", "motion_adapter", "temporal_convs", "ip_adapter"} (the last in the
    original IP-Adapter layout). `shapes`: our UNet params tree (arrays or ShapeDtypeStructs, no "params" level)."""

    table = cu.unet_key_table(shapes)
    tables = {"unet": [r for r in table if cu.is_spatial(r.flax_path)],
              "motion_adapter": [r for r in table if "motion_modules" in r.flax_path],
              "temporal_convs": [r for r in table if "temp_convs" in r.flax_path],
              "ip_adapter": []}
    ip_rows = [r for r in table if cu.is_ip_adapter(r.flax_path)]
    if ip_rows:
        # Invert the IP-Adapter importer: both layouts map onto the same module-tree key.
        modules = ip.cross_attention_modules(config)
        originals = [f"image_proj.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")]
        originals += [f"ip_adapter.{2 * i + 1}.{n}.weight" for i in range(len(modules)) for n in ("to_k_ip", "to_v_ip")]
        by_module = {ip.module_key(k, "original", modules): k for k in originals}
        for row in ip_rows:
            module_key = ip.module_key(row.torch_key, "diffusers", modules)
            if module_key not in by_module:
                raise ValueError(f"IP-Adapter parameter {row.flax_path} ({row.torch_key}) has no original-layout name")
            tables["ip_adapter"].append(row._replace(torch_key=by_module[module_key]))
    return tables


def module_export_table(torch_shapes: Mapping[str, tuple[int, ...]], rename: Callable[[str], str | None],
                        embeddings: tuple[str, ...] = ()) -> list:
    """Rows for a transformers / diffusers model imported by `convert_state_dict(rename=..., embeddings=...)`:
    every key of the torch model (its state-dict shapes) sent through the importer's own renaming."""

    rows = []
    for key, shape in sorted(torch_shapes.items()):
        new = rename(key)
        if new is None:  # a buffer the importer skips (position_ids)
            continue
        path, _ = torch_io.torch_to_flax(new, np.broadcast_to(np.float32(0), shape), embeddings=embeddings)
        transform = cu.COPY if not path.endswith("/kernel") else (cu.LINEAR if len(shape) == 2 else cu.CONV)
        rows.append(cu.KeyMap(path, key, transform))
    return rows


def _torch_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:

    return tuple(cu.to_torch_array(transform, np.broadcast_to(np.float32(0), shape)).shape)


def position_table_blocks(keys: Any) -> list[str]:
    """Key prefixes of MotionAdapter's transformer blocks, each of which stores a fixed `pos_embed.pe` buffer
    (1, L, C): our model computes that table, diffusers keeps it in the state dict."""
    suffix = "norm1.weight"
    return sorted(k[: -len(suffix)] for k in keys if ".transformer_blocks." in k and k.endswith("." + suffix))


def unet_export_shapes(config: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """{file part: {torch key: torch shape}} of the UNet files for a UNetConfig (no memory: `jax.eval_shape`)."""

    shapes = cu.unet_param_shapes(config)
    flat = torch_io.flatten_shapes(shapes)
    out = {part: {r.torch_key: _torch_shape(r.transform, tuple(flat[r.flax_path].shape)) for r in rows}
           for part, rows in unet_export_tables(shapes, config).items()}
    motion = out["motion_adapter"]
    for block in position_table_blocks(list(motion)):
        motion[block + "pos_embed.pe"] = (1, config.motion_max_seq_length, motion[block + "norm1.weight"][0])
    return out


def apply_table(rows: list, params: Any) -> dict[str, np.ndarray]:
    """Rows + our params tree -> {torch_key: array in the torch layout}."""

    flat = torch_io.flatten_shapes(params)
    return {r.torch_key: np.ascontiguousarray(cu.to_torch_array(r.transform, np.asarray(flat[r.flax_path])))
            for r in rows}


def check_complete(params: Any, tables: Mapping[str, list], part: str) -> None:
    """Every parameter of `params` goes into exactly one exported key."""
    used: dict[str, str] = {}
    for name, rows in tables.items():
        for r in rows:
            if r.flax_path in used:
                raise ValueError(f"{part}: parameter {r.flax_path} exported twice ({used[r.flax_path]}, {name})")
            used[r.flax_path] = name
    left = sorted(set(torch_io.flatten_shapes(params)) - set(used))
    if left:
        raise ValueError(f"{part}: {len(left)} parameters have no exported name: {left[:20]}")


def check_against(reference: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Any], what: str) -> None:
    """Exported keys/shapes == the reference torch model's state-dict keys/shapes; one error lists every problem."""
    missing = sorted(set(reference) - set(tensors))
    unexpected = sorted(set(tensors) - set(reference))
    misshaped = sorted(f"{k}: exported {tuple(np.shape(tensors[k]))}, {what} has {tuple(reference[k])}"
                       for k in set(reference) & set(tensors) if tuple(np.shape(tensors[k])) != tuple(reference[k]))
    if missing or unexpected or misshaped:
        lines = [f"export does not match {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))


def _meta_shapes(build: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    import torch  # optional dependency: the [torch] extra

    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Writing.

def _save_safetensors(tensors: Mapping[str, np.ndarray], path: Path, dtype: str) -> None:
    import torch  # optional dependency: the [torch] extra
    from safetensors.torch import save_file  # optional dependency: the [torch] extra

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if dtype == "fp16":
        limit = float(np.finfo(np.float16).max)
        too_big = sorted(k for k, v in tensors.items() if v.size and float(np.max(np.abs(v))) > limit)
        if too_big:
            raise ValueError(f"--dtype fp16: weights exceed the fp16 range ({limit:g}) in {too_big[:10]}; "
                             f"export with --dtype bf16 or fp32")
    out = {k: torch.from_numpy(np.array(v, np.float32)).to(torch_dtype) for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt"})


def export_unet(params: Any, config: Any, out: Path, *, dtype: str = "fp32", sample_size: int = 64,
                progress: Callable[[str], None] = _log) -> dict[str, str | None]:
    """Our UNet params (no "params" level) + UNetConfig -> the unet/, motion_adapter/, temporal_convs and
    ip_adapter files under `out`. Returns {part: relative path or None when the model has no such part}."""
    # optional dependency: the [torch] extra
    from diffusers import MotionAdapter, UNet2DConditionModel

    tables = unet_export_tables(params, config)
    check_complete(params, tables, "unet")
    files: dict[str, str | None] = {}

    unet_kwargs = diffusers_unet_config(config, sample_size)
    tensors = apply_table(tables["unet"], params)
    reference = _meta_shapes(lambda: UNet2DConditionModel(**unet_kwargs))
    check_against(reference, tensors, "diffusers UNet2DConditionModel")
    progress(f"  unet: {len(tensors)} tensors -> {UNET_DIR}/ (UNet2DConditionModel, in_channels={config.in_channels})")
    _save_safetensors(tensors, out / UNET_DIR / DIFFUSERS_WEIGHTS, dtype)
    _save_diffusers_config(UNet2DConditionModel, unet_kwargs, out / UNET_DIR)
    files["unet"] = UNET_DIR

    files["motion_adapter"] = None
    if tables["motion_adapter"]:
        motion_kwargs = motion_adapter_config(config)
        tensors = apply_table(tables["motion_adapter"], params)
        for block in position_table_blocks(list(tensors)):
            channels = tensors[block + "norm1.weight"].shape[0]
            tensors[block + "pos_embed.pe"] = sinusoidal_positions(config.motion_max_seq_length, channels)[None]
        check_against(_meta_shapes(lambda: MotionAdapter(**motion_kwargs)), tensors, "diffusers MotionAdapter")
        progress(f"  temporal attention: {len(tensors)} tensors -> {MOTION_DIR}/ (MotionAdapter)")
        _save_safetensors(tensors, out / MOTION_DIR / DIFFUSERS_WEIGHTS, dtype)
        _save_diffusers_config(MotionAdapter, motion_kwargs, out / MOTION_DIR)
        files["motion_adapter"] = MOTION_DIR

    files["temporal_convs"] = None
    if tables["temporal_convs"]:
        tensors = apply_table(tables["temporal_convs"], params)
        progress(f"  temporal convolutions: {len(tensors)} tensors -> {TEMPORAL_CONVS_FILE} (UNet3DConditionModel "
                 f"temp_convs names)")
        _save_safetensors(tensors, out / TEMPORAL_CONVS_FILE, dtype)
        files["temporal_convs"] = TEMPORAL_CONVS_FILE

    files["ip_adapter"] = None
    if tables["ip_adapter"]:
        tensors = apply_table(tables["ip_adapter"], params)
        if config.ip_tokens != 4:
            progress(f"  note: ip_tokens={config.ip_tokens}; diffusers' load_ip_adapter assumes 4 image tokens for "
                     f"this layout (atomo_jax.torch_ref loads any count)")
        progress(f"  IP-Adapter: {len(tensors)} tensors -> {IP_ADAPTER_FILE} (original image_proj/ip_adapter layout)")
        _save_safetensors(tensors, out / IP_ADAPTER_FILE, dtype)
        files["ip_adapter"] = IP_ADAPTER_FILE
    return files


def _save_diffusers_config(cls: type, kwargs: Mapping[str, Any], folder: Path) -> None:
    import torch  # optional dependency: the [torch] extra

    with torch.device("meta"):
        module = cls(**kwargs)
    module.save_config(str(folder))


def _transformers_part(cls_name: str, our_config: Any, params: Any, rename: Callable, embeddings: tuple[str, ...],
                       folder: Path, dtype: str) -> int:
    import transformers  # optional dependency: the [torch] extra

    model_cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("WithProjection", "").replace("Model", "Config"))
    hf_config = config_cls(**clip_config_dict(our_config))
    hf_config.architectures = [cls_name]
    reference = _meta_shapes(lambda: model_cls(hf_config))
    rows = module_export_table(reference, rename, embeddings)
    check_complete(params, {cls_name: rows}, cls_name)
    tensors = apply_table(rows, params)
    check_against({k: reference[k] for k in (r.torch_key for r in rows)}, tensors, f"transformers {cls_name}")
    _save_safetensors(tensors, folder / TRANSFORMERS_WEIGHTS, dtype)
    hf_config.save_pretrained(str(folder))
    return len(tensors)


def export_encoders(model: Any, params: Mapping[str, Any], out: Path, *, dtype: str, sample_size: int,
                    progress: Callable[[str], None] = _log) -> dict[str, str | None]:
    """VAE, CLIP image encoder and text encoder in diffusers / transformers folders."""
    from diffusers import AutoencoderKL  # optional dependency: the [torch] extra


    files: dict[str, str | None] = {}
    if isinstance(model.vae, PixelAutoencoder):
        (out / VAE_DIR).mkdir(parents=True, exist_ok=True)
        spec = dict(_class_name="PixelAutoencoder", **dataclasses.asdict(model.vae.config),
                    note="weightless pixel-space stand-in of the demo: 2x2 average pool + fixed 3->4 channel map; "
                         "atomo_jax.torch_ref.sample implements it")
        (out / VAE_DIR / "config.json").write_text(json.dumps(spec, indent=2) + "\n")
        progress(f"  vae: pixel autoencoder (no weights) -> {VAE_DIR}/config.json")
    else:
        kwargs = autoencoder_kl_config(model.vae.config, sample_size)
        reference = _meta_shapes(lambda: AutoencoderKL(**kwargs))
        rows = module_export_table(reference, cv._rename_diffusers)
        check_complete(params["vae"], {"vae": rows}, "vae")
        tensors = apply_table(rows, params["vae"])
        check_against(reference, tensors, "diffusers AutoencoderKL")
        _save_safetensors(tensors, out / VAE_DIR / DIFFUSERS_WEIGHTS, dtype)
        _save_diffusers_config(AutoencoderKL, kwargs, out / VAE_DIR)
        progress(f"  vae: {len(tensors)} tensors -> {VAE_DIR}/ (AutoencoderKL)")
    files["vae"] = VAE_DIR

    n = _transformers_part("CLIPVisionModelWithProjection", model.image_encoder.config, params["image_encoder"],
                           cc._rename_vision, cc._VISION_EMBEDDINGS, out / IMAGE_ENCODER_DIR, dtype)
    progress(f"  image encoder: {n} tensors -> {IMAGE_ENCODER_DIR}/ (CLIPVisionModelWithProjection)")
    files["image_encoder"] = IMAGE_ENCODER_DIR

    files["text_encoder"] = None
    if model.text_encoder is not None:
        n = _transformers_part("CLIPTextModel", model.text_encoder.config, params["text_encoder"], cc._rename_text,
                               cc._TEXT_EMBEDDINGS, out / TEXT_ENCODER_DIR, dtype)
        progress(f"  text encoder: {n} tensors -> {TEXT_ENCODER_DIR}/ (CLIPTextModel)")
        files["text_encoder"] = TEXT_ENCODER_DIR
    return files


def export_lora(unet: Any, scale: float, out: Path, *, fmt: str = cl.PEFT, dtype: str = "fp32",
                progress: Callable[[str], None] = _log) -> str:
    """The LoRA factors of a UNet params tree (unmerged) -> LORA_DIR/<the format's file> under `out`; returns the
    file's path relative to `out`."""
    pairs = lora.factors(unet)
    tensors = cl.to_state_dict(pairs, scale, unet, fmt)
    name = f"{LORA_DIR}/{LORA_FILES[fmt]}"
    rank = int(next(iter(pairs.values()))[0].shape[1])
    progress(f"  LoRA: {len(pairs)} layers, rank {rank} -> {name} ({fmt} naming)")
    _save_safetensors(tensors, out / name, dtype)
    return name


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, weights: str = "ema", dtype: str = "fp32",
                      lora_mode: str = "merge", lora_format: str = cl.PEFT, overwrite: bool = False,
                      progress: Callable[[str], None] = _log) -> Path:
    """A training checkpoint -> an export folder (see the module docstring). Returns the folder. A LoRA run's
    factors are folded into the weights (`lora_mode="merge"`), or (`"separate"`) the folders hold the base weights
    and LORA_DIR the LoRA alone, in `lora_format` naming."""
    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode={lora_mode!r}: expected one of {LORA_MODES}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHTS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory (expected a training workdir, its "
                                f"checkpoints/ folder or one <step>/ folder)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"--out {out} exists and is not an empty directory; pass --overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()

    progress(f"[1/4] loading {checkpoint} ({weights} weights)")
    step_dir = ckpt._resolve_step_dir(str(checkpoint))
    config, model, params = ckpt.load_inference(str(step_dir), use_ema=(weights == "ema"),
                                                merge_lora=lora_mode == "merge")
    factor = _vae_factor(model)
    sample_size = int(config.data.resolution) // factor
    out.mkdir(parents=True, exist_ok=True)
    progress(f"[2/4] UNet -> {out} ({dtype})")
    unet, lora_file = params["unet"], None
    if lora_mode == "separate":
        if not lora.has_factors(unet):
            raise ValueError(f"--lora=separate: checkpoint {step_dir} was not trained with LoRA "
                             f"(config.train.lora.rank=0)")
        lora_file = export_lora(unet, lora.LoraSpec.from_config(config.train.lora).scale, out, fmt=lora_format,
                                dtype=dtype, progress=progress)
        unet = lora.without_factors(unet)
    files = export_unet(unet, model.unet_config, out, dtype=dtype, sample_size=sample_size, progress=progress)
    files["lora"] = lora_file
    progress("[3/4] autoencoder and encoders")
    files.update(export_encoders(model, params, out, dtype=dtype, sample_size=int(config.data.resolution),
                                 progress=progress))
    progress("[4/4] configs")
    from diffusers import DDIMScheduler  # optional dependency: the [torch] extra

    DDIMScheduler(**ddim_scheduler_config(config.diffusion)).save_config(str(out / SCHEDULER_DIR))
    files["scheduler"] = SCHEDULER_DIR
    write_atomo_config(out, files=files, unet_config=model.unet_config, checkpoint=str(step_dir),
                       step=int(step_dir.name) if step_dir.name.isdigit() else None, weights=weights, dtype=dtype,
                       latent_scale=float(model.latent_scale), vae_factor=factor,
                       config=json.loads(config.to_json_best_effort()))
    progress(f"done: {out}")
    return out


def write_atomo_config(out: Path, *, files: Mapping[str, str | None], unet_config: Any, **extra: Any) -> Path:
    """atomo_config.json: what the export holds (`files`), our UNet config and `extra` (the training config,
    weights, dtype, ...). `atomo_jax.torch_ref` builds the model from it."""
    unet = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(unet_config).items()}
    meta = dict(format="atomo_jax.export", version=FORMAT_VERSION, files=dict(files), unet=unet, **extra)
    path = Path(out) / ATOMO_CONFIG
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _vae_factor(model: Any) -> int:

    if isinstance(model.vae, PixelAutoencoder):
        return int(model.vae.config.factor)
    return int(model.vae.config.downsample_factor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atomo_jax.export",
        description="Export a trained atomo_jax checkpoint to PyTorch (safetensors + diffusers/transformers configs); "
                    "run it with atomo_jax.torch_ref.")
    parser.add_argument("--checkpoint", required=True,
                        help="training workdir, its checkpoints/ folder or a step folder")
    parser.add_argument("--out", required=True, help="export folder to create")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA (default) or raw trained weights")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the written tensors")
    parser.add_argument("--lora", choices=LORA_MODES, default="merge",
                        help="a LoRA run: fold the LoRA into the exported weights (merge, default), or export the base "
                             f"weights and the LoRA alone under {LORA_DIR}/ (separate)")
    parser.add_argument("--lora_format", choices=cl.FORMATS, default=cl.PEFT,
                        help="naming of the separate LoRA file: peft (diffusers' load_lora_weights / "
                             "load_lora_adapter, spatial and temporal) or kohya (lora_unet_*, spatial only)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint, args.out, weights=args.weights, dtype=args.dtype, lora_mode=args.lora,
                          lora_format=args.lora_format, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The `atomo-export` console script and `python -m atomo_jax.export`."""
    sys.exit(main())


if __name__ == "__main__":
    run()
