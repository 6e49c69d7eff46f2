"""Request texts -> token ids for one served model: query/passage prefixes, truncate NONE|START|END.

Reads the artifact's tokenizer.json with fast tokenizers (numpy only, no torch); the file's own
padding is switched off (all-MiniLM-L6-v2's pads every text to 128 tokens) and we pad per batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from serve.errors import InputTooLong, InvalidRequest


def _load(path: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


class ServingTokenizer:
    """Prefix, tokenize and length-check request texts; `pad` builds the ONNX inputs."""

    def __init__(self, model_dir: str | Path, manifest: dict):
        path = Path(model_dir) / "tokenizer.json"
        self.max_length = int(manifest["max_seq_length"])
        self.pad_id = int(manifest.get("pad_id") or 0)
        self.prefixes = {k: v or "" for k, v in (manifest.get("prefixes") or {}).items()}
        self._plain = _load(path)
        # Truncation through the tokenizer keeps special tokens ([CLS] ... [SEP], <bos>) in place.
        self._cut_end = _load(path)
        self._cut_end.enable_truncation(self.max_length, direction="right")
        self._cut_start = _load(path)
        self._cut_start.enable_truncation(self.max_length, direction="left")

    @property
    def needs_input_type(self) -> bool:
        return any(self.prefixes.values())

    def encode(self, texts: list[str], input_type: str | None, truncate: str) -> list[list[int]]:
        if input_type is not None and input_type not in ("query", "passage"):
            raise InvalidRequest(f"input_type must be 'query' or 'passage', not {input_type!r}", "input_type")
        prefix = self.prefixes.get(input_type, "") if input_type else ""
        if prefix:
            texts = [prefix + t for t in texts]
        if len(texts) == 1:
            ids = [self._plain.encode(texts[0]).ids]
        else:
            ids = [e.ids for e in self._plain.encode_batch(texts)]
        for i, row in enumerate(ids):
            if len(row) <= self.max_length:
                continue
            if truncate == "NONE":
                where = f" (input[{i}])" if len(texts) > 1 else ""
                raise InputTooLong(f"Input length {len(row)} exceeds maximum allowed token size {self.max_length}"
                                   f"{where}; shorten it or send truncate=END or START", "input")
            cutter = self._cut_end if truncate == "END" else self._cut_start
            ids[i] = cutter.encode(texts[i]).ids
        return ids

    def pad(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_batch(ids, self.pad_id)


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The ONNX artifact's inputs: ids padded to the batch's longest text, and the attention mask.

    Training, evaluation and export parity pad through this function too, so they match serving.
    """
    width = max(1, max(len(x) for x in ids))
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)  # [B, S]
    mask = np.zeros((len(ids), width), dtype=np.int64)  # [B, S]
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return input_ids, mask
