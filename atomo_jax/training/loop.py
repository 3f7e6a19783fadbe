"""train_and_evaluate: the whole training run, top to bottom.

mesh -> model -> state (restored, composed from pretrained parts, or random) -> grain loader -> jitted sharded step
-> metrics / checkpoints / samples. Killed at any point, rerunning the same command resumes from the last finished
checkpoint with the data iterator at the exact next batch and the RNG where it was, so the loss sequence continues
bit for bit. Process 0 appends every step's loss to `<workdir>/losses.jsonl` (one {"step", "loss"} object a line).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from atomo_jax.eval import heldout
from atomo_jax.models import lora
from atomo_jax.models.atomo import build_model
from atomo_jax.models.tokenizer import caption_tokenizer
from atomo_jax.parallel import axes, distributed
from atomo_jax.parallel import sharding as shd
from atomo_jax.parallel.mesh import make_mesh
from atomo_jax.pipelines import i2v, video_io
from atomo_jax.training import metrics as metrics_lib
from atomo_jax.training import validation
from atomo_jax.training.checkpoint import Checkpointer, adopt_init_architecture
from atomo_jax.training.preemption import Preemption
from atomo_jax.training.optimizer import learning_rate_schedule
from atomo_jax.training.packing import packer_from_config
from atomo_jax.training.setup import (abstract_batch, abstract_train_state, init_train_state, state_shardings,
                                      validate)
from atomo_jax.training.state import all_finite, count_params, model_params
from atomo_jax.training.train_step import batch_shardings, canonical_formats, jit_train_step
from data_pipelines import buckets as buckets_lib
from data_pipelines.errors import DataError
from data_pipelines.loader import make_loader, plan_buckets

DEVICE_KEYS = ("video", "cond_image", "mask", "latents", "image_embeds", "tokens")


def _load_init_params(path: str, abstract_params: Any, shardings: Any) -> dict:
    """A composed initial checkpoint (`python -m atomo_jax.convert compose`): the plain params dict."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)
    logging.info("initialising from composed checkpoint %s", path)
    try:
        return ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
    except (ValueError, KeyError) as e:
        raise ValueError(f"config.init.checkpoint={path}: does not match the model config: {e}") from None


def sample_image(config: ml_collections.ConfigDict, model: Any, params: dict, device_batch: dict) -> np.ndarray:
    """The conditioning frame of in-training samples (1, H, W, 3) in [-1, 1], the same on every process: a held-out
    synthetic clip, else the first example of the first global batch (decoded from its latents when cached)."""
    if config.data.kind == "synthetic":  # the first held-out clip, as scored by config.sample.heldout_clips
        return heldout.heldout_videos(config.data, 1)[:, 0].astype(np.float32) / 127.5 - 1.0
    if "latents" in device_batch:
        decode = jax.jit(lambda vae, lat: model.decode_latents({"vae": vae}, lat[:1, :1])[:, 0])
        return shd.fetch(decode(params["vae"], device_batch["latents"]))
    return shd.fetch(device_batch["cond_image"][:1])


class LossLog:
    """`losses.jsonl` in the workdir: every step's loss, written by process 0 at log and save points. On resume the
    lines past the restored step are dropped, so the file always reads as one run."""

    def __init__(self, workdir: str, enabled: bool, resumed_at: int | None):
        self.path = os.path.join(workdir, "losses.jsonl")
        self.enabled = enabled
        self.pending: list[tuple[int, jax.Array]] = []
        if enabled and os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill
                        continue
                    if resumed_at is not None and rec["step"] <= resumed_at:
                        keep.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w") as f:
                f.writelines(keep)

    def add(self, step: int, loss: jax.Array) -> None:
        if self.enabled:
            self.pending.append((step, loss))

    def flush(self) -> None:
        if not self.pending:
            return
        values = jax.device_get([v for _, v in self.pending])
        with open(self.path, "a") as f:
            for (step, _), v in zip(self.pending, values):
                f.write(json.dumps({"step": step, "loss": float(v)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.pending = []


def empty_prompt_tokens(config: ml_collections.ConfigDict) -> jax.Array | None:
    """Tokens of the empty prompt "" (1, L): the text a dropped caption is replaced with, in training (CFG dropout)
    and in the unconditional guidance branch. None when the model has no text encoder."""
    tokenize = caption_tokenizer(config.model.text_encoder)
    return None if tokenize is None else jnp.asarray(tokenize(""))[None]


def write_sample(model: Any, params: dict, config: ml_collections.ConfigDict, image: np.ndarray, out_dir: str,
                 step: int, writer: metrics_lib.MetricWriter | None = None,
                 write: bool = True) -> dict[str, str] | None:
    """Image-to-video from `image` (1, H, W, 3) in [-1, 1]: MP4, GIF and a PNG strip (conditioning frame first).
    Over several processes every one calls this with the same image (the sampler runs over global arrays); only the
    one with `write` writes the files."""
    sampler, guidance = i2v.configs_from(config)
    video = i2v.image_to_video(model, params, jnp.asarray(image), jax.random.key(int(config.seed)),
                               num_frames=int(config.sample.num_frames), sampler=sampler, guidance=guidance,
                               empty_tokens=empty_prompt_tokens(config), progress=False).video[0]
    if not write:
        return None
    frames, cond = video_io.to_uint8(np.asarray(video)), video_io.to_uint8(np.asarray(image[0]))
    paths = validation.write_animation(os.path.join(out_dir, f"sample_{step:07d}"), cond, frames,
                                       float(config.sample.fps), writer, step, "samples/i2v")
    if writer is not None:
        writer.image(step, "samples/conditioning", video_io.encode_png(cond), *frames.shape[1:3])
    return paths


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, explicit: frozenset[str] = frozenset(),
                       preemption: Preemption | None = None) -> dict[str, Any]:
    """Trains until `config.train.num_steps`; returns the final metrics (and sample paths on process 0).
    `explicit`: the config keys the command line set (they must agree with an init checkpoint's model);
    `preemption`: the entry point's SIGTERM listener, started before its slow imports (default: one started now)."""
    if preemption is None:
        preemption = Preemption()
        preemption.listen()
    distributed.maybe_initialize()
    preemption.distributed_started()
    os.makedirs(workdir, exist_ok=True)
    cache = compile_cache_dir(str(config.train.compile_cache), workdir)
    if cache:  # before the first compile: JAX sets its cache up once, at the first compile
        jax.config.update("jax_compilation_cache_dir", cache)
    for note in adopt_init_architecture(config, explicit):
        logging.warning("%s", note)
    mesh = make_mesh(config.mesh)
    validate(config, mesh)
    rules = axes.rules_from_config(config.mesh.rules)
    model = build_model(config.model)
    lr_fn = learning_rate_schedule(config.train)
    is_main = jax.process_index() == 0

    with jax.set_mesh(mesh):
        shardings = state_shardings(config, model, mesh, rules)
        abstract = abstract_train_state(config, model)
        checkpointer = Checkpointer(workdir, config.checkpoint)

        plan = plan_buckets(config.data)
        if plan.record_buckets is not None:
            _check_same_plan(plan.record_buckets)
            print(f"[train] buckets: {plan.summary()}", flush=True)
        tokenize = caption_tokenizer(config.model.text_encoder)
        loader = make_loader(config.data, global_batch_size=int(config.train.batch_size), seed=int(config.seed),
                             shard_index=jax.process_index(), shard_count=jax.process_count(),
                             tokenize=tokenize, plan=plan)
        vset = validation.load_validation_set(config, tokenize)  # read now: a bad file stops the run before step 1
        data_iter = iter(loader)

        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        resumed = checkpointer.restore_latest(target, data_iter)
        counters = {"skipped_samples": 0}
        if resumed is not None:
            latest, state, saved_counters = resumed
            counters.update(saved_counters)
            logging.info("resumed from step %d", latest)
            print(f"[train] resumed from checkpoint at step {latest}", flush=True)
        else:
            latest, init_params = None, None
            if config.init.checkpoint:
                # The base model's params (LoRA factors, when configured, are added to them after loading).
                base = lambda tree: {**tree, "unet": lora.without_factors(tree["unet"])}
                params_abstract = base(model_params(abstract, ema=False))
                params_sh = base(model_params(shardings, ema=False))
                init_params = _load_init_params(config.init.checkpoint, params_abstract, params_sh)
            state = init_train_state(config, model, shardings, init_params)
        n_train, n_frozen = count_params(state.trainable), count_params(state.frozen)
        print(f"[train] devices={jax.device_count()} mesh={dict(mesh.shape)} params: trainable={n_train:,} "
              f"frozen={n_frozen:,}", flush=True)
        # The step's own form of the state: small leaves packed, and (auto_layouts) the layouts its compile chose.
        # Checkpoints and samples get the ordinary form back from `canonical`.
        packer, step_sh = packer_from_config(config, abstract, shardings, shd.replicated(mesh))
        if packer:
            state = jax.device_put(packer.pack_state(state), step_sh)
        auto_layouts = bool(config.train.auto_layouts)

        def canonical(s: Any) -> Any:
            if auto_layouts:
                s = jax.device_put(s, canonical_formats(s))
            return packer.unpack_state(s) if packer else s

        # One compiled step per batch shape (bucket), compiled ahead at its first batch: the executable gives the
        # FLOPs and runs every step of that shape. With auto layouts, the first listed bucket's compile chooses the
        # state layouts and every other bucket takes them, whichever bucket a (resumed) run meets first: so each
        # bucket's program, and its compilation-cache entry, is the same after any restart.
        steps: dict[tuple, tuple[Any, float]] = {}  # batch shapes -> (compiled step, its FLOPs per device)
        finite_jit = jax.jit(all_finite)

        def compile_for(batch: dict) -> tuple[Any, float]:
            nonlocal state
            key = tuple(sorted((k, v.shape) for k, v in batch.items()))
            if key in steps:
                return steps[key]
            t_compile = time.perf_counter()
            formats = next(iter(steps.values()))[0].input_formats[0][0] if steps and auto_layouts else None
            fn = jit_train_step(config, model, mesh, step_sh, batch_shardings(batch, mesh, rules),
                                null_tokens=empty_prompt_tokens(config), auto_state_layouts=auto_layouts,
                                packer=packer, state_formats=formats)
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            compiled = fn.lower(shapes, batch).compile()
            if auto_layouts and formats is None:
                state = jax.device_put(state, compiled.input_formats[0][0])
            steps[key] = compiled, metrics_lib.compiled_cost(compiled) or 0.0
            print(f"[train] compiled the train step for {_shape_name(batch)} in "
                  f"{time.perf_counter() - t_compile:.1f} s ({steps[key][1] / 1e9:.1f} GFLOP per device; "
                  f"{len(steps)} compiled)", flush=True)
            return steps[key]

        def compiled_step(device_batch: dict) -> tuple[Any, float]:
            if auto_layouts and not steps:
                first = abstract_batch(config, model, model_params(abstract, ema=False))
                sh = batch_shardings(first, mesh, rules)
                compile_for({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in first.items()})
            return compile_for(device_batch)

        def to_device(batch: dict) -> dict:
            out = {}
            for k in DEVICE_KEYS:
                if k in batch:
                    local = np.asarray(batch[k])
                    sh = shd.batch_sharding(mesh, rules, local.ndim)
                    out[k] = jax.make_array_from_process_local_data(sh, local)
            return out

        writer = metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"), enabled=is_main, resumed_at=latest)
        loss_log = LossLog(workdir, is_main, latest)
        num_steps = int(config.train.num_steps)
        log_every = max(1, int(config.train.log_every))
        step = int(jax.device_get(state.step))
        flops_since = 0.0  # FLOPs per device of the steps since the last log line
        peak = metrics_lib.peak_flops_per_device(float(config.train.peak_flops))
        skipped_samples, last = int(counters["skipped_samples"]), {}
        sample_cond = None  # the conditioning frame of every sample of this run, fixed at the first batch
        sampled = (None, None)  # (step, paths on process 0) of the latest sample
        validated: tuple[int | None, dict] = (None, {})  # (step, means) of the latest validation
        validate_every = int(config.validation.every_steps) if vset else 0
        t_log, steps_since, wait_since = time.perf_counter(), 0, 0.0
        saved_step = latest

        def save(at: int) -> None:
            nonlocal saved_step
            if not bool(jax.device_get(finite_jit(state.trainable))):
                raise FloatingPointError(f"refusing to save step {at}: parameters are not finite")
            loss_log.flush()
            checkpointer.save(at, canonical(state), data_iter, config, {"skipped_samples": skipped_samples})
            saved_step = at

        while step < num_steps:
            t0 = time.perf_counter()
            batch = next(data_iter)
            wait_since += time.perf_counter() - t0
            skipped_samples += int(np.sum(batch.get("skipped", 0)))
            device_batch = to_device(batch)
            if sample_cond is None:
                sample_cond = sample_image(config, model, state.frozen, device_batch)
            step_fn, step_flops = compiled_step(device_batch)
            state, m = step_fn(state, device_batch)
            flops_since += step_flops
            step += 1
            loss_log.add(step, m["loss"])
            loss_sum = m["loss"] if steps_since == 0 else loss_sum + m["loss"]  # stays on device: no sync per step
            steps_since += 1
            if config.train.nonfinite == "stop" and not bool(jax.device_get(m["finite"])):
                raise FloatingPointError(f"non-finite loss or gradients at step {step}; last good checkpoint: "
                                         f"{saved_step} (config.train.nonfinite='skip' skips such steps instead)")
            if step % log_every == 0 or step == num_steps:
                m = jax.device_get(m)
                dt = time.perf_counter() - t_log
                sps = steps_since / dt
                # "loss" is the mean over the steps since the last log line: single-batch losses of a diffusion
                # model swing with the sampled timesteps and hide the trend.
                last = {"loss": float(jax.device_get(loss_sum)) / steps_since, "mse": float(m["mse"]), "grad_norm": float(m["grad_norm"]),
                        "lr": float(lr_fn(step - 1)), "steps_per_s": sps,
                        "examples_per_s": sps * int(config.train.batch_size),
                        "data_wait_s": wait_since / steps_since, "skipped_samples": float(skipped_samples),
                        "skipped_steps": float(jax.device_get(state.skipped_steps))}
                if flops_since:
                    last["tflops_per_device"] = flops_since / dt / 1e12
                    if peak:
                        last["mfu"] = flops_since / dt / peak
                writer.scalars(step, last)
                writer.progress(step, num_steps, last)
                loss_log.flush()
                t_log, steps_since, wait_since, flops_since = time.perf_counter(), 0, 0.0, 0.0
            if checkpointer.should_save(step):
                save(step)
            if int(config.sample.every_steps) > 0 and step % int(config.sample.every_steps) == 0:
                sampled = (step, _sample(model, canonical(state), config, sample_cond, workdir, step, writer))
            if validate_every and step % validate_every == 0:
                validated = (step, _validate(model, canonical(state), config, vset, workdir, step, writer))
            if step < num_steps and preemption.should_stop(step):  # at the end the run finishes (and samples)
                if saved_step != step:  # the periodic save may have just written this step
                    save(step)
                loss_log.flush()
                checkpointer.close()
                print(f"[train] preempted: saved step {step}, exiting", flush=True)
                return {"step": step, "num_steps": num_steps, "preempted": True, **last}

        if saved_step != step:
            save(step)
        loss_log.flush()
        checkpointer.close()
        result: dict[str, Any] = {"step": step, "num_steps": num_steps, **last}
        if config.sample.at_end and sampled[0] != step:
            if sample_cond is None:  # resumed at the end: still leave a sample
                sample_cond = sample_image(config, model, state.frozen, to_device(next(data_iter)))
            sampled = (step, _sample(model, canonical(state), config, sample_cond, workdir, step, writer))
        if sampled[1]:
            result["samples"] = sampled[1]
        if vset and validated[0] != step:
            validated = (step, _validate(model, canonical(state), config, vset, workdir, step, writer))
        if vset:
            result["validation"] = validated[1]
        if int(config.sample.heldout_clips) > 0:
            result["heldout"] = _heldout(model, canonical(state), config, workdir, step, writer)
        writer.close()
        return result


def compile_cache_dir(setting: str, workdir: str) -> str | None:
    """The persistent compilation cache folder `config.train.compile_cache` asks for, or None (off). URLs (gs://...)
    are kept as they are: JAX's cache writes to them too."""
    absolute = lambda path: path if "://" in path else os.path.abspath(path)
    if setting == "none":
        return None
    if setting == "auto":
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(absolute(workdir), "jax_cache")
    return absolute(setting)


def _shape_name(device_batch: dict) -> str:
    """The bucket of a batch as frames x height x width (of pixels, or of latents when cached)."""
    if "video" in device_batch:
        return "x".join(map(str, device_batch["video"].shape[1:4]))
    return "x".join(map(str, device_batch["latents"].shape[1:4])) + " latents"


def _check_same_plan(record_buckets: np.ndarray) -> None:
    """Every process must cut the same bucketed batches (each computes the plan from its own view of the data): a
    file that one host reads and another cannot, or a differently listed folder, would put different shapes into
    one global batch. Stops with the processes that disagree."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(bytes.fromhex(buckets_lib.digest(record_buckets)), np.int64)
    every = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
    if len(set(every.tolist())) > 1:
        raise DataError(f"data: the processes assigned the clips to buckets differently (process 0 vs "
                        f"{[i for i, d in enumerate(every) if d != every[0]]}); each must see the same files and "
                        f"caption file")


def _heldout(model: Any, state: Any, config: ml_collections.ConfigDict, workdir: str, step: int,
             writer: metrics_lib.MetricWriter) -> dict[str, Any]:
    """Animates the first frames of `config.sample.heldout_clips` held-out clips with the EMA weights (all processes;
    the clips' own length, the in-training sampler and seed) and scores them against the true clips; process 0
    writes WORKDIR/heldout/metrics.json, a PNG strip per clip (true frames, then generated) and the means to
    TensorBoard. Returns the means."""
    params = model_params(state, lora_scale=lora.LoraSpec.from_config(config.train.lora).scale)
    true = heldout.heldout_videos(config.data, int(config.sample.heldout_clips))
    sampler, guidance = i2v.configs_from(config)
    images = jnp.asarray(true[:, 0].astype(np.float32) / 127.5 - 1.0)
    video = i2v.image_to_video(model, params, images, jax.random.key(int(config.seed)), num_frames=true.shape[1],
                               sampler=sampler, guidance=guidance, empty_tokens=empty_prompt_tokens(config),
                               progress=False).video
    generated = video_io.to_uint8(video)  # decode returns host frames, the same on every process
    scores = heldout.score(generated, true)
    means = {k: v for k, v in scores.items() if k != "rows"}
    # The true clips through the autoencoder alone, scored the same way: the best any model can score through it.
    latents = jax.jit(model.encode_video)(params, jnp.asarray(true.astype(np.float32) / 127.5 - 1.0))
    floor = heldout.score(video_io.to_uint8(i2v.decode(model, params, latents, progress=False)), true)
    scores["autoencoder_floor"] = {k: floor[k] for k in heldout.FLOOR_KEYS}
    if jax.process_index() == 0:
        out_dir = os.path.join(workdir, "heldout")
        os.makedirs(out_dir, exist_ok=True)
        for i, (g, t) in enumerate(zip(generated, true)):
            video_io.write_png_strip(os.path.join(out_dir, f"clip_{i:02d}.png"), np.concatenate([t, g]))
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"step": step, **scores}, f, indent=1)
        writer.scalars(step, {f"heldout/{k}": means[k] for k in ("trajectory_error_px", "frozen_baseline_px",
                                                                   "direction_accuracy", "colour_error",
                                                                   "first_frame_psnr")})
        print(f"[train] held-out ({means['clips']} clips): trajectory error {means['trajectory_error_px']:.2f} px "
              f"(frozen frame {means['frozen_baseline_px']:.2f}, wrong way {means['wrong_direction_baseline_px']:.2f})"
              f", direction accuracy {means['direction_accuracy']:.2f}, colour error {means['colour_error']:.1f} "
              f"(threshold {means['colour_threshold']:.1f}), first-frame PSNR {means['first_frame_psnr']:.1f} dB; "
              f"the true clips through the autoencoder alone: trajectory {floor['trajectory_error_px']:.2f} px, "
              f"direction {floor['direction_accuracy']:.2f}, colour {floor['colour_error']:.1f}, first-frame PSNR "
              f"{floor['first_frame_psnr']:.1f} dB: {out_dir}/metrics.json", flush=True)
    return means


def _validate(model: Any, state: Any, config: ml_collections.ConfigDict, vset: validation.ValidationSet,
              workdir: str, step: int, writer: metrics_lib.MetricWriter) -> dict[str, float]:
    """`config.validation` at `step` from the EMA weights, on every process; process 0 writes it. The means."""
    params = model_params(state, lora_scale=lora.LoraSpec.from_config(config.train.lora).scale)
    return validation.run_validation(model, params, config, vset, workdir, step, writer, empty_prompt_tokens(config),
                                     write=jax.process_index() == 0)["mean"]


def _sample(model: Any, state: Any, config: ml_collections.ConfigDict, image: np.ndarray, workdir: str, step: int,
            writer: metrics_lib.MetricWriter) -> dict[str, str] | None:
    """A sample from the EMA weights, on every process (the weights stay sharded as in training); process 0
    writes it."""
    params = model_params(state, lora_scale=lora.LoraSpec.from_config(config.train.lora).scale)
    paths = write_sample(model, params, config, image, os.path.join(workdir, "samples"), step, writer,
                         write=jax.process_index() == 0)
    if paths:
        print(f"[train] sample written: {paths['mp4']} {paths['gif']} {paths['png']}", flush=True)
    return paths
