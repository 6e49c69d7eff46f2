"""Request texts -> token ids for one served model: query/passage prefixes, truncate NONE|START|END.

Reads the artifact's tokenizer.json with fast tokenizers (numpy only, no torch); the file's own
padding is switched off (all-MiniLM-L6-v2's pads every text to 128 tokens) and we pad per batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rayembed.artifact import Manifest, load_tokenizer, pad_batch
from rayembed.errors import InputTooLong, InvalidRequest




class ServingTokenizer:
    """Prefix, tokenize and length-check request texts; `pad` builds the ONNX inputs."""

    def __init__(self, model_dir: str | Path, manifest: Manifest):
        path = Path(model_dir) / manifest.tokenizer
        self.max_length = manifest.max_seq_length
        self.pad_id = manifest.pad_id
        self.prefixes = manifest.prefixes.model_dump()
        self._plain = load_tokenizer(path)
        # Truncation through the tokenizer keeps special tokens ([CLS] ... [SEP], <bos>) in place.
        self._cut_end = load_tokenizer(path)
        self._cut_end.enable_truncation(self.max_length, direction="right")
        self._cut_start = load_tokenizer(path)
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

