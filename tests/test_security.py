"""API keys: the key ring, workspace scopes in the routing table, keys in the control plane's store
(hashed), and the API ingress's FastAPI app served over real HTTP (uvicorn) in front of a real
ControlPlane object: 401 without a key, 404 for another workspace's names, 403 for admin verbs."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

from serve.auth import ALL, OPEN, KeyRing, digest, new_key
from rayembed.errors import NotFound, Unauthorized
from serve.routing import RoutingTable
from tests.api_server import ApiServer as _Server, plane  # noqa: F401 - plane: a fixture
from serve.settings import GatewayConfig


def test_key_ring_accepts_only_the_exact_key_and_scopes_it():
    key_id, key, sha = new_key()
    other_id, other, other_sha = new_key()
    ring = KeyRing([{"id": key_id, "sha256": sha, "workspaces": ["team-a"]},
                    {"id": other_id, "sha256": other_sha, "workspaces": [ALL]}])
    assert key.startswith(f"rek_{key_id}_") and sha == digest(key.split("_", 2)[2]) and key not in sha
    access = ring.authenticate(f"Bearer {key}")
    assert access.key_id == key_id and access.allows("team-a") and not access.allows("team-b") and not access.admin
    assert ring.authenticate(f"bearer  {other}").admin  # the scheme is case-insensitive
    for header, message in [(None, "an API key is required"), ("", "an API key is required"),
                            (f"Basic {key}", "must be 'Bearer <key>'"), ("Bearer", "must be 'Bearer <key>'"),
                            (f"Bearer {key}x", "invalid API key"), (f"Bearer {key[:-1]}", "invalid API key"),
                            (f"Bearer rek_{other_id}_{key.split('_', 2)[2]}", "invalid API key"),  # id and secret mixed
                            ("Bearer sk-openai-style", "invalid API key"), ("Bearer rek__", "invalid API key")]:
        with pytest.raises(Unauthorized, match=message):
            ring.authenticate(header)
    with pytest.raises(Unauthorized, match="has no keys yet"):  # no keys: closed, not open
        KeyRing([]).authenticate(f"Bearer {key}")
    assert KeyRing([], open_=True).authenticate(None) is OPEN  # open mode: the operator's explicit choice
    with pytest.raises(Unauthorized, match="an API key is required"):  # a key exists: open mode is over
        KeyRing([{"id": key_id, "sha256": sha, "workspaces": ["team-a"]}], open_=True).authenticate(None)


def test_routing_table_hides_other_workspaces():
    cfg = GatewayConfig.model_validate({"models": [
        {"name": "a", "providers": [{"name": "a1", "app": "x"}]},
        {"workspace": "team-b", "name": "secret-model", "providers": [{"name": "secret-provider", "app": "z"}]}]})
    t = RoutingTable(cfg, ["default", "team-b"])
    key_id, key, sha = new_key()
    access = KeyRing([{"id": key_id, "sha256": sha, "workspaces": ["default"]}]).authenticate(f"Bearer {key}")
    assert t.model_ids(access) == ["a"] and t.model_ids() == ["a", "team-b/secret-model"]
    assert [m["id"] for m in t.listing(access=access)["data"]] == ["a"]
    for call in (lambda: t.openai("team-b/secret-model", access), lambda: t.entity("team-b", "secret-model", access),
                 lambda: t.provider("team-b", "secret-provider", access), lambda: t.openai("nope", access)):
        with pytest.raises(NotFound) as err:
            call()
        known = err.value.message.split("(known")[1]  # the asked-for name is echoed; nothing else of team-b is
        assert "secret" not in known and "team-b" not in known
    with pytest.raises(NotFound) as hidden:
        t.entity("team-b", "secret-model", access)
    with pytest.raises(NotFound) as missing:
        t.entity("team-c", "secret-model", access)
    assert hidden.value.message.replace("team-b", "X") == missing.value.message.replace("team-c", "X")


def test_keys_are_stored_hashed_scoped_and_revocable(plane, tmp_path):
    from rayembed.errors import Conflict, InvalidRequest

    plane.create_workspace({"name": "team-a"})
    created = plane.create_key(["team-a"], "ci")
    assert created["workspaces"] == ["team-a"] and created["label"] == "ci" and "sha256" not in created
    assert plane.list_keys() == [{k: v for k, v in created.items() if k != "key"}]
    raw = b"".join(p.read_bytes() for p in (tmp_path / "home").glob("state.db*"))
    assert created["key"].encode() not in raw and created["key"].split("_", 2)[2].encode() not in raw
    routes = plane.routes()
    assert routes["keys"] == [{"id": created["id"], "sha256": digest(created["key"].split("_", 2)[2]),
                               "workspaces": ["team-a"]}]
    assert plane.routes(routes["version"]) is None
    with pytest.raises(NotFound, match="workspace 'nope' does not exist"):
        plane.create_key(["nope"])
    with pytest.raises(InvalidRequest, match="at least one workspace"):
        plane.create_key([])
    with pytest.raises(Conflict, match="revoke them first"):
        plane.delete_workspace("team-a")
    plane.revoke_key(created["id"])
    assert plane.list_keys() == [] and plane.routes(routes["version"])["keys"] == []
    with pytest.raises(NotFound, match="does not exist"):
        plane.revoke_key(created["id"])
    assert plane.delete_workspace("team-a")["deleted"] is True


def test_api_with_keys_over_http(plane, monkeypatch):
    from cluster.entities import Artifact, ModelEntity
    from rayembed.errors import Conflict

    srv = _Server(plane, monkeypatch)
    try:
        status, body, _ = srv.request("GET", "/v2/workspaces")
        assert status == 503 and "has not loaded its keys" in body["error"]["message"]  # fails closed at start
        assert srv.request("GET", "/v1/health/live")[0] == 200
        srv.sync()
        status, body, _ = srv.request("GET", "/v2/workspaces")
        assert status == 401 and "has no keys yet" in body["error"]["message"]  # no keys, no open mode: closed
        plane.set_open_mode(True)
        srv.sync()
        assert srv.request("GET", "/v2/workspaces")[0] == 200  # open mode, chosen by the operator
        for ws in ("team-a", "team-b"):
            plane.create_workspace({"name": ws})
            plane.ctx.save(ModelEntity(workspace=ws, name=f"{ws}-model", base_model="b", artifact=Artifact(uri="/x")))
        a_record = plane.create_key(["team-a"], "a")
        a = a_record["key"]
        admin = plane.create_key([ALL], "admin")["key"]
        srv.sync()

        for method, path in [("GET", "/v2/workspaces"), ("GET", "/v2/workspaces/team-a/models"), ("GET", "/v1/models"),
                             ("POST", "/v1/embeddings"), ("GET", "/openapi.json"),
                             ("DELETE", "/v2/workspaces/team-a/models/team-a-model")]:
            status, body, headers = srv.request(method, path)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", (method, path, body)
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert srv.request("GET", "/v2/workspaces", key=a + "x")[0] == 401
        page = urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/docs", timeout=30)  # a static page, no data:
        assert page.status == 200 and b"swagger-ui" in page.read()  # it asks for a key; /openapi.json needs one
        assert srv.request("GET", "/v1/health/live")[0] == 200 and srv.request("GET", "/v1/health/ready")[0] == 200
        assert srv.request("GET", "/v1/health/ready")[1]["providers"] == 0  # the open probe names nothing

        status, body, _ = srv.request("GET", "/v2/workspaces", key=a)
        assert status == 200 and [w["name"] for w in body["data"]] == ["team-a"]
        assert [m["name"] for m in srv.request("GET", "/v2/workspaces/team-a/models", key=a)[1]["data"]] == ["team-a-model"]
        hidden = srv.request("GET", "/v2/workspaces/team-b/models", key=a)
        missing = srv.request("GET", "/v2/workspaces/team-z/models", key=a)
        assert hidden[0] == missing[0] == 404
        assert hidden[1]["error"]["message"].replace("team-b", "X") == missing[1]["error"]["message"].replace("team-z", "X")
        for method, path in [("DELETE", "/v2/workspaces/team-b/models/team-b-model"), ("GET", "/v2/workspaces/team-b"),
                             ("DELETE", "/v2/workspaces/team-b")]:
            assert srv.request(method, path, key=a)[0] == 404, (method, path)
        status, body, _ = srv.request("POST", "/v2/workspaces/team-b/models", key=a, body={"name": "x", "artifact": "/x"})
        assert status == 404
        assert plane.store.get("model", "team-b", "team-b-model") is not None  # nothing of B's was touched
        assert plane.store.get("model", "team-b", "x") is None
        status, body, _ = srv.request("POST", "/v2/workspaces", key=a, body={"name": "team-c"})
        assert status == 403 and body["error"]["code"] == "permission_denied" and "--all-workspaces" in body["error"]["message"]
        status, body, _ = srv.request("POST", "/v1/embeddings", key=a, body={"model": "team-b/team-b-model", "input": "x"})
        assert status == 404 and "team-b" not in body["error"]["message"].split("(known")[1]

        status, body, _ = srv.request("GET", "/v2/workspaces", key=admin)
        assert sorted(w["name"] for w in body["data"]) == ["default", "team-a", "team-b"]
        assert srv.request("POST", "/v2/workspaces", key=admin, body={"name": "team-c"})[0] == 201
        assert srv.request("GET", "/v2/workspaces/team-b/models", key=admin)[0] == 200

        plane.revoke_key(a_record["id"])
        srv.sync()
        assert srv.request("GET", "/v2/workspaces", key=a)[0] == 401  # revoked
        assert srv.request("GET", "/v2/workspaces", key=admin)[0] == 200
        for k in plane.list_keys():  # a revoke-then-create rotation, stopped halfway: every key gone
            plane.revoke_key(k["id"])
        srv.sync()
        for method, path in [("GET", "/v2/workspaces"), ("GET", "/v2/workspaces/team-a/models"), ("GET", "/v1/models"),
                             ("POST", "/v1/embeddings"), ("GET", "/openapi.json"),
                             ("POST", "/v2/workspaces"), ("DELETE", "/v2/workspaces/team-b")]:
            status, body, _ = srv.request(method, path, body={} if method == "POST" else None)
            assert status == 401 and "has no keys yet" in body["error"]["message"], (method, path, body)
        assert srv.request("GET", "/v1/health/live")[0] == 200
        with pytest.raises(Conflict):  # keys existed: open mode is not reached by revoking, only chosen again
            plane.create_key([ALL]) and plane.set_open_mode(True)
    finally:
        srv.server.should_exit = True
        time.sleep(0.3)
        asyncio.set_event_loop(asyncio.new_event_loop())




def test_a_status_filter_lists_exactly_the_entities_in_that_status(plane, monkeypatch):
    """`?status=` over jobs of known statuses (written by the test): each filter returns its own jobs, newest first,
    and a status nothing is in returns an empty page rather than everything."""
    from cluster.entities import CustomizationJob

    srv = _Server(plane, monkeypatch)
    try:
        plane.set_open_mode(True)
        srv.sync()
        for i, status in enumerate(["completed", "failed", "running", "completed"]):
            plane.ctx.save(CustomizationJob(name=f"cust-{i}", status=status, spec={}, output_model=f"m{i}",
                                            output_dir="/o", created_at=1000.0 + i, kind="sweep" if i == 1 else "training"))
        names = lambda query: [j["name"] for j in srv.request(  # noqa: E731
            "GET", f"/v2/workspaces/default/customization/jobs?{query}")[1]["data"]]
        assert names("status=completed") == ["cust-3", "cust-0"] and names("status=failed") == ["cust-1"]
        assert names("status=running") == ["cust-2"] and names("status=cancelled") == []
        # a job's kind (the console's sweeps page pages sweeps only, not the sweeps among a page of jobs)
        assert names("kind=sweep") == ["cust-1"] and names("kind=training") == ["cust-3", "cust-2", "cust-0"]
        assert names("kind=sweep&status=completed") == []
        page = srv.request("GET", "/v2/workspaces/default/customization/jobs?kind=sweep&page_size=1")[1]
        assert page["filter"] == {"kind": "sweep"} and page["pagination"]["total_results"] == 1
    finally:
        srv.stop()


def test_a_management_body_is_checked_at_the_ingress_before_the_actor_is_called(plane, monkeypatch):
    """A body its `*Create` model refuses answers 400 from the API ingress: the control plane never sees it; one it
    accepts reaches the actor marked checked, so the service does not check it again."""
    from cluster.services import base

    srv = _Server(plane, monkeypatch)
    seen, checks = [], []
    real_create, real_check = plane.create_dataset, base.check_body
    monkeypatch.setattr(plane, "create_dataset", lambda ws, body: seen.append(type(body).__name__) or real_create(ws, body))
    monkeypatch.setattr(base, "BODIES", {k: (m, w, n, (lambda b, s=s, k=k: checks.append(k) or (s and s(b))))
                                         for k, (m, w, n, s) in base.BODIES.items()})
    try:
        plane.set_open_mode(True)
        srv.sync()
        status, body, _ = srv.request("POST", "/v2/workspaces/default/datasets", body={"name": "docs", "descripton": "x"})
        assert status == 400 and "descripton: Extra inputs are not permitted" in body["error"]["message"]
        assert seen == [] and checks == ["create_dataset"]
        status, body, _ = srv.request("POST", "/v2/workspaces/default/datasets", body={"name": "docs", "description": "x"})
        assert status == 201 and body["description"] == "x"
        assert seen == ["Checked"] and checks == ["create_dataset"] * 2  # once at the ingress, not again in the service
        assert real_check("create_dataset", base.Checked({"name": "x"})) == {"name": "x"}
    finally:
        srv.stop()
