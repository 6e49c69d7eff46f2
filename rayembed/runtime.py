"""Connecting to Ray: `init_ray`, the one function in the tree that calls `ray.init`."""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import socket
import urllib.request
from pathlib import Path

from rayembed.polling import poll

log = logging.getLogger(__name__)
ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # written by `ray start --head`


INGRESS = ("haproxy", "proxy")
# Serve's controller gives a new proxy actor 5 s (then 10, 15) to answer its readiness check and kills it
# after three misses, and `serve.start` then fails with ActorDiedError. A busy machine (a `rayembed up`
# right after `down`, with jobs' processes still exiting) can take longer than that just to start the
# actor's worker process; 30 s per check is what it needs and a healthy start never waits for it.
SERVE_START_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}


# Ports this process has handed out, so that two calls never return the same one before either is bound.
_HANDED_OUT: set[int] = set()
# Below the kernel's ephemeral range (Linux 32768-60999, macOS 49152-65535), above Ray's worker ports
# (10002-19999), under the 30000-31000 that Serve's HAProxy ingress replicas bind. RAYEMBED_PORT_RANGE="lo-hi"
# (hi excluded) narrows it: for a firewall, or to keep the clusters of two processes on one machine apart.
PORT_RANGE = (20000, 30000)


def port_range() -> tuple[int, int]:
    raw = os.environ.get("RAYEMBED_PORT_RANGE", "").strip()
    if not raw:
        return PORT_RANGE
    try:
        lo, hi = (int(x) for x in raw.split("-"))
    except ValueError:
        raise ValueError(f"RAYEMBED_PORT_RANGE={raw!r}: expected two ports as LO-HI, e.g. 20000-30000") from None
    if not 1024 <= lo < hi <= 65536:
        raise ValueError(f"RAYEMBED_PORT_RANGE={raw!r}: expected 1024 <= LO < HI <= 65536")
    return lo, hi


def free_port() -> int:
    """A TCP port that is free now and that the kernel will not pick for someone else's socket.

    `bind(0)` would answer from the ephemeral range, which is also where every outgoing connection gets
    its local port: with the port closed again until our server binds it, one of Ray's many connections
    can take it (CI saw Serve's proxy fail to bind such a port for as long as the connection lived).
    """
    lo, hi = port_range()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(lo, hi)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # fails if anyone holds the port on any address
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {lo}-{hi - 1} after 200 tries")


def serve_ingress_env(ingress: str) -> dict[str, str]:
    """Settings Serve reads once, when its processes start, for a Ray that this process starts.

    haproxy: Serve's HAProxy ingress instead of the Python proxy actor: one fewer Python hop per request
    (docs/benchmarks.md §5: 1.4-1.6x the texts/s at one text per request, 11-14 ms less p50). The ingress
    replica runs its own HTTP server on a port in 30000-31000, bound to all interfaces, and HAProxy's
    metrics and stats ports too (chosen free here): firewall them on shared hosts. HAProxy does not
    terminate TLS. proxy: Ray Serve's Python HTTP proxy.

    The head's fallback proxy (where HAProxy sends a request while no replica of its application is up) gets
    free ports too: Serve's defaults, 8500 and 9500, are bound with SO_REUSEPORT, so two clusters on one host
    shared them and the kernel handed such a request to either cluster's proxy (a 404 from the other control
    plane while our API replica restarted; docs/reliability.md).
    """
    if ingress not in INGRESS:
        raise ValueError(f"ingress must be one of {INGRESS}, not {ingress!r}")
    if ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", **SERVE_START_ENV}
    # A replica that goes away (a retired generation, `down`) drains at least this long: Serve's 30 s
    # default leaves time for an external load balancer to deregister it; HAProxy, updated by Serve's
    # controller within a second and retrying refused connections, needs a few seconds.
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()), "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
            **SERVE_START_ENV}


def reachable(address: str, timeout: float = 1.0) -> bool:
    """Whether host:port accepts a TCP connection."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def local_cluster_address() -> str | None:
    """The address of a running `ray start` cluster on this machine, or None (also for a stale file)."""
    if not ADDRESS_FILE.is_file():
        return None
    address = ADDRESS_FILE.read_text().split()[0] if ADDRESS_FILE.read_text().strip() else ""
    if address and reachable(address):
        return address
    log.warning("%s names %s, which does not answer (a head that died without `ray stop`); starting a fresh "
                "local Ray instead", ADDRESS_FILE, address or "nothing")
    return None


def wait_http(url: str, timeout_s: float = 300) -> None:
    """Poll a URL until it answers 200 (readiness of the gateway or the API)."""
    def answers() -> bool | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return True if resp.status == 200 else None
        except OSError:
            return None

    poll(answers, timeout_s=timeout_s, interval_s=0.5,
         what=f"{url} did not answer; see the Serve logs (ray dashboard, Serve tab)")


def init_ray(address: str | None = None, **options) -> None:
    """The tree's one `ray.init` (tests/test_structure.py checks it): join `address` ("local": start a Ray here;
    None: Ray's own default) with Ray's `options`, unless this process joined already."""
    import ray  # here, not at import: `rayembed up` sets RAY_AUTH_MODE before Ray is first imported

    if not ray.is_initialized():
        ray.init(address=address, **options)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS (as under `ray job submit`) or a running local `ray start` cluster, else start one.

    A fresh local Ray gets the dashboard on 127.0.0.1 so training progress is visible.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or local_cluster_address()
    if address:
        init_ray(address, log_to_driver=True)
    else:
        # One machine has no preemptible nodes for Ray Train to watch: no watcher process per training run (jobs
        # and Tune trials, which inherit this environment), and none of the ERROR line Ray logs about its restarts.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        init_ray("local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost): where open mode may serve."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
