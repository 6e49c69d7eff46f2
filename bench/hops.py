"""Where one unloaded request's time goes: the hops of `python -m serve`, one at a time.

    python -m bench.hops [--model-dir DIR] [--requests 400] [--rounds 2]

1. `ray_actor_call`: an async Ray actor awaiting another actor's async method (the transport under a handle call).
2. `serve_handle_call`: a Serve deployment awaiting another deployment's method through its handle, with the
   gateway's process settings (user code and router on the replica's own loop). This is what the gateway pays
   per call to a model replica, beyond the transport: Serve's router, its request protocol, its replica wrapper.
3. Against `python -m serve` on the artifact (the CLI's defaults on this machine), over one keep-alive HTTP
   connection, the same text each time:
   - `provider_models`: GET the provider route's /v1/models (HAProxy and the model's own HTTP server, no model work);
   - `provider_embed`: POST one text to the provider route (the model's own application);
   - `openai_embed`: POST the same to /v1/embeddings (the gateway, then one handle call to the model's replica);
   - `gateway_ready`: GET /v1/health/ready (the gateway and one trivial handle call per provider).

Every figure is the median of the last 80 % of `--requests` calls. Prints one JSON line per measure and round.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # `python bench/hops.py`: put the repository root (which holds `bench`) on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving import ROOT, ROUTES, ensure_artifact, start_server, stop_server

from rayembed.runtime import init_ray

TEXT = "a small command-line tool that converts images between formats and resizes them"


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples[len(samples) // 5:]) * 1000, 3)


def ray_rounds(requests: int, rounds: int) -> list[dict]:
    """Measures 1 and 2 in one local Ray (2 CPUs, no dashboard)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serve.gateway import GATEWAY_SERVE_ENV
    from serve.settings import REPLICA_SERVE_ENV

    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    async def timed(call, n: int) -> list[float]:
        """Seconds per awaited `call()`, one at a time (defined here so it travels with the actors by value)."""
        out = []
        for _ in range(n):
            t = time.perf_counter()
            await call()
            out.append(time.perf_counter() - t)
        return out

    @ray.remote(num_cpus=0)
    class Callee:
        async def ping(self, x=None):
            return x

    @ray.remote(num_cpus=0)
    class Caller:
        def __init__(self, callee):
            self.callee = callee

        async def run(self, n: int) -> list[float]:
            return await timed(self.callee.ping.remote, n)

    @serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": dict(REPLICA_SERVE_ENV)}})
    class Replica:
        async def ping(self, x=None):
            return x

    @serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": dict(GATEWAY_SERVE_ENV)}})
    class Front:
        def __init__(self, replica):
            self.replica = replica

        async def run(self, n: int) -> list[float]:
            return await timed(self.replica.ping.remote, n)

    rows = []
    try:
        caller = Caller.remote(Callee.remote())
        front = serve.run(Front.bind(Replica.bind()), name="bench-hops", route_prefix=None)
        for r in range(rounds):
            rows.append({"what": "ray_actor_call", "round": r + 1, "p50_ms": median_ms(ray.get(caller.run.remote(requests)))})
            rows.append({"what": "serve_handle_call", "round": r + 1, "p50_ms": median_ms(front.run.remote(requests).result())})
            for row in rows[-2:]:
                print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def http_median(port: int, method: str, path: str, body: bytes | None, requests: int) -> tuple[float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"} if body else {}
    samples, status = [], 0
    for _ in range(requests):
        t = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        samples.append(time.perf_counter() - t)
        status = resp.status
    conn.close()
    return median_ms(samples), status


def http_rounds(model_dir: Path, port: int, requests: int, rounds: int, log: Path) -> list[dict]:
    provider = {"num_cpus": float(len(os.sched_getaffinity(0)))}  # python -m serve --model-dir's default here
    body = json.dumps({"model": "bench", "input": [TEXT]}).encode()
    prefix = ROUTES["provider"].removesuffix("/v1/embeddings")
    measures = [("provider_models", "GET", prefix + "/v1/models", None),
                ("provider_embed", "POST", ROUTES["provider"], body),
                ("openai_embed", "POST", ROUTES["openai"], body),
                ("gateway_ready", "GET", "/v1/health/ready", None)]
    rows = []
    proc = start_server(model_dir, port, provider, log)
    try:
        for r in range(rounds):
            for what, method, path, data in measures:
                p50, status = http_median(port, method, path, data, requests)
                if status != 200:
                    raise RuntimeError(f"{method} {path} answered {status}; see {log}")
                rows.append({"what": what, "round": r + 1, "p50_ms": p50})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_server(proc)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-serve")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8182)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_artifact(args.model_dir, args.work)
    rows = ray_rounds(args.requests, args.rounds)
    rows += http_rounds(model_dir, args.port, args.requests, args.rounds, args.work / "hops-server.log")
    by = {}
    for row in rows:
        by.setdefault(row["what"], []).append(row["p50_ms"])
    print(json.dumps({"what": "hops_median", **{k: round(statistics.median(v), 3) for k, v in by.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
