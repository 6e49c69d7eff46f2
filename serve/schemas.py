"""The embeddings request (OpenAI body plus NIM fields) and the response body, encoded with orjson."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve.errors import InvalidRequest, PayloadTooLarge
from serve.settings import Limits


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    input: str | list[str]
    input_type: Literal["query", "passage"] | None = None
    truncate: Literal["NONE", "START", "END"] = "NONE"
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, value):
        if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
            raise ValueError("must be a string or a list of strings (token-id input is not supported)")
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


def parse_request(body: bytes) -> EmbeddingRequest:
    """Body bytes -> request, or InvalidRequest naming the field and what to send instead."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return EmbeddingRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            raise InvalidRequest(f"{where} is required", field) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"{where}: {msg}" if where else msg, field) from None


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
