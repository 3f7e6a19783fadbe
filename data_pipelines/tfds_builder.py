"""TFDS builder: a local video folder + CSV/JSONL captions -> an ArrayRecord TFDS dataset (no TensorFlow needed).

Each example stores the encoded video file bytes, its caption and a key; training reads it with
`tfds.data_source(name, data_dir=...)` (data_config.kind="tfds") and decodes clips in the loader like a folder.

    python -m data_pipelines.tfds_builder --video_dir=videos/ --captions_file=captions.csv \
        --data_dir=~/tensorflow_datasets --name=my_videos [--path_format="{videoid}.mp4" --caption_column=name]
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from data_pipelines.sources import VideoFolderSource


class VideoFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One "train" split with features video_bytes (encoded file), caption, key."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded video files + captions."}

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
            with open(path, "rb") as f:
                yield record["key"], {"video_bytes": f.read(), "caption": caption, "key": record["key"]}
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


_VIDEO_DIR = flags.DEFINE_string("video_dir", None, "Folder the caption rows' paths are relative to.", required=True)
_CAPTIONS = flags.DEFINE_string("captions_file", None, "CSV/TSV/JSONL with one row per video.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir to write to.")
_NAME = flags.DEFINE_string("name", "video_folder", "Dataset name (pass it to tfds.data_source).")
_PATH_FORMAT = flags.DEFINE_string("path_format", "{path}", "Video path from row columns, e.g. '{videoid}.mp4'.")
_CAPTION_COLUMN = flags.DEFINE_string("caption_column", "caption", "Column holding the caption.")


def main(argv):
    del argv
    out = build_tfds(
        _VIDEO_DIR.value,
        _CAPTIONS.value,
        _DATA_DIR.value,
        name=_NAME.value,
        path_format=_PATH_FORMAT.value,
        caption_column=_CAPTION_COLUMN.value,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    # The command line only (the builder itself knows nothing of atomo_jax): the shared flag parsing of our CLIs.
    from atomo_jax.configuration import absl_flags_parser

    app.run(main, flags_parser=absl_flags_parser(__name__))
