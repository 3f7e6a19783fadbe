"""Shape buckets: clips of every aspect ratio and length trained at a few fixed (frames, height, width) shapes.

Each clip goes to one bucket (nearest aspect ratio, then the longest frame count it can fill) from its header alone,
before training; a clip that fills no bucket is left out and counted. A schedule then cuts every epoch into
bucket-homogeneous global batches, deterministically from the seed and the clips' buckets, so every host computes
the same schedule and takes its own rows of each global batch. The schedule is a pure function of the global batch
index, so grain's iterator state (the next index of each worker) resumes it exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import threading
from typing import Iterable, Sequence

import grain.python as grain
import numpy as np

from data_pipelines.errors import DataError


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height


def parse_buckets(value: Iterable[Sequence[int]], num_frames: int, resolution: int) -> tuple[Bucket, ...]:
    """`config.data.buckets` as Buckets; empty: the one square bucket (num_frames, resolution, resolution)."""
    value = tuple(value or ())
    if not value:
        return (Bucket(int(num_frames), int(resolution), int(resolution)),)
    out = []
    for item in value:
        if len(tuple(item)) != 3 or not all(isinstance(v, int) and v > 0 for v in item):
            raise DataError(f"config.data.buckets: {item!r} is not a (frames, height, width) triple of positive "
                            f"integers; e.g. --config.data.buckets='((24,320,512),(24,512,320))'")
        out.append(Bucket(*(int(v) for v in item)))
    if len(set(out)) != len(out):
        raise DataError(f"config.data.buckets: {', '.join(map(str, out))} lists a bucket twice")
    return tuple(out)


def assign(width: int, height: int, frames_fit: Sequence[bool], buckets: Sequence[Bucket]) -> int:
    """The bucket of a width x height clip: among those whose frame count it can fill (`frames_fit[i]`), the
    nearest aspect ratio (on a log scale, so 16:9 and 9:16 are equally far from 1:1), then the most frames, then
    the first listed. -1: it fills none."""
    best, key = -1, None
    for i, (bucket, fits) in enumerate(zip(buckets, frames_fit)):
        if fits:
            k = (round(abs(math.log(width / height) - math.log(bucket.aspect)), 9), -bucket.frames)
            if key is None or k < key:
                best, key = i, k
    return best


def digest(record_buckets: np.ndarray) -> str:
    """16 hex digits naming an assignment of records to buckets."""
    return hashlib.sha256(np.asarray(record_buckets, np.int32).tobytes()).hexdigest()[:16]


class BucketSchedule:
    """Global batches of one bucket each: epoch e shuffles the assigned clips by (seed, e), deals each into its
    bucket's queue, and emits a batch whenever a queue holds `global_batch` clips (so the batch order follows the
    shuffled order); each bucket's remainder at the end of an epoch is dropped."""

    def __init__(self, record_buckets: np.ndarray, num_buckets: int, global_batch: int, seed: int, shuffle: bool):
        self.record_buckets = np.asarray(record_buckets, np.int32)
        self.num_buckets, self.global_batch, self.seed, self.shuffle = num_buckets, global_batch, seed, shuffle
        counts = np.bincount(self.record_buckets[self.record_buckets >= 0], minlength=num_buckets)
        self.batches_per_epoch = int(np.sum(counts // global_batch))
        if not self.batches_per_epoch:
            raise DataError(f"data: no bucket holds a whole global batch of {global_batch} clips (clips per bucket: "
                            f"{counts.tolist()}); lower config.train.batch_size or use fewer buckets")
        # Cut epochs, newest two kept: grain's read threads ask for records concurrently and, near an epoch's end,
        # from two epochs at once; each entry is written whole under the lock, so no thread sees half an epoch.
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # grain pickles the sampler into its worker processes; a lock does not pickle
        return {**self.__dict__, "_epochs": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def fingerprint(self) -> str:
        """The same on every host that would cut the same batches (grain checks it in a restored state)."""
        return f"{digest(self.record_buckets)}-{self.num_buckets}-{self.global_batch}-{self.seed}-{self.shuffle}"

    def _cut(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each batch, its record indices) of one epoch, in batch order."""
        order = np.flatnonzero(self.record_buckets >= 0)
        if self.shuffle:
            order = np.random.default_rng((self.seed, epoch)).permutation(order)
        buckets, members, done_at = [], [], []
        for b in range(self.num_buckets):
            pos = np.flatnonzero(self.record_buckets[order] == b)
            n = len(pos) // self.global_batch * self.global_batch
            chunks = pos[:n].reshape(-1, self.global_batch)
            buckets += [b] * len(chunks)
            members += [order[c] for c in chunks]
            done_at += [int(c[-1]) for c in chunks]
        by_time = np.argsort(done_at, kind="stable")
        return np.asarray(buckets, np.int32)[by_time], np.stack(members)[by_time]

    def batch(self, index: int) -> tuple[int, np.ndarray]:
        """(bucket, record indices (global_batch,)) of global batch `index`; safe to call from several threads."""
        epoch, within = divmod(index, self.batches_per_epoch)
        cut = self._epochs.get(epoch)
        if cut is None:
            with self._lock:
                cut = self._epochs.get(epoch)
                if cut is None:
                    cut = self._cut(epoch)
                    self._epochs = {e: c for e, c in self._epochs.items() if e >= epoch - 1} | {epoch: cut}
        return int(cut[0][within]), cut[1][within]


class BucketSampler:
    """grain sampler over a BucketSchedule for process `shard_index` of `shard_count`, each taking `per_process`
    consecutive rows of every global batch.

    grain's DataLoader asks for global indices g = k * shard_count + shard_index (k: this process's k-th record)
    and, with W workers, worker w batches its records k = (t * per_process + i) * W + w (i = 0 .. per_process - 1)
    into the loader's batch t * W + w; the mapping below inverts that, so every batch the loader yields is one
    global batch's rows. tests/test_buckets.py holds grain to it for 0 and 2 workers.
    """

    def __init__(self, schedule: BucketSchedule, *, shard_index: int, shard_count: int, worker_count: int,
                 seed: int, num_epochs: int | None = None):
        self.schedule, self.seed = schedule, seed
        self._shard_options = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count)
        self.per_process = schedule.global_batch // shard_count
        self.workers = max(1, int(worker_count))
        self.num_batches = None if num_epochs is None else num_epochs * schedule.batches_per_epoch

    def __len__(self) -> int:
        if self.num_batches is None:
            return sys.maxsize
        return self.num_batches * self.schedule.global_batch

    def __repr__(self) -> str:  # grain compares it with the one in a restored iterator state
        return (f"BucketSampler(schedule={self.schedule.fingerprint()}, shard={self._shard_options.shard_index}/"
                f"{self._shard_options.shard_count}, workers={self.workers}, epochs={self.num_batches})")

    def batch_of(self, k: int) -> tuple[int, int]:
        """(global batch index, row within this process's part) of this process's k-th record."""
        q, w = divmod(k, self.workers)
        t, row = divmod(q, self.per_process)
        return t * self.workers + w, row

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0 or index >= len(self):
            raise IndexError(f"BucketSampler: index {index} out of range [0, {len(self)})")
        batch, row = self.batch_of(index // self._shard_options.shard_count)
        _, members = self.schedule.batch(batch)
        key = int(members[self._shard_options.shard_index * self.per_process + row])
        rng = np.random.Generator(np.random.Philox(key=self.seed + index))
        return grain.RecordMetadata(index=index, record_key=key, rng=rng)


class BucketedSource(grain.RandomAccessDataSource):
    """A source whose records carry their bucket index ("bucket"), with each bucket's members (to replace a bad
    record by another of the same shape)."""

    def __init__(self, source: grain.RandomAccessDataSource, record_buckets: np.ndarray):
        self.source = source
        self.record_buckets = np.asarray(record_buckets, np.int32)
        self.members = [np.flatnonzero(self.record_buckets == b) for b in range(int(self.record_buckets.max()) + 1)]

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"BucketedSource({self.source!r})"

    def __getitem__(self, index: int) -> dict:
        return {**self.source[int(index)], "bucket": int(self.record_buckets[int(index)])}

    def replacement(self, bucket: int, rng: np.random.Generator) -> dict:
        members = self.members[bucket]
        return self[int(members[rng.integers(len(members))])]
