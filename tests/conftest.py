"""Shared fixtures: one local Ray per session, tiny offline checkpoints built once, real sample data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# With `-n 2`, two workers share the cores: an OpenMP thread that waits for work sleeps instead of spinning, or
# torch in one worker's processes burns the CPU the other worker's processes need. Set before torch loads; every
# process the tests start (Ray clusters, jobs, servers) inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray Train starts a PreemptionWatcher actor (its own process, ~2 s of CPU to start) with every run, to act on
# the drain notices a cloud autoscaler sends before it takes a spot node away. No test sends one (test_multinode
# kills its node outright), and the suite starts ~25 runs.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Each node's log monitor globs its logs folder for new worker files every 0.1 s while it holds fewer than 1,000;
# a session's clusters leave hundreds. At 0 it looks every 0.5 s (a new worker's first lines reach a driver up
# to 0.4 s later): 0.7 instead of 1.6 CPU-seconds a minute per node, measured with 70 worker files.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")


def _worker_ports() -> dict[str, str]:
    """Each xdist worker's clusters get ports of their own. Serve hands replica ports out of 30000-31000 lowest
    first, per cluster: a port freed by a replica killed in one worker's cluster went to a replica of the other's,
    and the first cluster's HAProxy, not yet told, sent the request there (a 404 from the wrong control plane).
    free_port()'s range is split too, so two workers never hand out one port before either binds it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return {}
    i, n = int(worker[2:]), max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    part = lambda lo, hi: (lo + (hi - lo) * i // n, lo + (hi - lo) * (i + 1) // n)
    (p0, p1), (h0, h1), (g0, g1) = part(20000, 30000), part(30000, 31000), part(40000, 41000)
    return {"RAYEMBED_PORT_RANGE": f"{p0}-{p1}",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(h0), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(h1 - 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(g0), "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(g1 - 1)}


os.environ.update(_worker_ports())  # before any cluster starts: Serve's controller reads them when it starts

from bench.builders import build_tiny_bert, build_tiny_nemotron  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "debian-pkgdesc-sample"


# `python -m pytest -n 2` runs the suite on two pytest-xdist workers. The tests of a module that share
# a module-scoped cluster (TOGETHER) go to one worker, in their order; every other test goes on its own to whichever
# worker is free. (xdist's own `--dist loadgroup` does this by renaming items, which pytest 9 no longer allows.)
# Work starts longest first, so that no long test is left to run alone at the end: SLOW_S holds the seconds each
# slow test (or grouped module) took on the 2-core VM beside the other worker. Only the order depends on them.
TOGETHER = ("tests/test_multinode.py", "tests/test_platform.py", "tests/test_serve.py", "tests/test_kuberay.py",
            "tests/test_console.py")
SLOW_S = {
    "tests/test_platform.py": 693, "tests/test_job.py::test_the_readme_minilm_job": 349, "tests/test_multinode.py": 320,
    "tests/test_serve.py": 292, "tests/test_console.py": 215, "tests/test_kuberay.py": 120,
    "tests/test_tune.py::test_absurd": 115,
    "tests/test_install.py::test_serving_install": 130, "tests/test_bench.py::test_soak": 64,
    "tests/test_job.py::test_full_sft": 62, "tests/test_serve_cli.py": 30, "tests/test_job.py::test_killed_worker": 75,
    "tests/test_job.py::test_job_console": 49, "tests/test_batch.py::test_corpus_embedding_matches": 35,
    "tests/test_export.py::test_int8_graph_passes": 34, "tests/test_job.py::test_a_fast_loop": 33,
    "tests/test_batch.py::test_corpus_embedding_on_a_two_node": 33, "tests/test_batch.py::test_mining": 32,
    "tests/test_batch.py::test_job_mines": 25,
    "tests/test_install.py::test_the_built": 17,
    "tests/test_verification.py::test_a_corrupted": 60, "tests/test_verification.py::test_default_dimensions": 25,
    "tests/test_job.py::test_a_job_at_learning_rate_0": 25,
}


def unit(nodeid: str) -> str:
    """What one worker runs as a whole: a TOGETHER module, or one test."""
    module = nodeid.split("::")[0]
    return module if module in TOGETHER else nodeid


def pytest_configure(config):
    """Once, before any xdist worker starts: Ray's token for `ray start` clusters (~/.ray/auth_token). Every cluster on
    this machine uses it; two workers generating it at once could each start a cluster with a token the other then
    overwrites."""
    if not hasattr(config, "workerinput") and not (Path.home() / ".ray" / "auth_token").is_file():
        import subprocess
        import sys

        subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"], capture_output=True,
                       timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")})


def pytest_collection_modifyitems(config, items):
    seconds = lambda item: max((s for prefix, s in SLOW_S.items() if unit(item.nodeid).startswith(prefix)), default=0)
    items.sort(key=seconds, reverse=True)  # a stable sort: a module's tests keep their order


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid)

    config.option.loadscopereorder = False  # xdist would order the units by test count, not by SLOW_S
    return ByUnit(config, log)


def sample_lines(n: int) -> list[dict]:
    with (SAMPLE / "train.jsonl").open() as fh:
        return [json.loads(next(fh)) for _ in range(n)]


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return [t for ex in sample_lines(200) for t in (ex["query"], ex["pos_doc"], *ex["neg_doc"])]


@pytest.fixture(scope="session")
def tiny_nemotron(tmp_path_factory, corpus) -> Path:
    return build_tiny_nemotron(tmp_path_factory.mktemp("tiny-nemotron"), corpus=corpus)


@pytest.fixture(scope="session")
def tiny_nemotron_onnx(tmp_path_factory, tiny_nemotron) -> Path:
    """tiny_nemotron exported once per worker (max_seq_length 64, Matryoshka 16 and 32): the export tests check it,
    test_serve serves it. Only for tests that never change it in place."""
    from train.export import export_onnx

    out = tmp_path_factory.mktemp("tiny-nemotron-onnx") / "onnx"
    export_onnx(tiny_nemotron, out, max_seq_length=64, matryoshka_dims=[16, 32])
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, corpus) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), corpus=corpus)


@pytest.fixture
def train_file(tmp_path) -> Path:
    """64 real examples (Debian synopsis -> description, 3 hard negatives each)."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in sample_lines(64)))
    return path


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from rayembed.runtime import SERVE_START_ENV

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, test-only local instance
    for key, value in SERVE_START_ENV.items():  # Serve's processes read them when they start
        os.environ.setdefault(key, value)
    # "local": always a new instance, never a `ray start` cluster that another test (or xdist worker) runs meanwhile
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once per run (shared by the xdist workers) as a node image builds it
    (`pip wheel --no-deps`)."""
    import subprocess
    import sys

    def build(dist: Path) -> None:
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(dist)],
                               capture_output=True, text=True, timeout=600)
        assert built.returncode == 0, built.stderr[-3000:]

    return next(shared_folder(tmp_path_factory, "dist", build).glob("rayembed-*.whl"))


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A real PostgreSQL server for the session (bench/services.py)."""
    from bench.services import postgres_server

    with postgres_server() as (url, _):
        yield url


@pytest.fixture(scope="session")
def s3_env() -> dict:
    """An S3 endpoint on loopback (moto) with the bucket `rayembed-test`; its settings are in os.environ meanwhile."""
    from bench.services import s3_server

    with s3_server() as env:
        yield env


def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """A folder built once per test run, for every xdist worker: the first to ask builds it (`build(folder)`)
    while the others wait on a lock, then all read it. Only for artifacts tests never change in place."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest-N/, common to this run's workers
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that died half-way
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory):
    """The packaged all-MiniLM-L6-v2 exported once per run (shared by the xdist workers) by the export CLI, as a
    person runs it: (the finished process, the artifact folder). tests/test_export.py checks the CLI on it; others
    serve it."""
    import subprocess
    import sys

    def export(folder: Path) -> None:
        proc = subprocess.run([sys.executable, "-m", "train.export", "--model", "all-MiniLM-L6-v2", "--output",
                               str(folder / "onnx")], cwd=ROOT, capture_output=True, text=True, timeout=600)
        (folder / "process.json").write_text(json.dumps({"args": proc.args, "returncode": proc.returncode,
                                                         "stdout": proc.stdout, "stderr": proc.stderr}))

    folder = shared_folder(tmp_path_factory, "minilm-export", export)
    proc = subprocess.CompletedProcess(**json.loads((folder / "process.json").read_text()))
    return proc, folder / "onnx"


@pytest.fixture(scope="session")
def minilm_onnx(minilm_export) -> Path:
    """The packaged all-MiniLM-L6-v2 exported by our exporter (what `python -m serve` serves)."""
    proc, out = minilm_export
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def haproxy_configs() -> dict[int, str]:
    """pid -> config text of every running HAProxy that Serve started."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"haproxy") and b"-f" in argv:
                found[int(proc.name)] = Path(argv[argv.index(b"-f") + 1].decode()).read_text()
        except OSError:  # it exited (or its config went) while we looked
            continue
    return found


def listener_pids(port: int) -> set[int]:
    """Pids of the processes holding a socket that listens on TCP `port` (IPv4 or IPv6), read from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids
