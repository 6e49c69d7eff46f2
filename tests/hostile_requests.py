"""Malformed and hostile inference requests, as data: what a careless or hostile client sends, and the
answer each must get (status, and a fragment of the message that says what to fix).

Used by tests/test_serve.py against a gateway whose limits are 64 inputs, 5,000 characters per input,
100,000 body bytes and a 2 s body deadline (see `table()` there). Paths use `{GW}` for the gateway
prefix of workspace `default`; `body` is bytes sent as is, or an object sent as JSON.
"""

from __future__ import annotations

import http.client
import json


def send(base: str, method: str, path: str, headers: dict, body: object) -> tuple[int, bytes]:
    """Exactly these headers and bytes (no Content-Type added), over a fresh connection."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_envelope(raw: bytes, fragment: str) -> dict:
    """The OpenAI error envelope, its message containing `fragment`, and short: names are cut."""
    res = json.loads(raw)
    assert set(res) == {"error"} and set(res["error"]) == {"message", "type", "param", "code"}, res
    assert fragment in res["error"]["message"], res
    assert len(raw) < 2000, f"{len(raw)} bytes: client-supplied names must be cut"
    return res


E = "/v1/embeddings"
M = "{GW}/model/minilm/-/v1/embeddings"
P = "{GW}/provider/minilm-cpu/-/v1/embeddings"
OK = {"model": "minilm", "input": "a valid sentence"}
JSON = {"Content-Type": "application/json"}
LONG = "word " * 600  # > the model's max_seq_length in tokens, < the 5,000-character limit


def with_(**fields) -> dict:
    return {**OK, **fields}


# (id, method, path, headers, body, status, message fragment)
CASES: list[tuple[str, str, str, dict, object, int, str]] = [
    # ---- wrong JSON types, field by field
    ("model-number", "POST", E, JSON, with_(model=5), 400, "model must be a string, not a number"),
    ("model-null", "POST", E, JSON, with_(model=None), 400, "model is required"),
    ("model-array", "POST", E, JSON, with_(model=["minilm"]), 400, "model must be a string, not an array"),
    ("model-object", "POST", E, JSON, with_(model={}), 400, "model must be a string, not an object"),
    ("model-bool", "POST", E, JSON, with_(model=True), 400, "model must be a string, not a boolean"),
    ("input-missing", "POST", E, JSON, {"model": "minilm"}, 400, "input is required"),
    ("input-null", "POST", E, JSON, with_(input=None), 400, "not null"),
    ("input-number", "POST", E, JSON, with_(input=5), 400, "a string or a list of strings, not a number"),
    ("input-object", "POST", E, JSON, with_(input={"text": "x"}), 400, "not an object"),
    ("input-bool", "POST", E, JSON, with_(input=True), 400, "not a boolean"),
    ("input-empty-list", "POST", E, JSON, with_(input=[]), 400, "must not be empty"),
    ("input-empty-string", "POST", E, JSON, with_(input=""), 400, "input[0] is an empty string"),
    ("input-nested", "POST", E, JSON, with_(input=[["a"]]), 400, "input[0] must be a string, not an array"),
    ("input-null-item", "POST", E, JSON, with_(input=["a", None]), 400, "input[1] must be a string, not null"),
    ("input-mixed", "POST", E, JSON, with_(input=["a", 1]), 400, "input[1] must be a string, not a number"),
    ("input-token-ids", "POST", E, JSON, with_(input=[101, 2023, 102]), 400, "token-id input is not supported"),
    ("input-token-id-rows", "POST", E, JSON, with_(input=[[101, 2023], [102]]), 400, "input[0] must be a string"),
    ("input-lone-surrogate", "POST", E, JSON, b'{"model": "minilm", "input": "bad \\ud800 text"}', 400,
     "input[0] is not valid Unicode"),
    ("dimensions-string", "POST", E, JSON, with_(dimensions="384"), 400, "dimensions must be an integer, not a string"),
    ("dimensions-bool", "POST", E, JSON, with_(dimensions=True), 400, "dimensions must be an integer, not a boolean"),
    ("dimensions-float", "POST", E, JSON, with_(dimensions=1.5), 400, "dimensions must be an integer"),
    ("dimensions-zero", "POST", E, JSON, with_(dimensions=0), 400, "greater than or equal to 1"),
    ("dimensions-negative", "POST", E, JSON, with_(dimensions=-384), 400, "greater than or equal to 1"),
    ("dimensions-unsupported", "POST", E, JSON, with_(dimensions=100), 400, "one of [384]"),
    ("dimensions-huge", "POST", E, JSON, with_(dimensions=10**30), 400, "one of [384]"),
    ("input-type-unknown", "POST", E, JSON, with_(input_type="doc"), 400, "'query' or 'passage'"),
    ("input-type-number", "POST", E, JSON, with_(input_type=1), 400, "'query' or 'passage'"),
    ("truncate-unknown", "POST", E, JSON, with_(truncate="MIDDLE"), 400, "'NONE', 'START' or 'END'"),
    ("truncate-number", "POST", E, JSON, with_(truncate=7), 400, "'NONE', 'START' or 'END'"),
    ("truncate-null", "POST", E, JSON, with_(truncate=None), 400, "'NONE', 'START' or 'END'"),
    ("encoding-unknown", "POST", E, JSON, with_(encoding_format="hex"), 400, "'float' or 'base64'"),
    ("encoding-number", "POST", E, JSON, with_(encoding_format=1), 400, "'float' or 'base64'"),
    ("user-number", "POST", E, JSON, with_(user=5), 400, "user must be a string, not a number"),
    # ---- sizes and lengths
    ("too-many-inputs", "POST", E, JSON, with_(input=["x"] * 65), 413, "65 inputs in one request; the limit is 64"),
    ("input-too-many-chars", "POST", E, JSON, with_(input="x" * 5001), 413, "5001 characters; the limit is 5000"),
    ("multi-megabyte-string", "POST", E, JSON, with_(input="x" * 3_000_000), 413, "the limit is 100000"),
    ("declared-huge-body", "POST", E, {**JSON, "Content-Length": "999999999"}, b"", 413, "999999999 bytes"),
    ("over-long-truncate-none", "POST", E, JSON, with_(input=LONG), 400, "exceeds maximum allowed token size"),
    ("over-long-in-a-batch", "POST", E, JSON, with_(input=["short", LONG]), 400, "(input[1])"),
    ("over-long-truncate-lower", "POST", E, JSON, with_(input=LONG, truncate="none"), 400, "send truncate=END or START"),
    ("deep-nesting", "POST", E, JSON, b'{"model": "minilm", "input": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400,
     "nested too deeply"),
    # ---- names: unknown, long, traversal, odd unicode
    ("model-unknown", "POST", E, JSON, with_(model="nope"), 404, "model 'nope' does not exist"),
    ("model-50k-chars", "POST", E, JSON, with_(model="m" * 50_000), 404, "(50000 characters)"),
    ("model-traversal", "POST", E, JSON, with_(model="../../etc/passwd"), 404, "does not exist"),
    ("model-workspace-traversal", "POST", E, JSON, with_(model="research/../default/minilm"), 404, "does not exist"),
    ("model-unicode", "POST", E, JSON, with_(model="мир/名字\u202e"), 404, "does not exist"),
    ("model-nul", "POST", E, JSON, with_(model="minilm\u0000"), 404, "does not exist"),
    ("workspace-unknown", "POST", "/v2/workspaces/nowhere/inference/gateway/model/minilm/-/v1/embeddings", JSON,
     {"input": "x"}, 404, "workspace 'nowhere' does not exist"),
    ("workspace-encoded-traversal", "POST", "/v2/workspaces/..%2F..%2Fetc/inference/gateway/model/minilm/-/v1/embeddings",
     JSON, {"input": "x"}, 404, "no route POST /v2/workspaces/../../etc/"),
    ("workspace-unicode", "POST", "/v2/workspaces/%E5%90%8D%E5%AD%97/inference/gateway/model/minilm/-/v1/embeddings",
     JSON, {"input": "x"}, 404, "does not exist"),
    ("entity-unknown", "POST", "{GW}/model/ghost/-/v1/embeddings", JSON, {"input": "x"}, 404, "model 'ghost' does not exist"),
    ("entity-long-name", "POST", "{GW}/model/" + "g" * 5000 + "/-/v1/embeddings", JSON, {"input": "x"}, 404,
     "(5000 characters)"),
    ("provider-unknown", "POST", "{GW}/provider/ghost/-/v1/embeddings", JSON, {"input": "x"}, 404, "provider 'ghost'"),
    ("provider-other-workspace", "POST", "{GW}/provider/nemo-cpu/-/v1/embeddings", JSON, {"input": "x"}, 404,
     "provider 'nemo-cpu' does not exist in workspace 'default'"),
    # ---- broken bodies
    ("broken-json", "POST", E, JSON, b"{not json", 400, "not valid JSON"),
    ("truncated-json", "POST", E, JSON, b'{"model": "minilm", "input": "x"', 400, "not valid JSON"),
    ("empty-body", "POST", E, JSON, b"", 400, "not valid JSON"),
    ("body-null", "POST", E, JSON, b"null", 400, "must be a JSON object, not null"),
    ("body-array", "POST", E, JSON, b'[{"model": "minilm", "input": "x"}]', 400, "must be a JSON object, not an array"),
    ("body-string", "POST", E, JSON, b'"minilm"', 400, "must be a JSON object, not a string"),
    ("duplicate-keys", "POST", E, JSON, b'{"model": "minilm", "input": "x", "input": ["y"]}', 400, "key 'input' twice"),
    ("nan-literal", "POST", E, JSON, b'{"model": "minilm", "input": "x", "dimensions": NaN}', 400, "NaN is not a JSON number"),
    ("infinity-literal", "POST", E, JSON, b'{"model": "minilm", "input": "x", "dimensions": Infinity}', 400,
     "Infinity is not a JSON number"),
    ("not-utf8", "POST", E, JSON, b'{"model": "minilm", "input": "caf\xe9"}', 400, "not UTF-8 (byte 0xe9"),
    ("utf16-body", "POST", E, JSON, '{"model": "minilm", "input": "x"}'.encode("utf-16"), 400, "not UTF-8"),
    ("trailing-garbage", "POST", E, JSON, b'{"model": "minilm", "input": "x"} trailing', 400, "not valid JSON"),
    # ---- headers, methods, paths
    ("no-content-type", "POST", E, {}, OK, 415, "send the header Content-Type: application/json (got no Content-Type)"),
    ("text-plain", "POST", E, {"Content-Type": "text/plain"}, OK, 415, "got Content-Type 'text/plain'"),
    ("form-encoded", "POST", E, {"Content-Type": "application/x-www-form-urlencoded"}, OK, 415, "application/json"),
    ("entity-route-text-plain", "POST", M, {"Content-Type": "text/plain"}, {"input": "x"}, 415, "application/json"),
    ("get-embeddings", "GET", E, {}, None, 405, "method GET is not allowed on /v1/embeddings; use POST"),
    ("put-embeddings", "PUT", E, JSON, OK, 405, "method PUT is not allowed"),
    ("delete-models", "DELETE", "/v1/models", {}, None, 405, "method DELETE is not allowed on /v1/models"),
    ("post-models", "POST", "/v1/models", JSON, {}, 405, "not allowed on /v1/models"),
    ("get-provider-embeddings", "GET", P, {}, None, 405, "not allowed"),
    ("unknown-path", "GET", "/v2/nothing", {}, None, 404, "no route GET /v2/nothing"),
    ("trailing-slash", "POST", E + "/", JSON, OK, 404, "no route POST /v1/embeddings/"),
    ("typo-path", "POST", "/v1/embedding", JSON, OK, 404, "no route POST /v1/embedding"),
    ("root", "GET", "/", {}, None, 404, "no route GET /"),
    ("long-unknown-path", "GET", "/" + "p" * 10_000, {}, None, 404, "no route GET /ppp"),
]

# Requests that must succeed: odd but valid input, and the forms a client may legitimately use.
VALID: list[tuple[str, str, str, dict, object]] = [
    ("charset-in-content-type", "POST", E, {"Content-Type": "application/json; charset=utf-8"}, OK),
    ("vendor-json-type", "POST", E, {"Content-Type": "application/vnd.api+json"}, OK),
    ("unknown-fields-ignored", "POST", E, JSON, with_(extra={"a": 1}, stream=True)),
    ("emoji-rtl-zero-width", "POST", E, JSON, with_(input=["😀 \u200f\u05e9\u05dc\u05d5\u05dd \u200b", "e\u0301" * 50])),
    ("truncate-end", "POST", E, JSON, with_(input=LONG, truncate="END")),
    ("truncate-start", "POST", E, JSON, with_(input=LONG, truncate="START")),
    ("max-inputs", "POST", E, JSON, with_(input=[f"text {i}" for i in range(64)])),
    ("dimensions-supported", "POST", E, JSON, with_(dimensions=384)),
    ("entity-route", "POST", M, JSON, {"input": "x"}),
    ("provider-route", "POST", P, JSON, {"input": "x"}),
]

W = "/v2/workspaces"
D = "/v2/workspaces/default"
# Management routes (the control plane's API, tests/test_platform.py): (id, method, path, headers, body, status, fragment)
MANAGEMENT: list[tuple[str, str, str, dict, object, int, str]] = [
    ("broken-json", "POST", W, JSON, b"{bad", 400, "not valid JSON"),
    ("body-array", "POST", W, JSON, b"[]", 400, "must be a JSON object, not an array"),
    ("body-null", "PATCH", D + "/deployments/ghost", JSON, b"null", 400, "must be a JSON object, not null"),
    ("duplicate-keys", "POST", W, JSON, b'{"name": "abc", "name": "abd"}', 400, "key 'name' twice"),
    ("not-utf8", "POST", W, JSON, b'{"name": "caf\xe9"}', 400, "not UTF-8"),
    ("text-plain", "POST", W, {"Content-Type": "text/plain"}, {"name": "abc"}, 415, "Content-Type: application/json"),
    ("name-number", "POST", W, JSON, {"name": 5}, 422, "workspace name 5 is invalid"),
    ("name-missing", "POST", W, JSON, {}, 422, "name is required"),
    ("name-100k", "POST", W, JSON, {"name": "a" * 100_000}, 422, "(100000 characters)"),
    ("name-traversal", "POST", D + "/models", JSON, {"name": "../etc", "artifact": "/tmp"}, 422, "is invalid"),
    ("name-unicode", "POST", W, JSON, {"name": "名字"}, 422, "is invalid"),
    ("workspace-traversal", "GET", "/v2/workspaces/..%2F..%2Fetc/models", {}, None, 404, "no route GET"),
    ("workspace-unknown", "GET", "/v2/workspaces/nowhere/models", {}, None, 404, "workspace 'nowhere' does not exist"),
    ("artifact-number", "POST", D + "/models", JSON, {"name": "m1", "artifact": 5}, 400, "artifact must be a string"),
    ("model-both-sources", "POST", D + "/models", JSON, {"name": "m1", "artifact": "/x", "base_model": "y"}, 400,
     "exactly one of base_model"),
    ("job-no-output-model", "POST", D + "/customization/jobs", JSON, {"config": {}}, 422, "output_model is required"),
    ("job-config-string", "POST", D + "/customization/jobs", JSON, {"output_model": "out-1", "config": "x"}, 400,
     "config must be a JSON object"),
    ("job-unknown", "GET", D + "/customization/jobs/nope", {}, None, 404, "customization job 'nope' does not exist"),
    ("cancel-unknown", "POST", D + "/customization/jobs/nope/cancel", {}, None, 404, "does not exist"),
    ("deployment-unknown-model", "POST", D + "/deployments", JSON, {"name": "d1", "model": "nope"}, 404,
     "model 'nope' does not exist"),
    ("delete-collection", "DELETE", W, {}, None, 405, "method DELETE is not allowed on /v2/workspaces; use"),
    ("trailing-slash", "GET", W + "/", {}, None, 404, "no route GET /v2/workspaces/"),
    ("unknown-path", "GET", "/v2/nothing", {}, None, 404, "no route GET /v2/nothing"),
]
