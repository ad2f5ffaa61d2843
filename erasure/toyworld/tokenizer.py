"""A CLIP tokenizer built offline from the BPE vocabulary that open_clip ships.

Stable Diffusion's tokenizer is OpenAI CLIP's BPE (49,408 tokens, 77 positions). open_clip bundles the same merges
file, so an identical ``transformers.CLIPTokenizer`` can be made without any download: the vocabulary is the 256 byte
symbols, the same with ``</w>``, every merge joined, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
MAX_LENGTH = 77


def _write_bpe_files(folder: Path) -> tuple[Path, Path]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe  # heavy: importing open_clip takes ~3 s

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for path, text in (
        (vocab_path, json.dumps({tok: i for i, tok in enumerate(vocab)})),
        (merges_path, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"),
    ):
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return vocab_path, merges_path


def clip_tokenizer(cache_dir: str | os.PathLike | None = None):
    """Return a ``CLIPTokenizer`` identical to SD's, built from open_clip's bundled BPE (no network).

    The vocabulary files are written once to ``cache_dir`` (default: ``~/.cache/concept-erasure/clip-bpe``).
    """
    folder = Path(cache_dir or Path.home() / ".cache" / "concept-erasure" / "clip-bpe")
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.exists() and merges_path.exists()):
        vocab_path, merges_path = _write_bpe_files(folder)
    # transformers 5 silently ignores the v4 names vocab_file=/merges_file=; vocab=/merges= are the v5 ones.
    tok = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=MAX_LENGTH)
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
    return tok
