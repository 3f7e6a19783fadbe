"""Shape buckets: assignment from real MP4 headers and caption columns, bucket-homogeneous batches that follow the
schedule through grain's workers, exact resume over a bucket change, and bucketed training with validation images
through the CLI on one process and on two (stopped together by a SIGTERM to one of them)."""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import shutil
import signal

import ml_collections
import numpy as np
import pytest
from PIL import Image

from atomo_jax.cache_latents import cache_latents
from atomo_jax.configuration import load_config
from configs import base
from data_pipelines.buckets import Bucket, BucketSchedule, assign
from data_pipelines.errors import DataError
from data_pipelines.loader import make_loader, plan_buckets
from data_pipelines.transforms import to_unit_range
from atomo_jax.pipelines.video_io import read_video
from atomo_jax.training.preemption import STOPPED_EXIT_CODE
from tests.conftest import (TINY_DEMO, cli_env, kill_all, losses, race_threads, run, start_processes,
                            tensorboard_values, wait_all, wait_for)
from tests.test_data_pipeline import PoolingModel, red_index, write_mp4
from tests.test_eval import clip_folders  # noqa: F401  (a fixture: a tiny transformers CLIPModel folder)

FOLDER_BUCKETS = ((4, 32, 56), (4, 56, 32), (4, 32, 32), (8, 32, 32))


def folder_config(root, captions: str, **overrides) -> ml_collections.ConfigDict:
    d = base.get_config().data
    d.update(dict(kind="video_folder", root=str(root), captions=captions, buckets=FOLDER_BUCKETS, frame_stride=1,
                  worker_count=0, read_threads=2, shuffle=False, random_start=False, random_crop=False,
                  frame_prediction_prob=0.0, num_given_frames=1), **overrides)
    return d


def test_assign_nearest_aspect_then_most_frames():
    buckets = [Bucket(*b) for b in FOLDER_BUCKETS]
    fits = lambda frames: [frames >= b.frames for b in buckets]
    assert assign(1920, 1080, fits(100), buckets) == 0  # 16:9
    assert assign(1080, 1920, fits(100), buckets) == 1  # 9:16
    assert assign(512, 512, fits(100), buckets) == 3  # 1:1, long enough for 8 frames
    assert assign(512, 512, fits(5), buckets) == 2  # 1:1, only 4
    assert assign(640, 480, fits(100), buckets) == 0  # 4:3 is nearer 16:9 (log 0.27) than 1:1 (0.29)
    assert assign(512, 512, fits(3), buckets) == -1  # shorter than every bucket


@pytest.fixture(scope="module")
def bucket_folder(tmp_path_factory):
    """Real MP4s of several shapes and lengths, a corrupt file and a row known only by its caption columns."""
    tmp_path = tmp_path_factory.mktemp("bucket_videos")
    write_mp4(str(tmp_path / "wide.mp4"), 6, video_id=1, height=36, width=64)
    write_mp4(str(tmp_path / "tall.mp4"), 6, video_id=2, height=64, width=36)
    write_mp4(str(tmp_path / "square_long.mp4"), 10, video_id=3, height=48, width=48)
    write_mp4(str(tmp_path / "square_short.mp4"), 5, video_id=4, height=48, width=48)
    write_mp4(str(tmp_path / "four_three.mp4"), 6, video_id=5, height=48, width=64)
    write_mp4(str(tmp_path / "tiny.mp4"), 2, height=48, width=48)
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    # A row with its header facts in columns is assigned without opening the file (missing here: at load time
    # it is replaced by another clip of its bucket and counted).
    rows = ["wide.mp4,a,,,,", "tall.mp4,b,,,,", "square_long.mp4,c,,,,", "square_short.mp4,d,,,,",
            "four_three.mp4,e,,,,", "tiny.mp4,f,,,,", "corrupt.mp4,g,,,,", "listed.mp4,h,640,360,100,25"]
    (tmp_path / "captions.csv").write_text("path,caption,width,height,num_frames,fps\n" + "\n".join(rows) + "\n")
    return tmp_path


FOLDER_ASSIGNMENT = [0, 1, 3, 2, 0, -1, -1, 0]  # wide, tall, square long/short, 4:3, tiny, corrupt, listed


def test_folder_clips_go_to_their_buckets_and_batches_are_cut_there(bucket_folder):
    tmp_path = bucket_folder
    d = folder_config(tmp_path, str(tmp_path / "captions.csv"))

    plan = plan_buckets(d)
    assert plan.record_buckets.tolist() == FOLDER_ASSIGNMENT
    assert plan.left_out == {"too short for every bucket": 1, "unreadable": 1}
    assert "4x32x56: 3 clips" in plan.summary() and "2 left out" in plan.summary()

    loader = make_loader(d, global_batch_size=1, seed=0, shard_index=0, shard_count=1, training=False, plan=plan)
    it = iter(loader)
    seen = {}
    for _ in range(6):  # one epoch: 6 assigned clips, one a batch, in file order (shuffle off)
        batch = next(it)
        seen.setdefault(batch["caption"][0], []).append(batch)
    shapes = {c: b[0]["video"].shape[1:4] for c, b in seen.items()}
    assert shapes["a"] == (4, 32, 56) and shapes["b"] == (4, 56, 32) and shapes["c"] == (8, 32, 32)
    assert shapes["d"] == (4, 32, 32) and shapes["e"] == (4, 32, 56)
    # the missing file's slot was filled by another 16:9-bucket clip, and counted
    replaced = [b for b in seen.get("a", []) + seen.get("e", []) if b["skipped"][0] == 1]
    assert len(replaced) == 1, {c: [int(b["skipped"][0]) for b in bs] for c, bs in seen.items()}
    # frames 0.. in order, of the right video (green = 40 * id), resized to cover and centre-cropped
    wide = ((seen["a"][0]["video"][0] + 1) * 127.5).round().astype(np.uint8)
    assert red_index(wide).tolist() == [0, 1, 2, 3] and abs(wide[..., 1].mean() - 40) < 3

    with pytest.raises(DataError, match="no bucket holds a whole global batch of 4"):
        make_loader(d, global_batch_size=4, seed=0, shard_index=0, shard_count=1, plan=plan)
    with pytest.raises(DataError, match=r"\(4, 32\) is not a \(frames, height, width\) triple"):
        plan_buckets(folder_config(tmp_path, str(tmp_path / "captions.csv"), buckets=((4, 32),)))


def test_latent_cache_and_tfds_keep_each_clip_in_its_bucket(bucket_folder, tmp_path):
    """cache_latents encodes each clip at its bucket's shape and lists the bucket in the shard sidecar, which the
    latent loader assigns from; a TFDS dataset built from the folder carries the header facts."""
    from data_pipelines.tfds_builder import build_tfds

    d = folder_config(bucket_folder, str(bucket_folder / "captions.csv"))
    stats = cache_latents(PoolingModel(), {"scale": np.float32(1.0)}, d, str(tmp_path / "latents"),
                          records_per_shard=4, batch_size=2, progress=False)
    assert stats["written"] == 5 and stats["skipped"] == 3  # tiny, corrupt, and the listed file that is not there
    lat = folder_config(bucket_folder, "", kind="latents", latents_dir=str(tmp_path / "latents"))
    plan = plan_buckets(lat)
    assert sorted(plan.record_buckets.tolist()) == [0, 0, 1, 2, 3]
    for batch in make_loader(lat, global_batch_size=1, seed=0, shard_index=0, shard_count=1, num_epochs=1,
                             plan=plan):
        bucket = FOLDER_BUCKETS[FOLDER_ASSIGNMENT["abcdefgh".index(str(batch["caption"][0]))]]  # caption = row
        assert batch["latents"].shape == (1, bucket[0], bucket[1] // 4, bucket[2] // 4, 4), batch["caption"]
    with pytest.raises(DataError, match="which config.data.buckets does not list"):
        plan_buckets(folder_config(bucket_folder, "", kind="latents", latents_dir=str(tmp_path / "latents"),
                                   buckets=((4, 32, 56), (4, 56, 32), (4, 32, 32))))

    build_tfds(str(bucket_folder), str(bucket_folder / "captions.csv"), str(tmp_path / "tfds"), name="bucket_videos")
    tfds_plan = plan_buckets(folder_config(bucket_folder, "", kind="tfds", tfds_name="bucket_videos",
                                           tfds_data_dir=str(tmp_path / "tfds")))
    by_row = {int(tfds_plan.source[i]["key"]): b for i, b in enumerate(tfds_plan.record_buckets.tolist())}
    assert by_row == dict(enumerate(FOLDER_ASSIGNMENT[:-1]))  # the missing file is dropped at build


def synthetic_config(**overrides) -> ml_collections.ConfigDict:
    d = base.get_config().data
    d.update(dict(kind="synthetic", num_videos=40, num_frames=4, resolution=16, buckets=((4, 16, 16), (4, 16, 24)),
                  frame_prediction_prob=0.0, num_given_frames=1, worker_count=0, prefetch=2, read_threads=2),
             **overrides)
    return d


@pytest.mark.parametrize("workers", [0, 2])
def test_each_process_gets_its_rows_of_the_scheduled_bucket(workers):
    """grain batches what each worker reads; the sampler must make every batch the schedule's, on every shard."""
    d = synthetic_config(worker_count=workers)
    plan = plan_buckets(d)
    schedule = BucketSchedule(plan.record_buckets, 2, 4, seed=3, shuffle=True)
    assert schedule.batches_per_epoch == 10
    for shard in range(2):
        it = iter(make_loader(d, global_batch_size=4, seed=3, shard_index=shard, shard_count=2, training=False,
                              plan=plan))
        for j in range(12):  # into the second epoch
            batch = next(it)
            bucket, members = schedule.batch(j)
            want = np.stack([to_unit_range(plan.source[int(m)]["video"][:4]) for m in members[2 * shard:2 * shard + 2]])
            assert batch["video"].shape[2:4] == (16, (16, 24)[bucket]), (j, bucket)
            np.testing.assert_array_equal(batch["video"], want)


def test_schedule_is_seeded_uses_each_clip_once_per_epoch_and_mixes_buckets():
    record_buckets = np.array([0, 1, -1] * 30)
    a = BucketSchedule(record_buckets, 2, 4, seed=0, shuffle=True)
    epoch = [a.batch(j) for j in range(a.batches_per_epoch)]
    used = np.concatenate([m for _, m in epoch])
    assert len(used) == len(set(used.tolist())) == 7 * 4 * 2  # 30 per bucket -> 7 batches each, 2 dropped
    assert all(np.all(record_buckets[m] == b) for b, m in epoch)
    assert 0 < sum(b != c for (b, _), (c, _) in zip(epoch, epoch[1:]))  # buckets interleave
    again = BucketSchedule(record_buckets, 2, 4, seed=0, shuffle=True)
    other = BucketSchedule(record_buckets, 2, 4, seed=1, shuffle=True)
    assert all(np.array_equal(again.batch(j)[1], m) for j, (_, m) in enumerate(epoch))
    assert any(not np.array_equal(other.batch(j)[1], m) for j, (_, m) in enumerate(epoch))
    assert not np.array_equal(a.batch(14)[1], epoch[0][1])  # the next epoch is shuffled anew


def test_schedule_is_right_from_many_threads_across_epochs_and_pickles():
    """grain's read threads ask for records of two epochs at once near an epoch's end; its workers get a pickled
    copy. Every answer must be the one a lone caller gets."""
    record_buckets = np.arange(400) % 3
    want = BucketSchedule(record_buckets, 3, 4, seed=2, shuffle=True)
    expected = [want.batch(j)[1] for j in range(400)]  # 99 batches per epoch: four epochs
    shared = pickle.loads(pickle.dumps(BucketSchedule(record_buckets, 3, 4, seed=2, shuffle=True)))
    wrong = []

    def ask(offset: int) -> None:
        for j in range(offset, 400, 7):  # each thread strides through every epoch boundary
            if not np.array_equal(shared.batch(j)[1], expected[j]):
                wrong.append(j)

    race_threads([functools.partial(ask, k) for k in range(7)])
    assert not wrong, wrong[:10]


def test_bucketed_loader_resumes_exactly_over_a_bucket_change():
    d = synthetic_config(frame_prediction_prob=0.5, num_given_frames=2)  # random masks: the rng must resume too
    plan = plan_buckets(d)
    schedule = BucketSchedule(plan.record_buckets, 2, 2, seed=5, shuffle=True)
    k = next(j for j in range(1, 40) if schedule.batch(j)[0] != schedule.batch(j - 1)[0])
    make = lambda: iter(make_loader(d, global_batch_size=2, seed=5, shard_index=0, shard_count=1, plan=plan))
    it = make()
    before = [next(it) for _ in range(k)][-1]
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    assert before["video"].shape != want[0]["video"].shape  # the state sits at a bucket change
    resumed = make()
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
    for w, g in zip(want, got):
        for key in ("video", "mask"):
            np.testing.assert_array_equal(w[key], g[key])


@pytest.fixture(scope="module")
def validation_images(tmp_path_factory):
    """Three conditioning images of other sizes than the videos (resized and cropped on load), prompts for two."""
    root = tmp_path_factory.mktemp("validation")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"red_disc": (40, 60), "blue_square": (32, 32), "tall": (50, 20)}.items():
        image = np.full((h, w, 3), 200, np.uint8)
        image[h // 4:h // 2, w // 4:w // 2] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(root / f"{name}.png")
    (root / "prompts.csv").write_text("image,prompt\nred_disc.png,a red disc moving right\nblue_square,a blue square\n"
                                      "tall.png,\n")
    return root


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_bucketed_training_with_validation_one_process_then_two_stopped_by_one_hosts_sigterm(
        tmp_path, validation_images, clip_folders):
    """The tiny demo with a square and a 1:2 bucket and validation images every 3 steps, through the CLI.

    One process: each bucket's step compiled once, resume bitwise over the buckets and to the same validation videos,
    and a restart whose first batch is in the other bucket than the fresh run's compiles nothing new.
    Then the same job on 2 processes (the data axis across them): both compile the same buckets in the same order,
    each process gets its rows of every global batch, both sample and process 0 writes the validation; losses and
    scores match the one-process run. Then a preemption notice reaches one host: JAX's preemption service (not a
    per-step all-gather) brings both processes to the same step, where they save one shared checkpoint and stop. One
    multi-process job for all of it: each one compiles everything again in its second process (on CPU the
    compilation cache serves process 0 only)."""
    flags = [*TINY_DEMO, "--config.data.buckets=((4,16,16),(4,16,32))", "--config.train.log_every=1",
             "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3", "--config.sample.at_end=false",
             "--config.data.num_videos=16",
             f"--config.validation.images={validation_images}",
             f"--config.validation.prompts={validation_images / 'prompts.csv'}", "--config.validation.every_steps=3",
             "--config.validation.width=32", "--config.validation.batch_size=2",
             f"--config.validation.clip={clip_folders[1] / 'full'}"]
    one = tmp_path / "one"
    # The 1-process runs use the trainer's own compilation cache (WORKDIR/jax_cache), not the suite's, and cache
    # every program: by default jax skips those compiled in under 1 s, which a loaded machine crosses either way.
    own_cache = {k: v for k, v in cli_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    own_cache["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out = run("atomo_jax.train", f"--workdir={one}", *flags, "--config.train.num_steps=6", env=own_cache)
    assert "[train] buckets: 4x16x16: 8 clips, 4x16x32: 8 clips" in out, out[-3000:]
    for bucket in ("4x16x16", "4x16x32"):
        assert out.count(f"compiled the train step for {bucket} in") == 1, out[-3000:]
    want = losses(one)
    assert sorted(want) == list(range(1, 7))

    # Validation: at steps 3 and 6, every image at the configured shape, each scored, its files and animation written.
    names = ["blue_square", "red_disc", "tall"]
    for step in (3, 6):
        assert f"[train] validation at step {step} (3 images, 4x16x32): SSIM first" in out, out[-3000:]
        report = read_json(one / "validation" / f"{step:07d}.json")
        assert (report["step"], report["frames"], report["height"], report["width"]) == (step, 4, 16, 32)
        assert [r["name"] for r in report["images"]] == names
        assert [r["prompt"] for r in report["images"]] == ["a blue square", "a red disc moving right", ""]
        for row in report["images"]:
            assert 0 < row["ssim_first"] <= 1 and row["psnr_first"] > 0 and row["motion"] >= 0
            assert -1 <= row["clip_image_video"] <= 1 and (row["clip_text_video"] is None) == (row["prompt"] == "")
            frames = read_video(row["files"]["mp4"])
            assert frames.shape == (4, 16, 32, 3) and os.path.isfile(row["files"]["png"])
        assert set(report["mean"]) >= {"ssim_first", "psnr_first", "motion", "clip_image_video", "clip_text_video"}
        assert report["mean"]["clip_text_video"] == np.mean([r["clip_text_video"] for r in report["images"][:2]])
    tb = one / "tensorboard"
    assert sorted(tensorboard_values(tb, "validation/ssim_first")) == [3, 6]
    gif, = tensorboard_values(tb, "validation/red_disc")[6]
    assert gif[:6] == b"GIF89a" and gif == (one / "validation" / "0000006" / "red_disc.gif").read_bytes()
    first = read_json(one / "validation" / "0000006.json")

    cached = sorted(p.name for p in (one / "jax_cache").iterdir())
    assert cached, "the run left no compiled program in WORKDIR/jax_cache"

    # Resume from step 2: the fresh run met the 1:2 bucket first, the restart meets the square one first (the
    # seed's schedule). The state layouts must not follow that order, or every bucket compiles again.
    config = load_config("configs/demo.py", flags[1:])
    plan = plan_buckets(config.data)
    schedule = BucketSchedule(plan.record_buckets, len(plan.buckets), config.train.batch_size, config.seed,
                              config.data.shuffle)
    assert [schedule.batch(i)[0] for i in (0, 2)] == [1, 0]
    for saved in ("4", "6"):
        shutil.rmtree(one / "checkpoints" / saved)
    out = run("atomo_jax.train", f"--workdir={one}", *flags, "--config.train.num_steps=6", env=own_cache)
    assert sorted(p.name for p in (one / "jax_cache").iterdir()) == cached  # the restart compiled nothing new
    assert "resumed from checkpoint at step 2" in out, out[-3000:]
    got = losses(one)
    assert [got[s] for s in (3, 4, 5, 6)] == [want[s] for s in (3, 4, 5, 6)]  # bitwise
    again = read_json(one / "validation" / "0000006.json")
    assert again["images"] == first["images"]  # the same weights and the same noise: the same videos and scores

    # Two processes, told to run far longer; SIGTERM to the second once step 6's validation is written.
    two = tmp_path / "two"
    procs = start_processes("atomo_jax.train", f"--workdir={two}", *flags, "--config.train.num_steps=1000",
                            num_processes=2, devices_per_process=1)
    try:
        wait_for(lambda: (two / "validation" / "0000006.json").exists(), procs, "step 6's validation")
        os.kill(procs[1].pid, signal.SIGTERM)
        outs = wait_all(procs, timeout=600, returncode=STOPPED_EXIT_CODE)  # both stopped, neither finished
    finally:
        kill_all(procs)
    for o in outs:
        assert "devices=2 mesh={'data': 2, 'fsdp': 1, 'tensor': 1}" in o, o[-2000:]
    compiled = [[line.split(" in ")[0] for line in o.splitlines() if "compiled the train step" in line] for o in outs]
    assert compiled[0] == compiled[1] and len(compiled[0]) == 2, compiled
    two_losses = losses(two)
    np.testing.assert_allclose([two_losses[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=2e-5)
    assert "validation at step 6" in outs[0] and "validation at step" not in outs[1], outs[1][-3000:]
    two_report = read_json(two / "validation" / "0000006.json")
    for key in ("ssim_first", "psnr_first", "motion", "clip_image_video"):
        np.testing.assert_allclose([r[key] for r in two_report["images"]], [r[key] for r in first["images"]],
                                   rtol=0.02, err_msg=key)

    stopped = [re.search(r"preempted: saved step (\d+)", o) for o in outs]
    assert all(stopped), [o[-2000:] for o in outs]
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step >= 6
    saved = sorted(int(d) for d in os.listdir(two / "checkpoints"))
    assert saved[-1] == step and max(losses(two)) == step, (saved, sorted(losses(two)))
