"""TFDS builder: a local video folder + CSV/JSONL captions -> an ArrayRecord TFDS dataset (no TensorFlow needed).

Each example stores the encoded video file bytes, its caption, a key and its header facts; training reads it with
`tfds.data_source(name, data_dir=...)` (data_config.kind="tfds") and decodes clips in the loader like a folder.

    python -m data_pipelines.tfds_builder --video_dir=videos/ --captions_file=captions.csv \
        --data_dir=~/tensorflow_datasets --name=my_videos [--path_format="{videoid}.mp4" --caption_column=name]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.errors import DataError
from data_pipelines.sources import VideoFolderSource
from data_pipelines.video_decode import BadVideo


class VideoFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One "train" split with features video_bytes (encoded file), caption, key and the header facts width, height,
    num_frames, fps (0 for a file whose header cannot be read), which bucketed runs assign buckets from."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Encoded video files + captions.", "1.1.0": "Header fields for shape buckets."}

    def __init__(self, *, source: VideoFolderSource | None = None, **kwargs):
        self._video_source = source
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Videos (encoded file bytes) with captions, from a local folder.",
            features=tfds.features.FeaturesDict(
                {
                    "video_bytes": tfds.features.Scalar(dtype=np.object_),
                    "caption": tfds.features.Text(),
                    "key": tfds.features.Text(),
                    "width": tfds.features.Scalar(dtype=np.int32),
                    "height": tfds.features.Scalar(dtype=np.int32),
                    "num_frames": tfds.features.Scalar(dtype=np.int32),
                    "fps": tfds.features.Scalar(dtype=np.float32),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._video_source is None:
            raise ValueError(f"{type(self).__name__}: building needs source=VideoFolderSource(...)")
        return {"train": self._generate_examples(self._video_source)}

    def _generate_examples(self, source: VideoFolderSource):
        skipped = 0
        for i in range(len(source)):
            record = source[i]
            path, caption = record["path"], record["caption"]
            # Missing files and captions are dropped here; corrupt files are kept and skipped (counted) at read time.
            if not caption or not os.path.isfile(path) or os.path.getsize(path) == 0:
                skipped += 1
                reason = "missing caption" if not caption else "missing or zero-length file"
                logging.warning("tfds_builder: skipping %s (%s)", path, reason)
                continue
            try:
                header = dataclasses.asdict(source.header(i))
            except BadVideo:
                header = {"width": 0, "height": 0, "frames": 0, "fps": 0.0}
            with open(path, "rb") as f:
                yield record["key"], {"video_bytes": f.read(), "caption": caption, "key": record["key"],
                                      "width": header["width"], "height": header["height"],
                                      "num_frames": header["frames"], "fps": header["fps"]}
        if skipped:
            logging.warning("tfds_builder: skipped %d of %d rows", skipped, len(source))


def build_tfds(
    video_dir: str,
    captions_file: str,
    data_dir: str,
    *,
    name: str = "video_folder",
    path_format: str = "{path}",
    caption_column: str = "caption",
) -> str:
    """Builds (or reuses) the dataset `name` under `data_dir`; returns the dataset's directory."""
    source = VideoFolderSource(video_dir, captions_file, path_format=path_format, caption_column=caption_column)
    builder_cls = type(name, (VideoFolderBuilder,), {"name": name}, skip_registration=True)
    builder = builder_cls(source=source, data_dir=os.path.expanduser(data_dir))
    builder.download_and_prepare()
    return str(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.tfds_builder", description=__doc__,
                                     allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video_dir", required=True, help="folder the caption rows' paths are relative to")
    parser.add_argument("--captions_file", required=True, help="CSV/TSV/JSONL with one row per video")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets", help="TFDS data_dir to write to")
    parser.add_argument("--name", default="video_folder", help="dataset name (pass it to tfds.data_source)")
    parser.add_argument("--path_format", default="{path}", help="video path from row columns, e.g. '{videoid}.mp4'")
    parser.add_argument("--caption_column", default="caption", help="column holding the caption")
    args = parser.parse_args(argv)
    try:
        out = build_tfds(args.video_dir, args.captions_file, args.data_dir, name=args.name,
                         path_format=args.path_format, caption_column=args.caption_column)
    except DataError as e:  # a missing folder or a malformed captions file: named, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
