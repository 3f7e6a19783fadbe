"""diffusers UNet weights <-> our `SpatioTemporalUNet` params, through one key table built from our params tree.

`unet_key_table(shapes)` lists `(flax_path, torch_key, transform)` for every parameter of our UNet. Torch names are
the diffusers ones, whichever diffusers model holds that layer:
- spatial layers: `UNet2DConditionModel` (SD 1.5) names, e.g. `down_blocks.0.resnets.0.conv1.weight`;
- temporal convolutions: `UNet3DConditionModel` names, `down_blocks.0.temp_convs.0.conv1.0.weight` (GroupNorm) and
  `.conv1.2.weight` / `.conv{2,3,4}.3.weight` (Conv3d; conv2..4 carry a Dropout at index 2);
- motion modules: `UNetMotionModel` / `MotionAdapter` names, `down_blocks.0.motion_modules.0.proj_in.weight`;
- IP-Adapter: the names of a diffusers UNet after `load_ip_adapter`,
  `...attn2.processor.to_k_ip.0.weight` and `encoder_hid_proj.image_projection_layers.0.image_embeds.weight`.
The table works both ways: `load_unet_state_dict` imports, `unet_params_to_torch` exports.

Importing an SD 1.5 UNet: the spatial layers must all be present (a missing, unexpected or mis-shaped key is an error
listing all of them); the 4-channel `conv_in` goes into the noise slice [0:4] of our 9-channel kernel with the
mask/image slices zero; temporal and IP-Adapter layers absent from the checkpoint keep our fresh initialisation
(temporal ones are the identity) and are reported as newly initialised.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from atomo_jax.convert import torch_io
from atomo_jax.models.unet import SpatioTemporalUNet, UNetConfig

# Flax modules named `<list>_<i>` that are entry i of a torch ModuleList / Sequential called <list>.
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "temp_convs", "motion_modules", "transformer_blocks",
          "downsamplers", "upsamplers", "to_out", "net")
_LIST_ITEM = re.compile(rf"^({'|'.join(_LISTS)})_(\d+)$")
_TEMP_CONV_STAGE = re.compile(r"^conv([1-4])_(norm|conv)$")
_FIXED_MODULES = {"time_embedding_linear_1": "time_embedding.linear_1",
                  "time_embedding_linear_2": "time_embedding.linear_2",
                  "image_proj": "encoder_hid_proj.image_projection_layers.0"}
_PARAM_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}

LINEAR, CONV, COPY = "linear", "conv", "copy"


class KeyMap(NamedTuple):
    flax_path: str  # "/"-joined path in the params tree (no "params" level), e.g. "conv_in/kernel"
    torch_key: str  # diffusers state-dict key, e.g. "conv_in.weight"
    transform: str  # LINEAR: (O, I) <-> (I, O); CONV: (O, I, *k) <-> (*k, I, O); COPY: unchanged


def is_temporal(path: str) -> bool:
    """Temporal convolution or motion-module parameter (Flax path or torch key)."""
    return "temp_convs" in path or "motion_modules" in path


def is_ip_adapter(path: str) -> bool:
    return "to_k_ip" in path or "to_v_ip" in path or path.startswith(("image_proj", "encoder_hid_proj"))


def is_spatial(path: str) -> bool:
    """An SD 1.5 parameter: everything that is neither temporal nor IP-Adapter."""
    return not is_temporal(path) and not is_ip_adapter(path)


def _torch_module(parts: list[str]) -> str:
    out = []
    for i, part in enumerate(parts):
        parent = parts[i - 1] if i else ""
        if part in _FIXED_MODULES:
            out.append(_FIXED_MODULES[part])
        elif m := _LIST_ITEM.match(part):
            out.append(f"{m.group(1)}.{m.group(2)}")
        elif parent.startswith("temp_convs_") and (m := _TEMP_CONV_STAGE.match(part)):
            stage = int(m.group(1))
            # Sequential(GroupNorm, SiLU, Conv3d) for conv1, Sequential(GroupNorm, SiLU, Dropout, Conv3d) after.
            index = 0 if m.group(2) == "norm" else (2 if stage == 1 else 3)
            out.append(f"conv{stage}.{index}")
        elif part in ("to_k_ip", "to_v_ip"):
            out.append(f"processor.{part}.0")  # IPAdapterAttnProcessor keeps one projection per adapter
        elif part.rsplit("_", 1)[-1].isdigit():
            raise ValueError(f"UNet parameter module {'/'.join(parts)!r}: {part!r} has no known torch name; "
                             f"extend atomo_jax/convert/unet.py")
        else:
            out.append(part)
    return ".".join(out)


def flax_to_torch_key(flax_path: str, ndim: int) -> KeyMap:
    """One parameter's table row. `ndim` is the rank of the Flax parameter (it decides the layout transform)."""
    *modules, name = flax_path.split("/")
    if name not in _PARAM_NAMES:
        raise ValueError(f"UNet parameter {flax_path!r}: unknown parameter name {name!r}")
    transform = COPY if name != "kernel" else (LINEAR if ndim == 2 else CONV)
    return KeyMap(flax_path, f"{_torch_module(modules)}.{_PARAM_NAMES[name]}", transform)


def unet_key_table(shapes: Any) -> list[KeyMap]:
    """Table rows for every parameter of a UNet params tree (arrays or `ShapeDtypeStruct`s, boxed or not,
    without the "params" level), sorted by Flax path."""
    flat = torch_io.flatten_shapes(shapes)
    table = [flax_to_torch_key(path, len(value.shape)) for path, value in sorted(flat.items())]
    seen: dict[str, str] = {}
    for row in table:
        if row.torch_key in seen:
            raise ValueError(f"UNet key table: {seen[row.torch_key]} and {row.flax_path} both map to {row.torch_key}")
        seen[row.torch_key] = row.flax_path
    return table


def to_flax_array(transform: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if transform == LINEAR:
        return value.T if value.ndim == 2 else value
    if transform == CONV:
        return np.transpose(value, tuple(range(2, value.ndim)) + (1, 0)) if value.ndim >= 3 else value
    return value


def to_torch_array(transform: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if transform == LINEAR:
        return value.T
    if transform == CONV:
        k = value.ndim - 2
        return np.transpose(value, (k + 1, k) + tuple(range(k)))
    return value


# ---------------------------------------------------------------------------------------------------------------
# Shapes and fresh parameters of our UNet.

def _init_inputs(config: UNetConfig) -> tuple[jax.Array, ...]:
    side = 2 ** (len(config.block_out_channels) - 1)
    sample = jnp.zeros((1, 2, side, side, config.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    image = jnp.zeros((1, config.image_embed_dim), jnp.float32) if config.ip_adapter else None
    return sample, jnp.zeros((1,), jnp.float32), context, image


@functools.lru_cache(maxsize=8)
def unet_param_shapes(config: UNetConfig) -> dict[str, Any]:
    """Parameter shapes of our UNet via `jax.eval_shape` (no memory), unboxed, without the "params" level."""
    shapes = jax.eval_shape(SpatioTemporalUNet(config).init, jax.random.PRNGKey(0), *_init_inputs(config))
    return flax.core.unfreeze(flax.linen.meta.unbox(shapes))["params"]


def fresh_unet_params(config: UNetConfig, rng: jax.Array, paths: Iterable[str]) -> dict[str, np.ndarray]:
    """Our initialisation of the parameters at `paths` only: the init is jitted and returns just those, so XLA
    never materialises the rest (a full-size import allocates only the new layers)."""
    paths = tuple(sorted(paths))
    if not paths:
        return {}
    model = SpatioTemporalUNet(config)

    def init(key):
        params = flax.linen.meta.unbox(model.init(key, *_init_inputs(config)))["params"]
        flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}
        return {p: flat[p] for p in paths}

    return {p: np.asarray(v) for p, v in jax.jit(init)(rng).items()}


# ---------------------------------------------------------------------------------------------------------------
# Import and export.

@dataclasses.dataclass
class UNetImportReport:
    """What an import did, by Flax path: loaded from the checkpoint, or newly initialised by our init."""

    source: str
    loaded: list[str]
    newly_initialised: list[str]
    notes: list[str]

    def summary(self) -> str:
        groups = {"temporal (identity at init)": [p for p in self.newly_initialised if is_temporal(p)],
                  "IP-Adapter (random init)": [p for p in self.newly_initialised if is_ip_adapter(p)],
                  "spatial (random init)": [p for p in self.newly_initialised if is_spatial(p)]}
        lines = [f"{self.source}: loaded {len(self.loaded)} UNet tensors"]
        for title, paths in groups.items():
            if paths:
                lines.append(f"  newly initialised, {title}: {len(paths)} tensors "
                             f"({sum(1 for p in paths if p.endswith('kernel'))} kernels)")
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def _new_ok_default(path: str) -> bool:
    return is_temporal(path) or is_ip_adapter(path)


def load_unet_state_dict(state_dict: Mapping[str, np.ndarray], config: UNetConfig, *,
                         rng: jax.Array | None = None, init_params: Any = None,
                         new_ok: Callable[[str], bool] = _new_ok_default, source: str = "UNet checkpoint",
                         file_key: Callable[[str], str] = lambda key: key) -> tuple[dict[str, Any], UNetImportReport]:
    """diffusers-named UNet state dict -> (our params tree without the "params" level, report).

    Parameters absent from `state_dict` for which `new_ok(flax_path)` holds (default: temporal and IP-Adapter layers)
    take their value from `init_params` (a params tree of the same model) or, if None, from our init with `rng`
    (default `PRNGKey(0)`); they are listed in the report. A `conv_in` with fewer input channels than ours (SD's 4
    latent channels) fills the first channels of our kernel (the noise slice) and the rest are zero. Anything else
    that does not match raises `torch_io.WeightMappingError` listing every offending key as the file names it
    (`file_key`: diffusers key -> the file's, e.g. `single_file.ldm_key_namer`); nothing is loaded then.
    """
    shapes = unet_param_shapes(config)
    expected = torch_io.flatten_shapes(shapes)
    table = unet_key_table(shapes)
    mapping: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    loaded, new, notes = [], [], []
    for row in table:
        origin[row.flax_path] = file_key(row.torch_key)
        if row.torch_key in state_dict:
            value = to_flax_array(row.transform, state_dict[row.torch_key])
            want = tuple(expected[row.flax_path].shape)
            if row.flax_path == "conv_in/kernel" and value.shape[:2] + value.shape[3:] == want[:2] + want[3:] \
                    and value.shape[2] < want[2]:
                given = value.shape[2]
                value = np.concatenate([value, np.zeros(want[:2] + (want[2] - given,) + want[3:], value.dtype)], 2)
                notes.append(f"conv_in: the checkpoint's {given} input channels fill channels [0:{given}] (noise "
                             f"latents); channels [{given}:{want[2]}] (mask, image latents) start at zero")
            mapping[row.flax_path] = value
            loaded.append(row.flax_path)
        elif new_ok(row.flax_path):
            new.append(row.flax_path)
    if new:
        if init_params is not None:
            flat_init = torch_io.flatten_shapes(init_params)
            fresh = {p: np.asarray(flat_init[p]) for p in new}
        else:
            fresh = fresh_unet_params(config, jax.random.PRNGKey(0) if rng is None else rng, new)
        mapping.update(fresh)
    known = {row.torch_key for row in table}
    for key in sorted(set(state_dict) - known):  # unexpected: reported by `assign` under a Flax-like name
        path, value = torch_io.torch_to_flax(key, np.asarray(state_dict[key]))
        path = path if path not in mapping else f"{path}#{key}"
        mapping[path], origin[path] = value, file_key(key)
    params = torch_io.assign(shapes, mapping, origin=origin, source=source)
    return params, UNetImportReport(source, loaded, new, notes)


def unet_params_to_torch(params: Any, *, keep: Callable[[str], bool] = lambda path: True) -> dict[str, np.ndarray]:
    """Our UNet params (no "params" level) -> diffusers-named numpy state dict of the parameters whose Flax path
    satisfies `keep` (e.g. `is_spatial` for a `UNet2DConditionModel` with our 9-channel `conv_in`)."""
    flat = torch_io.flatten_shapes(params)
    return {row.torch_key: to_torch_array(row.transform, np.asarray(flat[row.flax_path]))
            for row in unet_key_table(params) if keep(row.flax_path)}


def count_params(shapes: Any) -> dict[str, int]:
    """Parameter counts of a UNet params tree: total, spatial, temporal, ip_adapter."""
    flat = torch_io.flatten_shapes(shapes)
    size = lambda pred: sum(int(np.prod(v.shape)) for p, v in flat.items() if pred(p))
    return {"total": size(lambda p: True), "spatial": size(is_spatial), "temporal": size(is_temporal),
            "ip_adapter": size(is_ip_adapter)}
