"""Text -> padded token arrays with the model's own tokenizer.json (fast tokenizers, numpy only).

Shared by training, evaluation, export parity and serving, so every stage tokenizes identically.
The tokenizer file's own padding and truncation settings are switched off (all-MiniLM-L6-v2's
pads every text to 128 tokens); we pad to the longest text of each batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from serve.tokens import pad_batch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "tokenizer.model", "merges.txt", "vocab.json")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def resolve_pad_id(model_dir: Path, tok: Tokenizer, padding: dict | None) -> int:
    """Pad id from tokenizer.json, else tokenizer_config/special_tokens_map, else eos, else 0.

    Llama tokenizers ship no pad token; any id works because the attention mask hides padding.
    """
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    settings = {**_read_json(model_dir / "special_tokens_map.json"), **_read_json(model_dir / "tokenizer_config.json")}
    for key in ("pad_token", "eos_token"):
        name = _token_name(settings.get(key))
        if name and tok.token_to_id(name) is not None:
            return int(tok.token_to_id(name))
    return 0


class TextTokenizer:
    """Tokenize, truncate to max_length, pad to the batch's longest; returns int64 numpy arrays."""

    def __init__(self, model_dir: str | Path, max_length: int):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (a fast tokenizer file is required)")
        self.tokenizer = Tokenizer.from_file(str(path))
        padding = self.tokenizer.padding
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.pad_id = resolve_pad_id(model_dir, self.tokenizer, padding)
        self.max_length = max_length

    def pad(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_batch(ids, self.pad_id)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad([e.ids for e in self.tokenizer.encode_batch(list(texts))])
