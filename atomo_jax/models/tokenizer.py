"""CLIP tokenizer: load it from a model folder (refusing a broken one loudly) or build its files offline.

transformers 5 builds a CLIP tokenizer with a 3-token placeholder vocabulary when `vocab.json`/`merges.txt` are
missing, and then maps every word to <|endoftext|> without a warning. `load_clip_tokenizer` checks the vocabulary
size and that known words survive a round trip. `build_clip_tokenizer_files` writes vocab.json + merges.txt from the
OpenAI BPE file that ships in the `open-clip-torch` wheel (`open_clip/bpe_simple_vocab_16e6.txt.gz`), using the
rules of open_clip's `SimpleTokenizer` (the first 48894 merges; byte tokens, byte tokens + "</w>", merges, then the
two special tokens), with the OpenAI/transformers names of the special tokens.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import numpy as np

CLIP_VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2  # as open_clip's SimpleTokenizer
_CHECK_TEXT = "a photo of a cat riding a bicycle"


class TokenizerError(ValueError):
    pass


def load_clip_tokenizer(folder: str | Path, *, expected_vocab_size: int | None = CLIP_VOCAB_SIZE):
    """Loads a transformers `CLIPTokenizer` from `folder` (e.g. `<sd15>/tokenizer`) and checks that it works.

    Raises `TokenizerError` naming the folder and the files expected when the files are missing or the tokenizer
    is broken (wrong vocabulary size, known words not round-tripping).
    """
    from transformers import CLIPTokenizer  # optional dependency: the [torch] extra

    folder = Path(folder)
    expected = "vocab.json + merges.txt (or tokenizer.json)"
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {folder} does not exist; it must hold {expected}. Build the files "
                             f"offline with `build_clip_tokenizer_files('{folder}')`.")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not (has_bpe or (folder / "tokenizer.json").is_file()):
        present = sorted(p.name for p in folder.iterdir())
        raise TokenizerError(f"tokenizer folder {folder} lacks the tokenizer files: expected {expected}, found "
                             f"{present or 'nothing'}. Build them offline with "
                             f"`build_clip_tokenizer_files('{folder}')`.")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    problem = _check(tokenizer, expected_vocab_size)
    if problem:
        raise TokenizerError(f"tokenizer in {folder} is broken ({problem}); it must hold a CLIP BPE vocabulary in "
                             f"{expected}. Rebuild them with `build_clip_tokenizer_files('{folder}')`.")
    return tokenizer


def _check(tokenizer, expected_vocab_size: int | None) -> str | None:
    if expected_vocab_size is not None and tokenizer.vocab_size != expected_vocab_size:
        return f"vocab_size {tokenizer.vocab_size}, expected {expected_vocab_size}"
    ids = tokenizer(_CHECK_TEXT)["input_ids"]
    if ids[0] != tokenizer.convert_tokens_to_ids(BOS) or ids[-1] != tokenizer.convert_tokens_to_ids(EOS):
        return f"{_CHECK_TEXT!r} is not wrapped in {BOS} ... {EOS}: {ids}"
    body = ids[1:-1]
    if tokenizer.unk_token_id in body or len(body) != len(_CHECK_TEXT.split()):
        return f"{_CHECK_TEXT!r} tokenizes to {ids}, not one known token per word"
    decoded = tokenizer.decode(body)
    if decoded != _CHECK_TEXT:
        return f"{_CHECK_TEXT!r} decodes back to {decoded!r}"
    return None


def tokenize(tokenizer, prompts: Sequence[str], length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Prompts -> (B, length) int32 ids, padded with the tokenizer's pad token and truncated as SD pipelines do."""
    out = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True)
    return np.asarray(out["input_ids"], np.int32)


class CaptionTokenizer:
    """Picklable caption -> (length,) int32 ids for the data loader's workers; the files load lazily, once per
    process, so a grain worker started with spawn + cloudpickle opens them itself."""

    def __init__(self, folder: str | Path, length: int = CONTEXT_LENGTH):
        self.folder = str(folder)
        self.length = int(length)
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "length": self.length, "_tokenizer": None}

    def __call__(self, caption: str) -> np.ndarray:
        if self._tokenizer is None:
            self._tokenizer = load_clip_tokenizer(self.folder)
        return tokenize(self._tokenizer, [caption], self.length)[0]


def caption_tokenizer(text_encoder_config) -> CaptionTokenizer | None:
    """The tokenizer `config.model.text_encoder` asks for (its `tokenizer` folder), checked now; None without a text
    encoder."""
    if text_encoder_config.kind == "none":
        return None
    folder = text_encoder_config.tokenizer
    if not folder:
        raise TokenizerError("config.model.text_encoder.kind='clip_text' needs config.model.text_encoder.tokenizer: "
                             "a CLIP tokenizer folder (vocab.json + merges.txt; build one offline with "
                             "`python -c \"from atomo_jax.models.tokenizer import build_clip_tokenizer_files as b; "
                             "b('DIR')\"`)")
    tok = CaptionTokenizer(folder, int(text_encoder_config.max_position_embeddings))
    tok("")  # fail here, naming the folder, rather than inside a data worker
    return tok


def open_clip_bpe_path() -> Path:
    """The BPE merges file shipped in the open-clip-torch wheel (found without importing open_clip, which needs
    torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("package open_clip (pip: open-clip-torch) is not installed; it ships the CLIP BPE file "
                             "bpe_simple_vocab_16e6.txt.gz needed to build a tokenizer offline")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing from the open_clip package")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_tokenizer_files(folder: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (as in SD 1.5's `tokenizer/`
    folder) into `folder`, from the open_clip BPE file. Returns the folder."""
    folder = Path(folder)
    lines = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{bpe_path}: expected {_NUM_MERGES} merge lines of two symbols after the header")
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(vocab) != CLIP_VOCAB_SIZE or len(set(vocab)) != len(vocab):
        raise TokenizerError(f"built vocabulary has {len(set(vocab))} distinct tokens, expected {CLIP_VOCAB_SIZE}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, "do_lower_case": True,
              **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
