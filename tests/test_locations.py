"""The one location parser (rayembed/locations.py) and the grants built on it (cluster/tenancy.py): a table of
known tricks, and property tests that no location the parser accepts under a root resolves outside it."""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from cluster.tenancy import Confinement, check_data_roots, data_roots
from rayembed.errors import InvalidRequest
from rayembed.locations import LocationError, parse


@pytest.mark.parametrize("value, reason", [
    ("s3://bucket/shared/%2e%2e/other/t.jsonl", "percent escape"),
    ("s3://bucket/shared/%252e%252e/other", "percent escape"),  # double encoding
    ("file:///data/%2fetc/passwd", "percent escape"),
    ("s3://bucket/shared/t.jsonl?endpoint_override=evil.example:9000&scheme=http", "query string"),
    ("s3://bucket/shared/t.jsonl#frag", "fragment"),
    ("s3://KEY:SECRET@bucket/shared/t.jsonl", "credentials"),
    ("s3://bucket/shared/../other/t.jsonl", "'..'"),
    ("s3://bucket/./shared", "'.'"),
    ("/data/../etc/passwd", "'..'"),
    ("/data\\..\\etc", "backslash"),
    ("~/x", "'~'"),
    ("/data/~root/x", "'~'"),
    ("C:\\data\\x", "backslash"),
    ("C:/data/x", "neither an absolute path nor a URI"),
    ("/data/x\x00y", "control character"),
    ("/data/x\ny", "control character"),
    ("http://example.com/x", "scheme http://"),
    ("s3://Bad_Bucket!/x", "not a bucket name"),
    ("file://relative/x", "absolute path"),
    ("", "empty"),
])
def test_known_tricks_are_refused_with_the_reason(value, reason):
    with pytest.raises(LocationError, match=reason):
        parse(value, "config.dataset.training")


def test_accepted_locations_are_normalised(tmp_path):
    assert str(parse("s3://bucket//shared/t.jsonl")) == "s3://bucket/shared/t.jsonl"
    assert parse("S3://bucket/a").scheme == "s3"
    assert parse(f"file://{tmp_path}/a").within(parse(str(tmp_path)))  # file:// and a path are the same place
    (tmp_path / "real").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link").symlink_to(tmp_path / "real")
    assert parse(str(tmp_path / "data" / "link" / "x")) == parse(str(tmp_path / "real" / "x"))  # symlinks followed


def test_grants_compare_path_parts_not_strings(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir(), outside.mkdir()
    (data / "escape").symlink_to(outside)
    c = Confinement([str(data), "s3://bucket/shared"])
    for ok in (str(data / "train.jsonl"), str(data), "s3://bucket/shared/t.jsonl", f"file://{data}/t.jsonl"):
        c.read(ok, "f")
    for bad in ("/etc/passwd", str(data / "escape" / "x"), str(tmp_path / "data2"), "s3://bucket/other/t.jsonl",
                "s3://bucket/shared-not/t.jsonl", "s3://bucket/shared/%2e%2e/other/t.jsonl", "s3://bucket2/shared/t",
                "gs://bucket/shared/t.jsonl", "s3://bucket/shared/t?endpoint_override=evil:1"):
        with pytest.raises(InvalidRequest) as err:
            c.read(bad, "config.dataset.training")
        assert err.value.param == "config.dataset.training"
        assert "dataset: {name: ...}" in err.value.message
    with pytest.raises(InvalidRequest, match="grants: none"):
        Confinement([]).read(str(data / "t.jsonl"), "f")


def test_data_roots_default_to_none_and_may_not_hold_the_platforms_files(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYEMBED_DATA_ROOTS", raising=False)
    assert data_roots([]) == []  # no "the folder `up` ran in" any more
    monkeypatch.setenv("RAYEMBED_DATA_ROOTS", f"{tmp_path / 'data'}{os.pathsep}s3://b/p")
    assert data_roots([]) == [str(tmp_path / "data"), "s3://b/p"]
    home, store = tmp_path / "home" / ".rayembed", tmp_path / "store"
    check_data_roots([str(tmp_path / "data")], str(store), str(home))  # beside them: fine
    for root, what in [(str(tmp_path / "home"), "RAYEMBED_HOME"), (str(home / "workspaces"), "RAYEMBED_HOME"),
                       (str(store), "the storage root"), (str(tmp_path), "the storage root")]:
        with pytest.raises(ValueError, match=what):
            check_data_roots([root], str(store), str(home))
    with pytest.raises(ValueError, match="holds the home folder"):
        check_data_roots([str(Path.home().parent)], "s3://b/store", "s3://b/home")
    with pytest.raises(ValueError, match="credentials"):
        data_roots(["s3://AKIA:secret@bucket/data"])


PART = st.text(alphabet=string.ascii_letters + string.digits + "._-~%?#@:\\ ", min_size=1, max_size=8)
TRICKS = st.sampled_from(["..", ".", "%2e%2e", "%2E%2E", "%252e", "~", "..\\..", "a?b=c", "#x", "@", "%2f", ""])


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.one_of(PART, TRICKS), min_size=1, max_size=6))
def test_no_accepted_uri_leaves_its_root(parts):
    """Whatever parts follow the root, an accepted URI's parts start with the root's, and its text holds no part
    that storage could decode or resolve into another place."""
    value = "s3://bucket/shared/" + "/".join(parts)
    try:
        loc = parse(value)
    except LocationError:
        return
    root = parse("s3://bucket/shared")
    if loc.within(root):
        assert loc.parts[0] == "shared" and len(loc.parts) >= 1
        assert all(p not in ("..", ".") and "%" not in p and "?" not in p and "\\" not in p for p in loc.parts)
        assert str(loc).startswith("s3://bucket/shared")


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.one_of(PART, TRICKS), min_size=1, max_size=5))
def test_no_accepted_path_leaves_its_root(tmp_path_factory, parts):
    """A local path the parser accepts under a root resolves (symlinks and all) under that root."""
    root = tmp_path_factory.getbasetemp() / "prop-root"
    root.mkdir(exist_ok=True)
    value = str(root) + "/" + "/".join(parts)
    try:
        loc = parse(value)
    except LocationError:
        return
    if loc.within(parse(str(root))):
        assert Path(str(loc)).resolve().is_relative_to(root.resolve())


def test_up_refuses_a_secret_in_the_storage_uri_an_overlapping_root_and_open_mode_off_loopback(tmp_path):
    from cluster.local import check_settings
    from cluster.settings import Settings

    def settings(storage: str, host: str = "127.0.0.1") -> Settings:
        return Settings(home=tmp_path / "home", host=host, port=8080, state_url=None, storage=storage,
                        proxy_location="EveryNode", control_plane_resources={})

    check_settings(settings("s3://bucket/rayembed"), [str(tmp_path / "data")], open_=True)
    for s, roots, open_, message in [
            (settings("s3://AKIA:secret@bucket/rayembed"), [], False, "credentials"),
            (settings("s3://bucket/rayembed?endpoint_override=evil:1"), [], False, "query string"),
            (settings(str(tmp_path / "store")), [str(tmp_path)], False, "overlaps the storage root"),
            (settings("s3://bucket/rayembed", host="0.0.0.0"), [], True, "only on a loopback bind")]:
        with pytest.raises(ValueError, match=message):
            check_settings(s, roots, open_)


def test_an_install_from_before_ids_keeps_its_folders(tmp_path):
    """A workspace stored before ids (no uid) keeps workspaces/<name>, so its entities' URIs stay valid; a workspace
    made now gets workspaces/<name>-<id>."""
    from cluster import controlplane
    from cluster.store import open_store

    home = tmp_path / "home"
    home.mkdir()
    open_store(str(home / "state.db")).put("workspace", "", "default", {"name": "default", "description": "",
                                                                        "created_at": 1.0, "updated_at": 1.0})
    cp = controlplane.ControlPlane(str(home), "http://127.0.0.1:9", "http://127.0.0.1:9")
    try:
        assert cp.ctx.workspace_root("default") == str(home / "workspaces" / "default")
        cp.create_workspace({"name": "team-a"})
        assert re.fullmatch(str(home / "workspaces") + r"/team-a-[0-9a-f]{12}", cp.ctx.workspace_root("team-a"))
    finally:
        cp._stop.set()


def test_the_allowed_base_models_split_like_the_data_roots(monkeypatch):
    from cluster.tenancy import allowed_base_models

    monkeypatch.setenv("RAYEMBED_BASE_MODELS", f"s3://b/models/tiny{os.pathsep}/opt/models/m{os.pathsep}org/name")
    assert allowed_base_models() == ["all-MiniLM-L6-v2", "s3://b/models/tiny", "/opt/models/m", "org/name"]
