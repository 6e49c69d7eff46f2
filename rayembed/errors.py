"""Typed errors of every layer (store, control plane, gateway), their HTTP status in one table, and the OpenAI envelope.

The domain raises `ServeError` subclasses; the one handler of the gateway and the API (serve/gateway.py) turns them
(and pydantic's validation errors, Serve's back-pressure and unavailability) into a status and
`{"error": {"message", "type", "param", "code"}}`. Anything unexpected is a 500 without a traceback.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base of every error a client may see; `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message


class InvalidRequest(ServeError):
    """The request body is malformed or asks for something the model cannot do."""


class InputTooLong(InvalidRequest):
    """An input exceeds the model's maximum token count and `truncate` is NONE."""


class PayloadTooLarge(ServeError):
    """Too many inputs in one request, or an input longer than the character limit."""


class NotFound(ServeError):
    """Unknown workspace, model entity or provider."""


class InvalidName(ServeError):
    """A management request names something invalidly (workspace, model, job, deployment): 422."""


class Conflict(ServeError):
    """The request clashes with what exists: a name already taken, a job already finished, a deployment in use."""


class PromotionRefused(Conflict):
    """Deploying a model whose evaluation says it is worse than its base, without the explicit override."""


class UnsupportedMediaType(ServeError):
    """A request body that is not declared as JSON (Content-Type: application/json)."""


class MethodNotAllowed(ServeError):
    """A known path asked with the wrong HTTP method; `allow` lists the right ones."""

    def __init__(self, message: str, allow: str = ""):
        super().__init__(message)
        self.allow = allow


class RequestTimeout(ServeError):
    """The request body did not arrive in time (a stalled or trickling client)."""


class ClientGone(ServeError):
    """The client closed the connection before its request was read; nobody reads the answer."""


class UpstreamTimeout(ServeError):
    """No replica answered within the provider's request_timeout_s (each attempt on another replica)."""


class QueueFull(ServeError):
    """The model's replicas and queue are full; retry later."""


class Unavailable(ServeError):
    """No healthy replica can take the request (not deployed yet, failed, or shutting down)."""


class Unauthorized(ServeError):
    """API keys are configured and the request carries none, or one that is unknown or revoked."""


class PermissionDenied(ServeError):
    """The request's API key is valid but may not do this (create or delete a workspace needs an admin key)."""


class QuotaExceeded(ServeError):
    """The workspace is at one of its quotas (jobs, replicas, CPUs, GPUs, storage); the message names which."""


# class -> (HTTP status, OpenAI error type). The most specific class wins (checked in MRO order).
STATUS: dict[type[ServeError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    InputTooLong: (400, "invalid_request_error"),
    NotFound: (404, "not_found_error"),
    Conflict: (409, "conflict_error"),
    PromotionRefused: (409, "conflict_error"),
    InvalidName: (422, "invalid_request_error"),
    PayloadTooLarge: (413, "invalid_request_error"),
    UnsupportedMediaType: (415, "invalid_request_error"),
    MethodNotAllowed: (405, "invalid_request_error"),
    RequestTimeout: (408, "invalid_request_error"),
    ClientGone: (499, "invalid_request_error"),
    QueueFull: (429, "rate_limit_error"),
    Unavailable: (503, "service_unavailable_error"),
    UpstreamTimeout: (504, "timeout_error"),
    Unauthorized: (401, "invalid_request_error"),
    PermissionDenied: (403, "invalid_request_error"),
    QuotaExceeded: (429, "insufficient_quota"),
}
INTERNAL = (500, "internal_server_error")

# Error `code` strings, stable for clients that branch on them.
CODES: dict[type[ServeError], str] = {
    InvalidRequest: "invalid_request",
    InputTooLong: "input_too_long",
    NotFound: "not_found",
    Conflict: "conflict",
    PromotionRefused: "promotion_refused",
    InvalidName: "invalid_name",
    PayloadTooLarge: "payload_too_large",
    UnsupportedMediaType: "unsupported_media_type",
    MethodNotAllowed: "method_not_allowed",
    RequestTimeout: "request_timeout",
    ClientGone: "client_closed_request",
    QueueFull: "queue_full",
    Unavailable: "no_healthy_replica",
    UpstreamTimeout: "upstream_timeout",
    Unauthorized: "invalid_api_key",
    PermissionDenied: "permission_denied",
    QuotaExceeded: "quota_exceeded",
}


def status_of(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, error type, code) for an exception; unknown exceptions map to 500."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return (*STATUS[cls], CODES[cls])
    return (*INTERNAL, "internal_error")


def shown(value: object, limit: int = 80) -> str:
    """repr() of a client-supplied value for an error message, cut to `limit` characters: a
    100,000-character name must not come back as a 100 kB error body."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(str(value))} characters)"


def envelope(message: str, err_type: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
