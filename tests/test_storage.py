"""The storage root across nodes: publish with a seal, materialize once per node (verified, never half), evict
least recently used; and the state store on a real PostgreSQL server, with the same checks as SQLite's."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from rayembed import cache, storage


def _artifact(folder: Path, size: int = 300_000) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(os.urandom(size))
    (folder / "tokenizer.json").write_text('{"t": 1}')
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(b"x" * 1000)
    return folder


def test_publish_to_s3_and_materialize_verified(s3_env, tmp_path):
    src = _artifact(tmp_path / "src")
    uri = "s3://rayembed-test/test-publish/onnx"
    assert storage.read_seal(uri) is None  # nothing yet: a reader takes no half folder
    seal = storage.publish(str(src), uri)
    assert set(seal["files"]) == {"model.onnx", "tokenizer.json", "sub/x.bin"} and seal["bytes"] == 300_000 + 8 + 1000
    assert storage.read_seal(uri)["sha256"] == seal["sha256"] == storage.publish(str(src), str(src))["sha256"]
    local = cache.materialize(uri, seal["sha256"], root=tmp_path / "cache")
    assert local == tmp_path / "cache" / seal["sha256"]
    assert (local / "model.onnx").read_bytes() == (src / "model.onnx").read_bytes()
    assert (local / "sub" / "x.bin").read_bytes() == b"x" * 1000
    with pytest.raises(storage.StorageError, match="not the registered"):
        cache.materialize(uri, "0" * 64, root=tmp_path / "cache")
    with pytest.raises(storage.StorageError, match="not a published artifact"):
        cache.materialize("s3://rayembed-test/never-published", root=tmp_path / "cache")


def test_a_truncated_download_is_never_loaded(s3_env, tmp_path):
    src = _artifact(tmp_path / "src")
    uri = "s3://rayembed-test/test-truncated/onnx"
    seal = storage.publish(str(src), uri)
    storage.write_bytes(storage.join(uri, "model.onnx"), (src / "model.onnx").read_bytes()[:1000])  # cut short
    root = tmp_path / "cache"
    with pytest.raises(storage.StorageError, match="model.onnx does not match its seal"):
        cache.materialize(uri, seal["sha256"], root=root)
    assert [p.name for p in root.iterdir() if p.is_dir()] == []  # no entry, no partial folder left behind
    storage.write_bytes(storage.join(uri, "model.onnx"), (src / "model.onnx").read_bytes())  # repaired
    assert (cache.materialize(uri, seal["sha256"], root=root) / "model.onnx").stat().st_size == 300_000


def _materialize(args):
    uri, sha, root = args
    said = []
    path = cache.materialize(uri, sha, root=Path(root), log=said.append)
    return str(path), len(said)


def test_eight_replicas_starting_at_once_download_once(s3_env, tmp_path):
    seal = storage.publish(str(_artifact(tmp_path / "src", size=8 * 2**20)), "s3://rayembed-test/test-eight/onnx")
    root = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        results = pool.map(_materialize, [("s3://rayembed-test/test-eight/onnx", seal["sha256"], str(root))] * 8)
    assert {p for p, _ in results} == {str(root / seal["sha256"])}
    assert sum(n for _, n in results) == 1  # one process downloaded; seven found it there


def test_eviction_takes_the_least_recently_used_artifact_that_no_process_holds(s3_env, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    seals = [storage.publish(str(_artifact(tmp_path / f"a{i}", size=2**20)), f"s3://rayembed-test/test-evict/a{i}")
             for i in range(3)]
    digests = [s["sha256"] for s in seals]
    cache.materialize("s3://rayembed-test/test-evict/a0", root=root)
    cache.release(digests[0])  # a0's replica stopped
    cache.materialize("s3://rayembed-test/test-evict/a1", root=root)  # a1 stays loaded in this process
    os.utime(root / digests[1], (1, 1))  # a1 is the least recently used, a0 the next
    os.utime(root / digests[0], (2, 2))
    monkeypatch.setenv("RAYEMBED_CACHE_LIMIT_GB", str(2.5 / 1024))  # room for two of the three
    cache.materialize("s3://rayembed-test/test-evict/a2", root=root)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(digests[1:])  # a1 held, so a0 went
    for d in digests[1:]:
        cache.release(d)
    assert cache.evict(root, 0) == [digests[1], digests[2]]  # nothing held: oldest first


def test_a_local_artifact_is_hashed_against_its_seal_before_it_is_used(tmp_path):
    """A local folder is not copied to the cache, so its files are hashed where they are: a changed graph, or a
    graph the seal does not list (model.int8.onnx left from an earlier artifact), is refused, never loaded."""
    folder = _artifact(tmp_path / "a")
    seal = storage.publish(str(folder), str(folder))
    assert cache.materialize(str(folder), seal["sha256"]) == folder
    (folder / "model.int8.onnx").write_bytes(b"an old graph")
    with pytest.raises(storage.StorageError, match="model.int8.onnx, which its seal does not list"):
        cache.materialize(str(folder), seal["sha256"])
    (folder / "model.int8.onnx").unlink()
    graph = bytearray((folder / "model.onnx").read_bytes())
    graph[1000] ^= 0xFF  # one flipped byte, same size
    (folder / "model.onnx").write_bytes(bytes(graph))
    with pytest.raises(storage.StorageError, match="model.onnx does not match its seal"):
        cache.materialize(str(folder), seal["sha256"])


def test_eviction_skips_an_entry_whose_lock_a_reader_holds(tmp_path):
    """`materialize` holds the digest's lock from its seal check to its hold: evict never removes it in between."""
    import fcntl

    root = tmp_path / "cache"
    (root / "d1").mkdir(parents=True)
    (root / "d1" / "f").write_bytes(b"x" * 100)
    fd = os.open(root / "d1.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a reader between its check and its hold

    def evict_in_another_process(q):
        q.put(cache.evict(root, 0))

    q = multiprocessing.get_context("fork").Queue()
    p = multiprocessing.get_context("fork").Process(target=evict_in_another_process, args=(q,))
    p.start(), p.join(30)
    assert q.get(timeout=5) == [] and (root / "d1" / "f").is_file()
    os.close(fd)
    assert cache.evict(root, 0) == ["d1"] and not (root / "d1").exists()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    url = request.getfixturevalue("postgres_url")
    import sqlalchemy as sa

    with sa.create_engine(url).begin() as conn:  # each test starts from an empty database
        conn.execute(sa.text("DROP TABLE IF EXISTS objects, history, meta"))
    return url


def test_the_same_store_checks_pass_on_sqlite_and_postgresql(store_url):
    from cluster.store import SCHEMA_VERSION, StoreError, open_store

    store = open_store(store_url)
    assert store.schema_version() == SCHEMA_VERSION
    store.put("model", "default", "a", {"name": "a", "n": 1})
    store.put("model", "default", "a", {"name": "a", "n": 2})  # replaced, not duplicated
    store.put("model", "other", "b", {"name": "b", "text": "ünïcode ✓"})
    store.add_version("deployment_config", "default", "c", 1, {"v": 1})
    store.add_version("deployment_config", "default", "c", 2, {"v": 2})
    store.close()
    store = open_store(store_url)  # reopened (a restarted actor on another node): everything is there
    assert store.get("model", "default", "a") == {"name": "a", "n": 2}
    assert store.get("model", "other", "b")["text"] == "ünïcode ✓"
    assert [m["name"] for m in store.list("model", "default")] == ["a"] and len(store.list("model")) == 2
    assert [v["v"] for v in store.versions("deployment_config", "default", "c")] == [1, 2]
    assert store.delete("model", "default", "a") and not store.delete("model", "default", "a")
    assert store.get("model", "default", "a") is None
    # compare-and-set: a create loses to an existing row, an update to one changed since it was read
    assert store.put("job", "default", "j", {"name": "j", "updated_at": 10.5}, expect=None)
    assert not store.put("job", "default", "j", {"name": "j", "updated_at": 11.0, "who": "second"}, expect=None)
    assert store.put("job", "default", "j", {"name": "j", "updated_at": 11.0, "who": "a"}, expect=10.5)
    assert not store.put("job", "default", "j", {"name": "j", "updated_at": 12.0, "who": "b"}, expect=10.5)  # b read 10.5
    assert store.get("job", "default", "j")["who"] == "a"
    assert not store.delete("job", "default", "j", expect=10.5) and store.delete("job", "default", "j", expect=11.0)
    assert not store.put("job", "default", "j", {"name": "j", "updated_at": 13.0}, expect=11.0)  # gone: no update
    store.close()
    if store_url.startswith("postgresql"):
        import sqlalchemy as sa

        with sa.create_engine(store_url).begin() as conn:
            conn.execute(sa.text("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
        with pytest.raises(StoreError, match="schema version 99, newer than this rayembed's"):
            open_store(store_url)


def test_postgresql_going_away_is_a_clear_503_and_nothing_is_lost():
    """A write while the server is down answers 503 naming the database, its password hidden."""
    from cluster.store import StoreWriteError, open_store
    from rayembed.errors import status_of
    from bench.services import postgres_server

    with postgres_server() as (url, stop):
        store = open_store(url)
        store.put("workspace", "", "keep", {"name": "keep"})
        stop()
        with pytest.raises(StoreWriteError, match="cannot write to its database postgresql") as err:
            store.put("workspace", "", "lost", {"name": "lost"})
        password = url.split(":")[2].split("@")[0]
        assert status_of(err.value)[:2] == (503, "service_unavailable_error")
        assert password not in err.value.message and "postgres:***@" in err.value.message
