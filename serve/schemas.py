"""The embeddings request (OpenAI body plus NIM fields) and the response body, encoded with orjson."""

from __future__ import annotations

import base64
import json
from typing import Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rayembed.errors import InvalidRequest, PayloadTooLarge
from serve.settings import Limits


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore",  # OpenAI clients send fields we do not use
                              json_schema_extra={"examples": [{"model": "minilm", "input": ["query: serial terminal "
                                                 "emulator"], "encoding_format": "float"}]})

    model: str | None = None
    input: str | list[str]
    input_type: Literal["query", "passage"] | None = None
    truncate: Literal["NONE", "START", "END"] = "NONE"
    dimensions: int | None = Field(None, ge=1, strict=True)  # "384" and true are refused, not coerced
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, value):
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be a string or a list of strings, not {json_type(value)}")
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError("token-id input is not supported: send the text as a string or a list of strings")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise ValueError(f"input[{i}] must be a string, not {json_type(v)} (send a flat list of strings)")
        return value

    @field_validator("input", mode="after")
    @classmethod
    def _unicode(cls, value):
        # JSON may escape a lone surrogate ("\ud800"), which no tokenizer can encode
        for i, text in enumerate([value] if isinstance(value, str) else value):
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(f"input[{i}] is not valid Unicode: an unpaired surrogate "
                                     f"{text[exc.start]!r} at character {exc.start}") from None
        return value

    @field_validator("truncate", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    @field_validator("input_type", "encoding_format", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    def texts(self, limits: Limits) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise InvalidRequest("input must not be empty", "input")
        if len(texts) > limits.max_inputs_per_request:
            raise PayloadTooLarge(f"{len(texts)} inputs in one request; the limit is {limits.max_inputs_per_request}: "
                                  "split the request", "input")
        for i, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"input[{i}] is an empty string", "input")
            if len(text) > limits.max_chars_per_input:
                raise PayloadTooLarge(f"input[{i}] has {len(text)} characters; the limit is "
                                      f"{limits.max_chars_per_input}", "input")
        return texts


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 little-endian float32 (encoding_format)")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """The OpenAI embeddings answer (written by `render`, documented here)."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str = Field(description="workspace/model")
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    providers: list[str] = []


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["live", "ready"]
    providers: int | list[str] | None = None


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages a client can act on."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a decimal number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise InvalidRequest(f"request body has the key {dup[:80]!r} twice; send each field once")
    return dict(pairs)


def _no_constants(name: str):
    raise InvalidRequest(f"request body is not valid JSON: {name} is not a JSON number")


def parse_json_object(body: bytes) -> dict:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, an object at the top."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not UTF-8 (byte {body[exc.start]:#04x} at offset {exc.start}): "
                             "send JSON encoded as UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidRequest("request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, not {json_type(data)}")
    return data


def parse_request(body: bytes) -> EmbeddingRequest:
    """Body bytes -> request, or InvalidRequest naming the field and what to send instead."""
    data = parse_json_object(body)
    try:
        return EmbeddingRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            raise InvalidRequest(f"{where} is required", field) from None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("int_type", "int_from_float", "string_type"):
            wanted = "an integer" if err["type"] != "string_type" else "a string"
            msg = f"{where} must be {wanted}, not {json_type(err['input'])}"
        elif where and not msg.startswith(where + "["):
            msg = f"{where}: {msg}"
        raise InvalidRequest(msg, field) from None


def render(embeddings: np.ndarray, encoding_format: str, model: str, prompt_tokens: int) -> bytes:
    """The OpenAI response body; base64 is little-endian float32, as the openai SDK decodes it."""
    if encoding_format == "base64":
        rows = [base64.b64encode(r.astype("<f4").tobytes()).decode("ascii") for r in embeddings]
    else:
        rows = list(embeddings.astype(np.float32, copy=False))
    return orjson.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }, option=orjson.OPT_SERIALIZE_NUMPY)
