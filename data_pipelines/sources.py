"""Random-access sources of undecoded records.

A record is a small dict: {"path": str} or {"video_bytes": bytes}, plus "caption" (str or None) and "key" (str).
Decoding happens later, in the loader's per-record transform (inside grain workers), so sources stay cheap to pickle.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from typing import Sequence

import grain.python as grain
import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.video_decode import VideoInfo, probe

# Optional caption-file columns with each video's header facts, so bucketed runs need not open every file first.
HEADER_COLUMNS = ("width", "height", "num_frames", "fps")


class VideoFolderSource(grain.RandomAccessDataSource):
    """Videos under `video_dir` listed in a CSV or JSONL captions file (WebVid-style, configurable columns).

    The video path of a row is `path_format.format(**row)`, relative to `video_dir` unless absolute; e.g. WebVid
    downloads use `path_format="{page_dir}/{videoid}.mp4"`, `caption_column="name"`. Missing files or captions are
    not checked here (that would stat millions of files up front): the loader skips and counts them. Bucketed runs
    need each video's size and length: from the optional columns HEADER_COLUMNS where a row has them, else from
    the file's header.
    """

    def __init__(
        self,
        video_dir: str,
        captions_file: str,
        *,
        path_format: str = "{path}",
        caption_column: str = "caption",
    ):
        self.video_dir = video_dir
        self.captions_file = captions_file
        self.path_format = path_format
        self.caption_column = caption_column
        if not os.path.isdir(video_dir):
            raise DataError(f"config.data.root={video_dir!r}: no such folder (the videos' root)")
        rows = _read_rows(captions_file)
        if not rows:
            raise DataError(f"{captions_file}: the captions file has no rows")
        paths = []
        for line, row in rows:
            try:
                paths.append(path_format.format(**row))
            except (KeyError, IndexError, ValueError) as e:
                raise DataError(f"{captions_file}:{line}: config.data.path_format={path_format!r} cannot be filled "
                                f"from this row ({type(e).__name__}: {e}); its fields are {sorted(row)}") from None
        if caption_column not in rows[0][1]:
            raise DataError(f"{captions_file}: config.data.caption_column={caption_column!r} is not a column; "
                            f"columns are {sorted(rows[0][1])}")
        self._paths = np.asarray([p if os.path.isabs(p) else os.path.join(video_dir, p) for p in paths])
        self._captions = np.asarray([_clean_caption(row.get(caption_column)) for _, row in rows])
        self._headers = np.asarray([[_number(row.get(c)) for c in HEADER_COLUMNS] for _, row in rows], np.float64)

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return (
            f"VideoFolderSource(video_dir={self.video_dir!r}, captions_file={self.captions_file!r}, "
            f"path_format={self.path_format!r}, caption_column={self.caption_column!r}, len={len(self)})"
        )

    def __getitem__(self, index: int) -> dict:
        caption = str(self._captions[index])
        return {"path": str(self._paths[index]), "caption": caption or None, "key": str(index)}

    def header(self, index: int) -> VideoInfo:
        """Size, length and rate of video `index`: from the row's HEADER_COLUMNS, else the file (BadVideo if it
        cannot be read)."""
        width, height, frames, fps = self._headers[index]
        if np.isnan([width, height, frames]).any():
            return probe(str(self._paths[index]))
        return VideoInfo(int(width), int(height), int(frames), 0.0 if np.isnan(fps) else float(fps))


def _number(value) -> float:
    """A numeric caption-file field, NaN when absent or empty."""
    try:
        return float(value) if value not in (None, "") else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _clean_caption(value) -> str:
    """Caption text, or "" for a missing one (None, NaN, empty or blank)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value).strip()


def _read_rows(captions_file: str) -> list[tuple[int, dict]]:
    """(line number, row) of every row of a CSV/TSV (header first) or JSONL (one object per line) file; anything
    else is an error naming the file and line."""
    if not captions_file.endswith((".jsonl", ".json", ".csv", ".tsv")):
        raise DataError(f"config.data.captions={captions_file!r}: expected a .csv, .tsv or .jsonl file")
    if not os.path.isfile(captions_file):
        raise DataError(f"config.data.captions={captions_file!r}: no such file")
    rows = []
    try:
        with open(captions_file, encoding="utf-8", newline="") as f:
            if captions_file.endswith((".jsonl", ".json")):
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{captions_file}:{line_no}: not valid JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{captions_file}:{line_no}: a JSON {type(row).__name__}; expected one "
                                        f"object per line, e.g. {{\"path\": ..., \"caption\": ...}}")
                    rows.append((line_no, row))
                return rows
            reader = csv.DictReader(f, delimiter="\t" if captions_file.endswith(".tsv") else ",")
            for row in reader:
                if None in row:  # more fields than the header names
                    raise DataError(f"{captions_file}:{reader.line_num}: {len(row) - 1 + len(row[None])} fields but "
                                    f"the header has {len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); "
                                    f"quote fields that contain the delimiter")
                rows.append((reader.line_num, row))
    except UnicodeDecodeError as e:
        raise DataError(f"{captions_file}: not UTF-8 text (byte {e.start}: {e.reason}); expected a CSV, TSV or "
                        f"JSONL captions file") from None
    except csv.Error as e:
        raise DataError(f"{captions_file}: not a readable CSV ({e})") from None
    return rows


class TfdsVideoSource(grain.RandomAccessDataSource):
    """A TFDS ArrayRecord dataset written by `data_pipelines.tfds_builder`, read with `tfds.data_source`.

    Records hold the encoded video file bytes; decoding happens in the loader like for a folder.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only when used)

        self.name, self.split, self.data_dir = name, split, data_dir
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"TfdsVideoSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        caption = _as_str(record.get("caption"))
        return {
            "video_bytes": bytes(record["video_bytes"]),
            "caption": caption or None,
            "key": _as_str(record.get("key")) or str(index),
        }

    def header(self, index: int) -> VideoInfo:
        """From the record's stored header fields (datasets built by tfds_builder), else the encoded bytes."""
        record = self._source[index]
        if all(k in record for k in HEADER_COLUMNS):
            return VideoInfo(*(int(record[k]) for k in HEADER_COLUMNS[:3]), float(record["fps"]))
        return probe(bytes(record["video_bytes"]), path=f"{self.name}[{index}]")


def _as_str(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8").strip()
    return str(value).strip()


# ---- cached-latent records --------------------------------------------------------------------------------------


def encode_record(arrays: dict[str, np.ndarray | str | int | float]) -> bytes:
    """A flat dict of numpy arrays / strings -> bytes (npz; no pickle, so reading never runs code)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


# numpy parses each array's npy header with ast.literal_eval, and CPython 3.11's AST construction is not safe in
# several threads at once (python/cpython#106905: "SystemError: AST constructor recursion depth mismatch"), which
# grain's read threads do: it killed a 2-process training run. Serialised, a record of paper-size latents (24 x 64 x
# 64 x 4, 1.6 MB) still decodes at ~550 per second per process with 4 threads on 2 cores (1.8 ms each, 0.97 ms
# unlocked): far more than a train step consumes.
_DECODE_LOCK = threading.Lock()


def decode_record(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_record`; safe to call from several threads."""
    with _DECODE_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class LatentShardsSource(grain.RandomAccessDataSource):
    """Cached latents written by `python -m atomo_jax.cache_latents` (ArrayRecord shards of npz records)."""

    def __init__(self, paths: Sequence[str]):
        if not paths:
            raise ValueError("LatentShardsSource: no shard files given")
        self.paths = sorted(paths)
        self._source = grain.ArrayRecordDataSource(self.paths)

    @classmethod
    def from_dir(cls, latents_dir: str) -> "LatentShardsSource":
        paths = [os.path.join(latents_dir, f) for f in os.listdir(latents_dir) if f.endswith(".array_record")]
        if not paths:
            raise DataError(f"config.data.latents_dir={latents_dir!r}: no *.array_record shards there")
        return cls(paths)

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"LatentShardsSource({len(self.paths)} shards, first={self.paths[0]!r})"

    def __getitem__(self, index: int) -> dict:
        return decode_record(self._source[index])

    def record_buckets(self, buckets: Sequence) -> np.ndarray:
        """Each record's index in `buckets` (data_pipelines.buckets.Bucket), from the pixel bucket each shard's
        `.json` sidecar lists per record (cache_latents writes it); a bucket not in `buckets` is an error."""
        index = {(b.frames, b.height, b.width): i for i, b in enumerate(buckets)}
        out = []
        for path in self.paths:
            try:
                with open(path + ".json") as f:
                    listed = json.load(f).get("buckets")
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{path}.json: cannot read the shard's sidecar ({e})") from None
            if listed is None:
                raise DataError(f"{path}.json: lists no per-record buckets (cached without config.data.buckets); "
                                f"re-run cache_latents with the buckets to train with them")
            for shape in listed:
                if tuple(shape) not in index:
                    raise DataError(f"{path}: holds latents of bucket {'x'.join(map(str, shape))}, which "
                                    f"config.data.buckets does not list ({', '.join(map(str, buckets))})")
                out.append(index[tuple(shape)])
        if len(out) != len(self):
            raise DataError(f"{self.paths[0]}...: the sidecars list {len(out)} records, the shards hold {len(self)}")
        return np.asarray(out, np.int32)
