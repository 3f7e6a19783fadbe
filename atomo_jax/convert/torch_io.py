"""Reading PyTorch weights safely and placing them into Flax parameter trees.

`load_state_dict` reads `.safetensors` (preferred), `.bin`/`.ckpt`/`.pt`/`.pth` (only through
`torch.load(weights_only=True)`, which refuses pickled code) and diffusers/transformers model folders, including
sharded ones (`*.index.json`). `assign` builds a Flax params tree from `{flax_path: array}` against the shapes of the
model (`jax.eval_shape(model.init, ...)`) and fails with ONE error listing every missing, unexpected and mis-shaped
key: a checkpoint is loaded completely or not at all.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
import pickle

import flax
import jax
import numpy as np
from safetensors import SafetensorError, safe_open

SUPPORTED_FORMATS = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", "a diffusers/transformers model folder")
# Weight files of a model folder, most preferred first (diffusers names, then transformers names).
FOLDER_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                       "diffusion_pytorch_model.bin", "pytorch_model.bin")

FlaxPath = str  # "/"-joined, e.g. "encoder/down_blocks_0/resnets_0/conv1/kernel"


class WeightMappingError(ValueError):
    """Weights and model disagree; the message lists every offending key."""


def load_state_dict(path: str | Path, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict from a weight file or a model folder into numpy (floats as float32).

    `variant` picks e.g. `diffusion_pytorch_model.fp16.safetensors` in a folder. Non-tensor entries of a torch
    checkpoint (e.g. `global_step`) are skipped; an original SD `.ckpt` is unwrapped from its `state_dict` entry.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such weight file or folder: {path}")
    if path.is_dir():
        return _load_folder(path, variant)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix in (".bin", ".ckpt", ".pt", ".pth"):
        return _load_torch(path)
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    raise ValueError(f"{path}: unknown weight format {suffix!r}; supported: {', '.join(SUPPORTED_FORMATS)}")


def _to_numpy(tensor: Any) -> np.ndarray:
    if tensor.is_floating_point():
        tensor = tensor.float()  # bf16/fp16 -> fp32 exactly; numpy has no bf16
    return tensor.detach().cpu().numpy()


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The first sentence of a library's error message, for a one-line report."""
    text = " ".join(str(error).split("\n")[0].split())
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                out[key] = _to_numpy(f.get_tensor(key))
    except SafetensorError as e:  # truncated, or not a safetensors file at all
        reason = _first_line(e).removeprefix("Error while deserializing header: ")
        raise ValueError(f"{path}: damaged or not a safetensors file ({reason})") from None
    return out


def read_torch_file(path: str | Path) -> Any:
    """The object in a pickle-based PyTorch file, through `torch.load(weights_only=True)` only: tensors, containers
    and numbers load; pickled code or classes are refused, never retried unsafely. Errors say which of the two
    happened: the file is damaged (truncated, another format), or it holds objects that are not allowed."""

    import torch  # optional dependency: the [torch] extra

    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80":  # torch's zip format, or a legacy pickle
        raise ValueError(f"{path}: damaged or not a PyTorch checkpoint (starts with {head!r}, neither the zip "
                         f"format of torch.save nor a pickle)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise ValueError(f"{path}: damaged or not a PyTorch checkpoint ({_first_line(e)})") from None
        found = re.search(r"Unsupported global: GLOBAL ([^\s]+)", str(e))
        what = f" (e.g. {found.group(1)})" if found else ""
        raise ValueError(f"{path}: not allowed: it holds pickled objects other than tensors{what}, which "
                         f"torch.load(weights_only=True) refuses and this project never unpickles; re-save the "
                         f"weights as .safetensors with code you trust") from None
    except Exception as e:  # noqa: BLE001 - torch reports a damaged file as RuntimeError, EOFError, KeyError, ...
        raise ValueError(f"{path}: damaged or not a PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})"
                         ) from None


def _load_torch(path: Path) -> dict[str, np.ndarray]:
    import torch  # optional dependency: the [torch] extra

    obj = read_torch_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return {k: _to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _load_sharded(index: Path) -> dict[str, np.ndarray]:
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, Mapping):
        raise ValueError(f"{index}: a sharded-checkpoint index must hold a 'weight_map' object")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_state_dict(index.parent / shard))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise WeightMappingError(f"{index}: keys listed in the index but absent from the shards: {missing[:20]}")
    return out


def _load_folder(folder: Path, variant: str | None) -> dict[str, np.ndarray]:
    def with_variant(name: str) -> str:
        if variant is None:
            return name
        stem, ext = name.rsplit(".", 1)
        return f"{stem}.{variant}.{ext}"

    for name in FOLDER_WEIGHT_NAMES:
        for candidate in (folder / with_variant(name), folder / (with_variant(name) + ".index.json")):
            if candidate.exists():
                return load_state_dict(candidate)
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth"))
    if len(found) == 1:
        return load_state_dict(folder / found[0])
    expected = [with_variant(n) for n in FOLDER_WEIGHT_NAMES]
    raise FileNotFoundError(f"{folder}: no weights found; expected one of {expected} (or a sharded '*.index.json'); "
                            f"weight-like files present: {found or 'none'}")


# ---------------------------------------------------------------------------------------------------------------
# Name mapping.

_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def torch_module_path(key: str) -> str:
    """`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1` (Flax names list entries `name_i`)."""
    return _INDEX.sub(r"_\1", key).replace(".", "/")


def torch_to_flax(key: str, value: np.ndarray, *, embeddings: Iterable[str] = ()) -> tuple[FlaxPath, np.ndarray]:
    """Maps one torch parameter to its Flax path and layout.

    Conv weights (O, I, *k) -> kernel (*k, I, O); linear (O, I) -> kernel (I, O); 1-D norm weights -> scale;
    weights of the modules named in `embeddings` (torch module paths) -> embedding, untransposed. Other parameter
    names (e.g. `class_embedding`) keep their name.
    """
    module, _, name = key.rpartition(".")
    path = torch_module_path(module)
    if name == "weight":
        if module in set(embeddings):
            name = "embedding"
        elif value.ndim >= 3:
            name, value = "kernel", np.transpose(value, tuple(range(2, value.ndim)) + (1, 0))
        elif value.ndim == 2:
            name, value = "kernel", value.T
        elif value.ndim == 1:
            name = "scale"
    return (f"{path}/{name}" if path else name), value


def flatten_shapes(tree: Any) -> dict[FlaxPath, jax.ShapeDtypeStruct]:
    """`jax.eval_shape(model.init, ...)` output (boxed or not) -> {"a/b/kernel": ShapeDtypeStruct}."""
    tree = flax.core.unfreeze(flax.linen.meta.unbox(tree))
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def assign(shapes: Any, mapping: Mapping[FlaxPath, np.ndarray], *, origin: Mapping[FlaxPath, str] | None = None,
           source: str = "checkpoint") -> dict[str, Any]:
    """Builds the params tree shaped like `shapes` from `{flax_path: array}`; all or nothing.

    `shapes`: tree of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape(model.init, rng, x)`; logical-partitioning boxes
    are removed). `origin` names the file's key of each flax path (given or expected) for error messages; `source`
    names the checkpoint.
    Arrays are cast to the dtype of `shapes`. Raises `WeightMappingError` listing every missing, unexpected and
    mis-shaped key.
    """
    expected = flatten_shapes(shapes)
    origin = origin or {}

    def named(p: FlaxPath, how: str = "from") -> str:
        return f"{p} ({how} {origin[p]})" if p in origin else p

    missing = sorted(named(p, "expected as") for p in set(expected) - set(mapping))
    unexpected = sorted(named(p) for p in set(mapping) - set(expected))
    misshaped = sorted(f"{named(p)}: got {tuple(np.shape(mapping[p]))}, expected {tuple(expected[p].shape)}"
                       for p in set(mapping) & set(expected) if tuple(np.shape(mapping[p])) != tuple(expected[p].shape))
    if missing or unexpected or misshaped:
        lines = [f"{source}: weights do not match the model ({len(expected)} parameters expected, "
                 f"{len(mapping)} given); nothing was loaded."]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items)
        raise WeightMappingError("\n".join(lines))
    flat = {tuple(p.split("/")): np.asarray(mapping[p], dtype=expected[p].dtype) for p in expected}
    return flax.traverse_util.unflatten_dict(flat)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], shapes: Any, *,
                       rename: Callable[[str], str | None] = lambda k: k, embeddings: Iterable[str] = (),
                       source: str = "checkpoint", prefix: FlaxPath = "") -> dict[str, Any]:
    """Torch state dict -> Flax params tree, all or nothing.

    `rename` maps a torch key to the torch-layout key whose module path mirrors the Flax module tree (or None to drop
    a known non-parameter such as a `position_ids` buffer); `prefix` is prepended to every Flax path (e.g. "params").
    """
    mapping: dict[FlaxPath, np.ndarray] = {}
    origin: dict[FlaxPath, str] = {}
    embeddings = tuple(embeddings)
    for key, value in state_dict.items():
        new_key = rename(key)
        if new_key is None:
            continue
        path, array = torch_to_flax(new_key, np.asarray(value), embeddings=embeddings)
        path = f"{prefix}/{path}" if prefix else path
        if path in mapping:
            raise WeightMappingError(f"{source}: keys {origin[path]!r} and {key!r} both map to {path}")
        mapping[path], origin[path] = array, key
    return assign(shapes, mapping, origin=origin, source=source)
