"""`rayembed up` / `down`: start (or join) a Ray cluster, the ControlPlane actor and the API ingress;
stop only what `up` started. A local head binds to 127.0.0.1 and is recorded in <home>/cluster.json."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster import tenancy
from rayembed.locations import LocationError, parse
from rayembed.polling import poll
from rayembed.runtime import free_port, init_ray, loopback, reachable, serve_ingress_env, wait_http
from cluster.settings import API_APP, CONTROL_PLANE, NAMESPACE, UPLOAD_APP, Settings

RECORD = "cluster.json"


def read_record(s: Settings) -> dict | None:
    path = s.home / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _temp_dir(s: Settings) -> Path:
    # short: Ray's socket paths have a length limit; unique per RAYEMBED_HOME
    return Path("/tmp") / f"rayembed-{hashlib.sha1(str(s.home).encode()).hexdigest()[:10]}"


def _gcs_address(temp_dir: Path, port: int) -> str:
    """The address `ray start` wrote for this head (its node IP), else the loopback."""
    written = temp_dir / "ray_current_cluster"
    if written.is_file() and written.read_text().strip():
        return written.read_text().split()[0]
    return f"127.0.0.1:{port}"


def start_head(s: Settings, num_cpus: int | None, num_gpus: int | None, ingress: str = "haproxy") -> dict:
    """`ray start --head` with every port chosen free, recorded in <home>/cluster.json. The dashboard listens
    on 127.0.0.1. Ray 2.60 binds its gRPC servers (GCS, raylet, workers) on every interface and turns a
    127.0.0.1 node address into the machine's own, so token auth (on by default here) is what guards them."""
    temp_dir, gcs, dash = _temp_dir(s), free_port(), free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--temp-dir", str(temp_dir), "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--ray-client-server-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port())]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    auth = os.environ.get("RAY_AUTH_MODE", "token")  # Ray 2.60's default for `ray start` clusters
    if auth == "token":  # the token lives in ~/.ray/auth_token; every client on this machine reads it
        subprocess.run([cmd[0], "get-auth-token", "--generate"], capture_output=True, text=True, timeout=120)
    os.environ.update(serve_ingress_env(ingress))  # Serve reads them once: the head's processes and this one
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"`ray start --head` failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    record = {"gcs_address": _gcs_address(temp_dir, gcs), "dashboard_url": f"http://127.0.0.1:{dash}",
              "temp_dir": str(temp_dir), "started_by_up": True, "started_at": time.time(), "auth_mode": auth,
              "ingress": ingress}
    s.home.mkdir(parents=True, exist_ok=True)
    (s.home / RECORD).write_text(json.dumps(record, indent=2))
    return record


def auth_env(s: Settings) -> None:
    """RAY_AUTH_MODE for this process, from the head's record; Ray reads it once, so before `import ray`. Joining
    RAY_ADDRESS: token auth when this machine has a token (a cluster without auth accepts such a client too),
    else as set."""
    if os.environ.get("RAY_ADDRESS"):
        token = (os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or
                                                          Path.home() / ".ray" / "auth_token").expanduser().is_file())
        if token and "ray" not in sys.modules:
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        return
    if "ray" in sys.modules and "RAY_AUTH_MODE" not in os.environ:
        raise RuntimeError("internal: Ray was imported before its auth mode was set")
    record = read_record(s)
    os.environ.setdefault("RAY_AUTH_MODE", (record or {}).get("auth_mode") or "token")


def connect(s: Settings, start: bool = False, num_cpus: int | None = None, num_gpus: int | None = None,
            ingress: str = "haproxy") -> dict:
    """ray.init against RAY_ADDRESS, else the head `up` recorded (started when `start` and none answers)."""
    auth_env(s)
    address = os.environ.get("RAY_ADDRESS")
    if address and start:
        wait_for_head(address)
    if address:
        record = {"gcs_address": address, "dashboard_url": os.environ.get("RAY_DASHBOARD_URL") or _dashboard_of(address),
                  "started_by_up": False}
    else:
        record = read_record(s)
        if record is None or not reachable(record["gcs_address"]):
            if not start:
                raise RuntimeError(f"no rayembed cluster is running for RAYEMBED_HOME={s.home}: run `rayembed up`")
            record = start_head(s, num_cpus, num_gpus, ingress)
    init_ray(record["gcs_address"], namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
    return record


def wait_for_head(address: str, log=print) -> None:
    """`up` joining a head that is still starting (a KubeRay head's container runs `ray start` and `rayembed up` side
    by side): wait for its GCS port to accept connections, up to RAYEMBED_JOIN_TIMEOUT_S (default 300 s)."""
    if "://" in address or ":" not in address:  # ray://, http://, auto: Ray resolves (and waits for) those itself
        return
    timeout_s = float(os.environ.get("RAYEMBED_JOIN_TIMEOUT_S") or 300)
    if reachable(address):
        return
    log(f"ray: waiting for the head at {address} (up to {timeout_s:.0f} s)")
    try:
        poll(lambda: reachable(address) or None, timeout_s=timeout_s, what=f"RAY_ADDRESS={address} did not accept connections")
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}: is the Ray head running there (`ray start --head`)? RAYEMBED_JOIN_TIMEOUT_S "
                           "waits longer") from None


def _dashboard_of(address: str) -> str:
    if address.startswith("http"):
        return address
    import ray

    init_ray(address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
    return "http://" + ray.worker.get_dashboard_url()


def check_settings(s: Settings, roots: list[str], open_: bool) -> None:
    """What `up` refuses before it starts anything (ValueError, saying what to change): a storage root the location
    parser refuses (credentials in it, a query string, an escape), a data root overlapping the storage root or
    RAYEMBED_HOME, open mode on a bind other than loopback."""
    try:
        parse(s.storage, "RAYEMBED_STORAGE")
    except LocationError as exc:
        raise ValueError(str(exc)) from None
    tenancy.check_data_roots(roots, s.storage, str(s.home))
    if open_ and not loopback(s.host):
        raise ValueError(f"--open serves the API without keys, so only on a loopback bind; RAYEMBED_HOST is {s.host}: "
                         "create a key (`rayembed keys create`) instead")


def up(s: Settings, num_cpus: int | None = None, num_gpus: int | None = None, log=print,
       ingress: str = "haproxy", data_roots: list[str] | None = None, open_: bool = False) -> dict:
    """Idempotent: a running cluster, control plane and API are reused. `ingress` applies to a head this
    starts (see rayembed.runtime.serve_ingress_env); a running cluster keeps the one it has. `data_roots`: where
    every workspace's jobs may read (cluster.tenancy; default: RAYEMBED_DATA_ROOTS, else none). `open_`: open mode
    (no keys; loopback only)."""
    roots = tenancy.data_roots(data_roots or [])
    check_settings(s, roots, open_)
    auth_env(s)
    import ray

    record = connect(s, start=True, num_cpus=num_cpus, num_gpus=num_gpus, ingress=ingress)
    from ray import serve  # after the head started: Serve reads its settings from the environment once

    from cluster.api import build_api_app
    from cluster.controlplane import ControlPlane
    from cluster.ray_jobs import driver_reservation

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one line per step below is what a person reads
    log(f"ray: {record['gcs_address']} (dashboard {record['dashboard_url']}; Serve ingress: "
        f"{record.get('ingress', 'as the cluster was started')})")
    serve.start(proxy_location=s.proxy_location, http_options={"host": s.host, "port": s.port},
                logging_config={"enable_access_log": False})
    actor = ray.remote(ControlPlane).options(
        name=CONTROL_PLANE, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1,
        max_concurrency=32, num_cpus=0, resources=s.control_plane_resources or None).remote(str(s.home), record["dashboard_url"], s.base_url, s.state_url,
                                               roots, s.storage, tenancy.allowed_base_models(), driver_reservation())
    info = ray.get(actor.ping.remote(), timeout=120)
    ray.get(actor.set_open_mode.remote(bool(open_ and not info["api_keys"])), timeout=60)
    log(f"control plane: state {info['state']} (schema v{info['schema_version']}); storage {info['storage']}; jobs "
        f"through the API read their workspace's datasets" + (f" and {', '.join(roots)}" if roots else "")
        + f"; base models: {', '.join(info['base_models'])}")
    if info["api_keys"]:
        log(f"api keys: {info['api_keys']}, every route but the health probes needs one")
    elif open_:
        log("api keys: none, open mode (--open, loopback only): every request is allowed until the first "
            "`rayembed keys create`")
    else:
        log("api keys: none yet, so the API answers 401 to everything: `rayembed keys create --for WORKSPACE` makes "
            "the first (or `rayembed up --open` on a loopback-only install)")
    from cluster.upload_ingress import PREFIX, build_upload_app

    serve.run(build_api_app(), name=API_APP, route_prefix="/")  # unchanged code: Serve keeps the running replica
    serve.run(build_upload_app(), name=UPLOAD_APP, route_prefix=PREFIX)  # uploads: never through the API's replica
    wait_http(s.base_url + "/v1/health/live")
    log(f"api: {s.base_url} (OpenAPI docs {s.base_url}/docs)")
    log(f"console: {s.base_url}/console")
    return record


def down(s: Settings, log=print) -> None:
    """Remove the API, the deployments' applications and the control plane (state stays on disk);
    stop the head only if `up` started it, by killing its own processes (never `ray stop`)."""
    auth_env(s)
    import ray
    from ray import serve

    record = read_record(s)
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if not joined and (record is None or not reachable(record["gcs_address"])):
        log("nothing is running")
        _forget(s, record)
        return
    connect(s)
    try:  # first: a control plane still reconciling would redeploy the applications deleted below
        ray.kill(ray.get_actor(CONTROL_PLANE, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass
    ours = [n for n in serve.status().applications if n in (API_APP, UPLOAD_APP) or n.startswith("rayembed.")]
    if joined or not (record and record.get("started_by_up")):  # a shared cluster: take our applications down
        for name in ours:
            serve.delete(name, _blocking=False)
        try:  # replicas drain first (in parallel)
            poll(lambda: None if set(ours) & set(serve.status().applications) else True, timeout_s=180,
                 what="rayembed's Serve applications are still deleting")
        except TimeoutError as exc:
            log(f"{exc}; stopping anyway")
    ray.shutdown()
    if not joined and record and record.get("started_by_up"):
        kill_processes(Path(record["temp_dir"]), record["gcs_address"])
        log(f"stopped the local Ray head {record['gcs_address']}")
    _forget(s, record if not joined else None)
    log(f"down; state kept in {s.home}")


def _forget(s: Settings, record: dict | None) -> None:
    (s.home / RECORD).unlink(missing_ok=True)
    if record:
        port = record["gcs_address"].rpartition(":")[2]
        for f in (Path(record.get("temp_dir", "/nonexistent")) / "ray_current_cluster", Path("/tmp/ray/ray_current_cluster")):
            if f.is_file() and f":{port}" in f.read_text():
                f.unlink()


def kill_processes(temp_dir: Path, gcs_address: str | None = None) -> None:
    """SIGKILL the processes of one local head: those naming its temp dir or (given) its GCS address as their
    `--address`/`--gcs-address` (the Ray Client server names only that, and outlived `down`), the workers of its
    raylet, and their children."""
    def read(proc: Path, name: str) -> str:
        try:
            return (proc / name).read_bytes().replace(b"\0", b"\n").decode(errors="replace")
        except OSError:
            return ""

    def parent(proc: Path) -> str:
        stat = read(proc, "stat")
        return stat[stat.rfind(")") + 2:].split()[1] if ")" in stat else ""

    procs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]
    names = {str(temp_dir)} if gcs_address is None else {str(temp_dir), f"\n--address={gcs_address}\n",
                                                          f"\n--gcs-address={gcs_address}\n"}
    ours = {p.name for p in procs if any(name in "\n" + read(p, "cmdline") for name in names)}
    ours |= {p.name for p in procs if any(f"RAY_RAYLET_PID={pid}\n" in read(p, "environ") for pid in ours)}
    parents = {p.name: parent(p) for p in procs}
    while True:  # and their children: the raylet's dashboard and runtime-env agents name neither
        children = {pid for pid, ppid in parents.items() if ppid in ours} - ours
        if not children:
            break
        ours |= children
    for pid in ours:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
