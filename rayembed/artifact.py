"""The ONNX artifact contract: train/ writes it, serve/ (and mining, the control plane) read it.

A folder holding `model.onnx` (pooling and L2 normalisation inside), the tokenizer files and
`manifest.json` (the `Manifest` below). Tokenizer loading (padding off) and `pad_batch` live here
too, so every stage tokenizes and pads identically. Torch-free: numpy, tokenizers, pydantic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tokenizers import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "model.onnx"
GRAPH_FP16 = "model.fp16.onnx"
GRAPH_OPTIMIZED = "model.opt.onnx"  # ONNX Runtime's transformer fusions, saved offline, parity-checked
GRAPH_INT8 = "model.int8.onnx"  # dynamic int8 quantization (python -m train.quantize), parity- and nDCG-gated
TOKENIZER = "tokenizer.json"
REQUIRED_FILES = (GRAPH, TOKENIZER, MANIFEST)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "tokenizer.model", "merges.txt", "vocab.json")


class ArtifactError(ValueError):
    """A folder that is not a readable artifact (missing files, bad or too new manifest); says what to do."""


class Prefixes(BaseModel):
    model_config = ConfigDict(frozen=True)
    query: str = ""
    passage: str = ""


class Parity(BaseModel):
    model_config = ConfigDict(frozen=True)
    min_cosine: float
    threshold: float
    texts: int
    fp16_min_cosine: float | None = None
    optimized_min_cosine: float | None = None


class Manifest(BaseModel):
    """manifest.json. Readers refuse a `format_version` newer than FORMAT_VERSION; unknown keys of
    the same version are kept (a newer writer may add information), never required."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format_version: int = Field(FORMAT_VERSION, ge=1)
    base_model: str
    family: str
    model_type: str
    embedding_dim: int = Field(gt=0)
    matryoshka_dims: list[int] = Field(default_factory=list)
    max_seq_length: int = Field(gt=0)
    prefixes: Prefixes = Prefixes()
    pooling: str = "mean"
    normalized: bool = True
    inputs: dict[str, str] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    opset: int
    tokenizer: str = TOKENIZER
    pad_id: int = 0
    parity: Parity
    source: dict[str, Any] = Field(default_factory=dict)
    export_seconds: float | None = None
    files: dict[str, str] = Field(default_factory=dict)
    optimized: dict[str, Any] | None = Field(None, description="the fused graph, when written: its file, what fused it (by) and its fused ops (fusions)")
    int8: dict[str, Any] | None = Field(None, description="the int8 graph's file and its gates' figures, when written")

    @model_validator(mode="before")
    @classmethod
    def _known_version(cls, data: Any) -> Any:
        version = data.get("format_version", FORMAT_VERSION) if isinstance(data, dict) else FORMAT_VERSION
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(f"manifest format_version {version} is newer than this rayembed reads ({FORMAT_VERSION}): "
                             "upgrade rayembed on this node, or re-export the model with this version")
        return data

    @property
    def dims(self) -> list[int]:
        """Every embedding size a request may ask for (Matryoshka sizes and the full size)."""
        return sorted(set(self.matryoshka_dims) | {self.embedding_dim})

    @property
    def job(self) -> str | None:
        return self.source.get("job")


def read_manifest(model_dir: str | Path) -> Manifest:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{model_dir} has no {MANIFEST}: export one with `python -m train.export` "
                            "or point at a training job's onnx/ directory")
    return parse_manifest(path.read_text(), model_dir)


def parse_manifest(text: str, where: str | Path) -> Manifest:
    """manifest.json's text (read from a folder or from storage) -> Manifest, or ArtifactError naming `where`."""
    try:
        return Manifest.model_validate(json.loads(text))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{where}/{MANIFEST} is not a valid rayembed manifest: {exc}") from None


def write_manifest(model_dir: str | Path, manifest: Manifest) -> None:
    (Path(model_dir) / MANIFEST).write_text(manifest.model_dump_json(indent=2))


def missing_files(model_dir: str | Path) -> list[str]:
    return [f for f in REQUIRED_FILES if not (Path(model_dir) / f).is_file()]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """tokenizer.json with its own padding and truncation off (all-MiniLM-L6-v2's pads every text to 128)."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


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


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The graph's inputs: ids padded to the batch's longest text, and the attention mask."""
    width = max(1, max(len(x) for x in ids))
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)  # [B, S]
    mask = np.zeros((len(ids), width), dtype=np.int64)  # [B, S]
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return input_ids, mask


class TextTokenizer:
    """Tokenize, truncate to max_length, pad to the batch's longest; returns int64 numpy arrays.

    Used by training, evaluation and the export's parity gate on a model folder (HF or artifact).
    """

    def __init__(self, model_dir: str | Path, max_length: int):
        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (a fast tokenizer file is required)")
        self.tokenizer = Tokenizer.from_file(str(path))
        padding = self.tokenizer.padding  # read before it is switched off: it may name the pad id
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.pad_id = resolve_pad_id(model_dir, self.tokenizer, padding)
        self.max_length = max_length

    def pad(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_batch(ids, self.pad_id)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad([e.ids for e in self.tokenizer.encode_batch(list(texts))])
