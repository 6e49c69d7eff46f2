"""What /openapi.json says about routes that read their own bodies.

The routes parse their bodies themselves (strict JSON: UTF-8, one object, no duplicate keys, a size limit), so
FastAPI does not see a body parameter. `json_body(Model)` documents the body as the model that validates it,
`answers(...)` documents the answer and every error in the envelope, and `install_openapi` puts the request models
into the components and drops FastAPI's own 422 schema (its validation errors answer in the envelope too).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from rayembed.errors import envelope

ERROR_STATUSES = {
    400: "invalid request: the message names the field and what to change",
    401: "an API key is needed (Authorization: Bearer ...)",
    403: "the key does not allow this",
    404: "no such route, workspace or entity",
    405: "the method is not allowed on this path (the Allow header lists those that are)",
    409: "the entity exists, is in use, or is in a state that does not allow this",
    413: "the body or an input is too large",
    415: "the body is not JSON (Content-Type)",
    422: "a name or value is not acceptable",
    429: "the model's queue is full: retry after Retry-After",
    503: "the control plane or a model is not available yet: retry after Retry-After",
}
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string", "description": "what went wrong and what to change"},
        "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "the field at fault"},
        "code": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}}}


def _ref(model: type[BaseModel] | str) -> dict:
    return {"$ref": f"#/components/schemas/{model if isinstance(model, str) else model.__name__}"}


def json_body(model: type[BaseModel], required: bool = True) -> dict:
    """`openapi_extra` for a route whose JSON body `model` validates."""
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": _ref(model)}}}}


def answers(status: int, model: type[BaseModel] | None, description: str, links: dict | None = None,
            content: dict | None = None) -> dict:
    """`responses=` for a route: its answer (`model`, or `content` as given) and the errors in the envelope."""
    ok: dict[str, Any] = {"description": description}
    if model is not None:
        ok["model"] = model
    if content is not None:
        ok["content"] = content
    if links:
        ok["links"] = links
    errors = {code: {"description": text, "content": {"application/json": {
        "schema": _ref("ErrorEnvelope"), "example": envelope(text, "error", None, None)}}}
        for code, text in ERROR_STATUSES.items()}
    return {status: ok, **errors}


def install_openapi(app: FastAPI, request_models: list[type[BaseModel]]) -> None:
    """/openapi.json with the request models among the components and every error as the envelope."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, defs = models_json_schema([(m, "validation") for m in request_models],
                                     ref_template="#/components/schemas/{model}")
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        components["ErrorEnvelope"] = ERROR_SCHEMA
        for gone in ("HTTPValidationError", "ValidationError"):
            components.pop(gone, None)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                bad = operation.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {})
                if bad.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    operation["responses"]["422"] = {"description": ERROR_STATUSES[422], "content": {
                        "application/json": {"schema": _ref("ErrorEnvelope")}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
