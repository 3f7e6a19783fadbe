"""orbax checkpoints of the train state + data iterator + config, and loading a trained model for inference.

A workdir holds `checkpoints/<step>/{state,data,config}`. orbax writes each step into a temporary directory and
renames it only when complete, so a save interrupted by a kill is never picked up by restore. A composed checkpoint
(`python -m atomo_jax.convert compose`) is a plain params dict with its config in COMPOSED_CONFIG; inference loads
either kind.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import numpy as np
import grain.python as grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from atomo_jax.configuration import ConfigError, adopt_architecture, config_from_saved, saved_architecture
from atomo_jax.models import lora
from atomo_jax.models.atomo import build_model
from atomo_jax.training.state import TrainState, model_params
from atomo_jax.training.setup import abstract_train_state


COMPOSED_CONFIG = "atomo_config.json"


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be read; the message lists each step directory and why."""


def _all_processes(ok: bool) -> bool:
    """True when `ok` holds on every process (one process failing to read its shards fails the step for all)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Saves every `every_steps` steps (async if configured), keeps the last `keep`."""

    def __init__(self, workdir: str, ckpt: ml_collections.ConfigDict):
        options = ocp.CheckpointManagerOptions(max_to_keep=int(ckpt.keep), create=True,
                                               enable_async_checkpointing=bool(ckpt.async_save))
        self.every_steps = int(ckpt.every_steps)
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.PyGrainCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler(), "counters": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: TrainState, data_iter: Any, config: ml_collections.ConfigDict,
             counters: dict[str, int]) -> None:
        """`counters`: the run's running totals (e.g. skipped_samples), restored with the state."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.PyGrainCheckpointSave(data_iter),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
            counters=ocp.args.JsonSave(counters)), force=True)

    def restore(self, step: int, abstract_state: TrainState, data_iter: Any) -> tuple[TrainState, dict[str, int]]:
        """(state, counters) of `step`; the data iterator is set to where it was."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "data": grain.PyGrainCheckpointRestore(data_iter)}
        has_counters = (epath.Path(self.manager.directory) / str(step) / "counters").exists()
        if has_counters:  # checkpoints written before counters were saved have none
            items["counters"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], dict(restored["counters"]) if has_counters else {}

    def restore_latest(self, abstract_state: TrainState, data_iter: Any
                       ) -> tuple[int, TrainState, dict[str, int]] | None:
        """(step, state, counters) of the newest checkpoint that restores (the data iterator set to it), or None if
        there are none. A step that fails to read (truncated file, missing item or metadata, ...) is set aside, renamed
        `<step>.unreadable` (never deleted), with one warning naming it and why, and the next older one is tried;
        all processes agree on each outcome. If every step fails, one error lists each path and reason."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = epath.Path(self.manager.directory) / str(step)
            try:
                restored, reason = self.restore(step, abstract_state, data_iter), None
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: fall back to an older one
                restored, reason = None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if not _all_processes(reason is None):
                reason = reason or "another process could not read its part of this step"
                failures.append(f"{path}: {reason}")
                logging.warning("checkpoint %s could not be restored (%s); set aside as %s.unreadable, trying the "
                                "previous one", path, reason, path.name)
                print(f"[train] checkpoint {path} is unreadable ({reason}); trying the previous one", flush=True)
                if jax.process_index() == 0:
                    path.rename(path.parent / f"{path.name}.unreadable")
                multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
                self.manager.reload()
                continue
            return (step, *restored)
        if failures:
            raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(failures))
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _resolve_step_dir(path: str) -> epath.Path:
    """Accepts a workdir, its checkpoints/ dir, or one step dir; returns the step dir (latest if several)."""
    p = epath.Path(os.path.abspath(path))
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    if (p / "state").exists() or (p / COMPOSED_CONFIG).exists():
        return p
    root = p / "checkpoints" if (p / "checkpoints").exists() else p
    steps = sorted(int(d.name) for d in root.iterdir() if d.name.isdigit() and (d / "state").exists())
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint under {root} (expected <step>/state directories or a composed "
                            f"checkpoint with {COMPOSED_CONFIG})")
    return root / str(steps[-1])


def load_config(path: str) -> ml_collections.ConfigDict:
    step_dir = _resolve_step_dir(path)
    if (step_dir / COMPOSED_CONFIG).exists():
        return config_from_saved(json.loads((step_dir / COMPOSED_CONFIG).read_text()))
    cfg_file = step_dir / "config" / "metadata"
    if not cfg_file.exists():
        candidates = list((step_dir / "config").glob("*"))
        if not candidates:
            raise FileNotFoundError(f"checkpoint {step_dir} has no config item")
        cfg_file = candidates[0]
    return config_from_saved(json.loads(cfg_file.read_text()))


def adopt_init_architecture(config: ml_collections.ConfigDict, explicit: frozenset[str] = frozenset()) -> list[str]:
    """Makes `config.model` the model of `config.init.checkpoint` (a composed checkpoint states it in
    COMPOSED_CONFIG), so training from it needs no size flags; a model key the config sets differently (`explicit`:
    the keys the command line set) is an error naming both values (`configuration.adopt_architecture`). Returns
    notes to print."""
    if not config.init.checkpoint:
        return []
    saved = epath.Path(os.path.abspath(config.init.checkpoint)) / COMPOSED_CONFIG
    if not saved.exists():
        raise ConfigError(f"config.init.checkpoint={config.init.checkpoint!r}: no {COMPOSED_CONFIG} there; expected "
                          f"the output directory of `python -m atomo_jax.convert compose`")
    try:
        model = json.loads(saved.read_text())["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"config.init.checkpoint: {saved} is not a composed checkpoint's config ({e})") from None
    return adopt_architecture(config, saved_architecture(model, str(saved)), explicit)


def load_inference(path: str, use_ema: bool = True, config: ml_collections.ConfigDict | None = None,
                   merge_lora: bool = True) -> tuple[ml_collections.ConfigDict, Any, dict]:
    """(config, AtomoVideo, params) from a training or composed checkpoint; a training checkpoint gives the EMA
    weights when `use_ema` (a composed one has only one set), LoRA factors folded into their kernels unless
    `merge_lora` is False."""

    step_dir = _resolve_step_dir(path)
    config = config or load_config(str(step_dir))
    model = build_model(config.model)
    # Onto this process's first device, whatever mesh the checkpoint was written from.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    on_device = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), tree)
    if (step_dir / COMPOSED_CONFIG).exists():
        params = on_device(nn.unbox(jax.eval_shape(model.init, jax.random.key(0))))
        try:
            return config, model, ocp.StandardCheckpointer().restore(step_dir, params)
        except (ValueError, KeyError) as e:
            raise ValueError(f"composed checkpoint {step_dir} does not match its model config: {e}") from None
    abstract = on_device(abstract_train_state(config, model))
    try:
        state = ocp.StandardCheckpointer().restore(step_dir / "state", abstract)
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {step_dir} does not match its model config: {e}") from None
    scale = lora.LoraSpec.from_config(config.train.lora).scale if merge_lora else None
    return config, model, model_params(state, ema=use_ema, lora_scale=scale)
