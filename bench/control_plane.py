"""Control-plane benchmark against a running platform (`rayembed up` first):

    python -m bench.control_plane [--base-url URL] [--threads 8] [--requests 200]

Measures, for the packaged all-MiniLM-L6-v2: `deploy` -> READY, READY -> first 200 through the gateway's
model-entity route, management API latency (p50/p95 of GET models and GET deployments), and a
zero-downtime swap under constant load (requests failed while the deployment moves to another model
entity). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request

from cluster.client import ApiError, Client
from cluster.settings import settings


def _post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _ensure_models(c: Client) -> None:
    try:
        c.models.create("bench-minilm", base_model="all-MiniLM-L6-v2")
    except ApiError as exc:
        if exc.status != 409:
            raise
    a = c.models.wait_ready("bench-minilm")
    try:  # a second entity over the same artifact: what the swap moves to
        c.models.create("bench-minilm-b", artifact=a.artifact.uri)
    except ApiError as exc:
        if exc.status != 409:
            raise


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="management API calls per kind")
    args = parser.parse_args(argv)
    base = args.base_url or settings().base_url
    c = Client(base_url=base)
    _ensure_models(c)
    for name in ("bench-dep",):
        try:
            c.deployments.delete(name)
            c.deployments.wait_deleted(name)
        except ApiError:
            pass

    start = time.perf_counter()
    c.deployments.create("bench-dep", model="bench-minilm", num_cpus=1)
    while c.deployments.retrieve("bench-dep").status != "READY":
        time.sleep(0.05)
    ready_s = time.perf_counter() - start
    route = f"{base}/v2/workspaces/default/inference/gateway/model/bench-minilm/-/v1/embeddings"
    ready_at = time.perf_counter()
    while _post(route, {"input": ["hello"]}) != 200:
        time.sleep(0.02)
    routable_s = time.perf_counter() - ready_at

    latencies: dict[str, list[float]] = {"models": [], "deployments": []}
    for _ in range(args.requests):
        for kind, call in (("models", c.models.list), ("deployments", c.deployments.list)):
            t = time.perf_counter()
            call()
            latencies[kind].append((time.perf_counter() - t) * 1000)

    provider = f"{base}/v2/workspaces/default/inference/gateway/provider/bench-dep/-/v1/embeddings"
    counts = {"ok": 0, "failed": 0}
    stop = threading.Event()
    lock = threading.Lock()

    def load():
        while not stop.is_set():
            ok = _post(provider, {"input": ["a tool to compress files", "an image viewer"]}) == 200
            with lock:
                counts["ok" if ok else "failed"] += 1

    threads = [threading.Thread(target=load) for _ in range(args.threads)]
    for t in threads:
        t.start()
    time.sleep(3)
    swap_start = time.perf_counter()
    c.deployments.update("bench-dep", model="bench-minilm-b")
    c.deployments.wait_ready("bench-dep")
    swap_s = time.perf_counter() - swap_start
    time.sleep(8)  # past the old generation's retirement
    stop.set()
    for t in threads:
        t.join()
    c.deployments.delete("bench-dep")
    c.deployments.wait_deleted("bench-dep")

    def pct(xs: list[float], q: float) -> float:
        return round(statistics.quantiles(xs, n=100)[int(q) - 1], 2)

    result = {"deploy_to_ready_s": round(ready_s, 2), "ready_to_routable_s": round(routable_s, 3),
              "mgmt_list_models_ms_p50": pct(latencies["models"], 50), "mgmt_list_models_ms_p95": pct(latencies["models"], 95),
              "mgmt_list_deployments_ms_p50": pct(latencies["deployments"], 50),
              "swap_s": round(swap_s, 2), "swap_requests_ok": counts["ok"], "swap_requests_failed": counts["failed"],
              "load_threads": args.threads}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
