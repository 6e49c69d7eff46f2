"""Serving benchmark: our gateway over HTTP against the raw ONNX Runtime ceiling, in one run.

    python -m bench.serving [--model-dir DIR] [--duration 15] [--configs 1x1,32x1,32x16]

Exports all-MiniLM-L6-v2 with our exporter when no --model-dir is given, dumps loadgen's sentence
texts, measures the ceiling (a minimal tokenizers + ONNX Runtime loop over the artifact's graph) and the
replica's own code in process (rayembed.engine, best of threads x batch x order), starts
`python -m serve`, drives it with bench/loadgen.py (a copy of ../shared/bench/loadgen.py), measures
the ceiling again after the server is gone, and prints a table plus one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.py"
PY = sys.executable


def ensure_artifact(model_dir: Path | None, work: Path) -> Path:
    if model_dir:
        return model_dir
    out = work / "minilm-onnx"
    manifest = out / "manifest.json"
    optimized = json.loads(manifest.read_text()).get("optimized") if manifest.is_file() else None
    if optimized is not None and "by" not in optimized:  # null: no fuser passed the gate; exporting again won't help
        print(f"{out} was exported before onnxscript's fusions: exporting it again", flush=True)
        shutil.rmtree(out)
    if not manifest.is_file():
        subprocess.run([PY, "-m", "train.export", "--model", "all-MiniLM-L6-v2", "--output", str(out)], check=True, cwd=ROOT)
    return out


def ensure_texts(work: Path) -> Path:
    path = work / "texts_sentence_4096.jsonl"
    if not path.is_file():
        subprocess.run([PY, str(LOADGEN), "--dump-texts", str(path), "--pool", "4096"], check=True, capture_output=True)
    return path


def read_texts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r if isinstance(r, str) else r["text"] for r in rows]


def minimal_loop(model_dir: Path, texts: list[str], seconds: float, label: str = "minimal",
                 threads: int = 2) -> list[dict]:
    """The ceiling a user compares against: the artifact's graph and tokenizer driven directly (tokenizers
    `encode_batch`, numpy padding, `session.run`, `threads` intra-op threads, no spinning), one text at a time
    and in length-sorted batches of 32. None of the project's serving code runs here."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    graph = model_dir / ("model.opt.onnx" if (model_dir / "model.opt.onnx").is_file() else "model.onnx")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / manifest.get("tokenizer", "tokenizer.json")))
    tok.no_padding()
    tok.enable_truncation(manifest["max_seq_length"])
    pad_id = manifest.get("pad_id", 0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])

    def run(ids: list[list[int]]) -> None:
        width = max(map(len, ids))
        input_ids = np.full((len(ids), width), pad_id, np.int64)  # [b, S]
        mask = np.zeros((len(ids), width), np.int64)  # [b, S]
        for row, x in enumerate(ids):
            input_ids[row, :len(x)] = x
            mask[row, :len(x)] = 1
        session.run(["embeddings"], {"input_ids": input_ids, "attention_mask": mask})

    rows = []
    for batch in (1, 32):
        run([e.ids for e in tok.encode_batch(texts[:batch])])  # warm-up
        done, lat, i = 0, [], 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            window = texts[i:i + batch * 8]
            i = (i + len(window)) % max(1, len(texts) - batch * 8)  # full windows, even from a short list
            if batch == 1:  # one text: its tokenizing, padding and run
                for text in window:
                    t0 = time.perf_counter()
                    run([tok.encode(text).ids])
                    lat.append(time.perf_counter() - t0)
                done += len(window)
                continue
            ids = [e.ids for e in tok.encode_batch(window)]  # tokenized once, then sorted by length and cut
            ids.sort(key=len)
            for j in range(0, len(ids), batch):
                t0 = time.perf_counter()
                run(ids[j:j + batch])
                lat.append(time.perf_counter() - t0)
                done += len(ids[j:j + batch])
        rows.append({"what": label, "graph": graph.name, "threads": threads, "spin": False, "batch": batch,
                     "order": "sorted" if batch > 1 else "arrival",
                     "texts_per_s": round(done / (time.perf_counter() - start), 1),
                     "p50_ms": round(float(np.median(lat)) * 1000, 2), "mean_ms": round(float(np.mean(lat)) * 1000, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ceiling(model_dir: Path, texts: list[str], seconds: float, label: str = "replica_code",
            grid: tuple = ((1, False), (2, False), (2, True)), batches: tuple = (1, 8, 16, 32),
            precision: str = "auto", graph: str | None = None) -> list[dict]:
    """In-process tokenize + ONNX Runtime run, the same code the replica runs (serve.tokens, rayembed.engine),
    without any server: the best of a small grid. Compared with `minimal_loop`, it shows what the replica's
    own code costs before any Ray machinery is involved. `graph`: a graph file instead of `precision`'s."""
    from rayembed.artifact import read_manifest
    from rayembed.engine import OnnxEmbedder
    from serve.tokens import ServingTokenizer

    tok = ServingTokenizer(model_dir, read_manifest(model_dir))
    rows = []
    for threads, spin in grid:
        engine = OnnxEmbedder(model_dir, threads=threads, spin=spin, precision=precision, graph=graph)
        for batch in batches:
            for order in ("arrival", "sorted") if batch > 1 else ("arrival",):
                done, lat, i, tokenize_s = 0, [], 0, 0.0
                engine.run(*tok.pad(tok.encode(texts[:batch], None, "NONE")))  # warm the shapes' kernels
                start = time.perf_counter()
                while time.perf_counter() - start < seconds:
                    chunk = texts[i:i + (batch * 8 if order == "sorted" else batch)]
                    i = (i + len(chunk)) % max(1, len(texts) - batch * 8)  # full chunks, even from a short list
                    t0 = time.perf_counter()
                    ids = tok.encode(chunk, None, "NONE")
                    tokenize_s += time.perf_counter() - t0
                    if order == "sorted":  # what a server's length grouping reaches: sort a window, then cut
                        ids.sort(key=len)
                    for j in range(0, len(ids), batch):
                        t0 = time.perf_counter()
                        engine.run(*tok.pad(ids[j:j + batch]))
                        lat.append(time.perf_counter() - t0)
                        done += len(ids[j:j + batch])
                rows.append({"what": label, "graph": engine.path.name, "threads": threads, "spin": spin, "batch": batch, "order": order,
                             "texts_per_s": round(done / (time.perf_counter() - start), 1),
                             "p50_ms": round(float(np.median(lat)) * 1000, 2),
                             "mean_ms": round(float(np.mean(lat)) * 1000, 2),
                             # what tokenizing costs the replica: the lever "tokenize in the gateway" moves only this
                             "tokenize_share": round(tokenize_s / (time.perf_counter() - start), 4)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def compare_graphs(model_dir: Path, texts: list[str], seconds: float, rounds: int,
                   precisions: tuple[str, ...] = ("fp32", "optimized"), work: Path | None = None) -> int:
    """The artifact's graphs (provider `precision` values) with the same code, alternated; prints each one's
    texts/s and its ratio to the first. `transformers`: the plain graph through ONNX Runtime's transformer optimizer
    (LayerNorm and GELU fused, attention not; what model.opt.onnx was before onnxscript's fusions), built in `work`."""
    graphs = {p: None for p in precisions}
    if "transformers" in graphs:
        from train.export import transformer_fusions

        graphs["transformers"] = str((work or model_dir.parent) / "model.transformers.onnx")
        if not transformer_fusions(model_dir / "model.onnx", Path(graphs["transformers"])):
            raise SystemExit("ONNX Runtime's transformer optimizer fuses nothing in this graph")
    results: dict[tuple, list[float]] = {}
    for _ in range(rounds):
        for precision in precisions:
            for row in ceiling(model_dir, texts, seconds, "graph", grid=((2, False),), batches=(1, 32),
                               precision="auto" if graphs[precision] else precision, graph=graphs[precision]):
                results.setdefault((precision, row["batch"], row["order"]), []).append(row["texts_per_s"])
    for batch, order in ((1, "arrival"), (32, "arrival"), (32, "sorted")):
        rates = {p: float(np.mean(results[(p, batch, order)])) for p in precisions}
        print(json.dumps({"batch": batch, "order": order, **{f"{p}_texts_per_s": round(r, 1) for p, r in rates.items()},
                          **{f"{p}_over_{precisions[0]}": round(r / rates[precisions[0]], 3) for p, r in rates.items()
                             if p != precisions[0]}}))
    return 0


def compare_plans(model_dir: Path, texts: list[str], seconds: float, rounds: int,
                  batches: tuple[int, ...] = (8, 16, 24, 32)) -> int:
    """The replica's batch planner (rayembed.engine.plan_batches) on arrival-order batches, as its batcher hands
    them over: one length-sorted call per 32 texts (a call cost no padding outweighs) against the least-cost cut
    with the call cost the replica times at start. The replica's code (serve.tokens, rayembed.engine), 2 threads,
    alternated `rounds` times; prints texts/s, ONNX Runtime calls per batch and the ratio."""
    from rayembed.artifact import read_manifest
    from rayembed.engine import OnnxEmbedder, plan_batches
    from serve.tokens import ServingTokenizer

    engine = OnnxEmbedder(model_dir, threads=2)
    tok = ServingTokenizer(model_dir, read_manifest(model_dir))
    ids = tok.encode(texts, None, "NONE")
    shapes = []  # what one call costs by shape: t = fixed + per padded token x tokens
    for rows in (1, 2, 4, 8, 16, 32):
        for width in (8, 16, 32, 64):
            feed = np.ones((rows, width), np.int64)  # [rows, width]
            engine.run(feed, feed)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < 0.3:
                engine.run(feed, feed)
                n += 1
            shapes.append((rows * width, (time.perf_counter() - start) / n * 1000))
    fixed_ms, token_ms = np.linalg.lstsq(np.array([[1.0, t] for t, _ in shapes]), np.array([ms for _, ms in shapes]),
                                         rcond=None)[0]
    print(json.dumps({"call_cost_fit": {"fixed_ms": round(float(fixed_ms), 3), "per_token_ms": round(float(token_ms), 4),
                                        "fixed_in_tokens": round(float(fixed_ms / token_ms), 1),
                                        "shapes": "1-32 texts x 8-64 tokens"}}), flush=True)
    plans = {"one_call": 10**9, "least_cost": engine.call_tokens()}
    results: dict[tuple, list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for batch in batches:
            for name, call_tokens in plans.items():
                done, calls, i = 0, 0, 0
                start = time.perf_counter()
                while time.perf_counter() - start < seconds:
                    chunk = ids[i:i + batch]
                    i = (i + batch) % (len(ids) - batch)
                    for plan in plan_batches([len(x) for x in chunk], 32, 8192, call_tokens):
                        engine.run(*tok.pad([chunk[j] for j in plan]))
                        calls += 1
                    done += len(chunk)
                results.setdefault((batch, name), []).append((done / (time.perf_counter() - start), done / calls))
    for batch in batches:
        rate = {name: float(np.mean([r for r, _ in results[(batch, name)]])) for name in plans}
        print(json.dumps({"batch": batch, "call_tokens": plans["least_cost"],
                          **{f"{n}_texts_per_s": round(r, 1) for n, r in rate.items()},
                          **{f"{n}_texts_per_call": round(float(np.mean([c for _, c in results[(batch, n)]])), 1)
                             for n in plans},
                          "least_cost_over_one_call": round(rate["least_cost"] / rate["one_call"], 3)}), flush=True)
    return 0


def start_server(model_dir: Path, port: int, provider: dict, log: Path, gateway_replicas: int = 1,
                 gateway_env: dict | None = None) -> subprocess.Popen:
    """`python -m serve --config` with one model named "bench" and the given provider settings."""
    config = log.with_name("gateway.yaml")
    config.write_text(json.dumps({"gateway_replicas": gateway_replicas, "gateway_env": gateway_env or {}, "models": [{"name": "bench", "providers": [
        {"name": "bench", "model_dir": str(model_dir.resolve()), **provider}]}]}))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([PY, "-m", "serve", "--config", str(config), "--port", str(port), "--open"], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health/ready", timeout=5) as r:
                if r.status == 200:
                    time.sleep(3)  # the ingress takes the provider's own route up a moment after (until then: the gateway)
                    return proc
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"server not ready; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


ROUTES = {"openai": "/v1/embeddings",  # the gateway reads `model`, then forwards the body to the model's own app
          "provider": "/v2/workspaces/default/inference/gateway/provider/bench/-/v1/embeddings",  # the model's own app
          "model": "/v2/workspaces/default/inference/gateway/model/bench/-/v1/embeddings"}  # the gateway, a handle call


def load(port: int, texts: Path, c: int, b: int, duration: float, route: str = "openai") -> dict:
    out = subprocess.run([PY, str(LOADGEN), "--url", f"http://127.0.0.1:{port}{ROUTES[route]}", "--model", "bench",
                          "-c", str(c), "-b", str(b), "-d", str(duration), "--warmup", str(max(8, 2 * c)),
                          "--texts", str(texts), "-q"], capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    row = {"what": "gateway", "route": route, "concurrency": c, "batch": b, "texts_per_s": result["texts_per_s"],
           "p50_ms": result["latency_ms"]["p50"], "p99_ms": result["latency_ms"]["p99"],
           "errors": result["errors"], "client_cpu": result["client"]["cpu_util"]}
    print(json.dumps(row), flush=True)
    return row


def cycles(model_dir: Path, texts_path: Path, n: int, seconds: float, duration: float, configs: list[tuple[int, int]],
           route: str, provider: dict, port: int, log: Path, idle_s: float = 20.0) -> list[dict]:
    """The goals' ratios with the machine's drift taken out: `n` times in turn, the minimal loop alone (no Ray),
    then the server started and left idle `idle_s`, the same loop beside it, then each config through `route`,
    then the server stopped; once more the loop alone at the end. Each cycle's ceiling is the better of the loop
    runs alone just before and just after it (as in a full run). Prints one JSON line per cycle and the medians:
    served / alone (the goal), the loop beside the idle server / alone (what Ray's idle processes leave of the
    two cores), served / beside."""
    texts = read_texts(texts_path)

    def alone() -> dict:
        return {r["batch"]: r for r in minimal_loop(model_dir, texts, seconds)}

    before, out = alone(), []
    for i in range(n):
        proc = start_server(model_dir, port, provider, log)
        try:
            time.sleep(idle_s)
            beside = {r["batch"]: r for r in minimal_loop(model_dir, texts, seconds, "minimal_beside_idle_ray")}
            served = [load(port, texts_path, c, b, duration, route) for c, b in configs]
        finally:
            stop_server(proc)
        after = alone()
        best = max(before[32]["texts_per_s"], after[32]["texts_per_s"])
        one = min(before[1]["p50_ms"], after[1]["p50_ms"])
        row = {"what": "cycle", "cycle": i + 1, "route": route, "loop_texts_per_s": best, "loop_one_text_ms": one,
               "beside_over_alone": round(beside[32]["texts_per_s"] / best, 3)}
        for r in served:
            key = f"{r['concurrency']}x{r['batch']}"
            row[f"{key}_over_alone"] = round(r["texts_per_s"] / best, 3)
            row[f"{key}_over_beside"] = round(r["texts_per_s"] / beside[32]["texts_per_s"], 3)
            row[f"{key}_p50_over_loop_ms"] = round(r["p50_ms"] - one, 2)
            row[f"{key}_errors"] = sum(r["errors"].values())
        print(json.dumps(row), flush=True)
        out.append(row)
        before = after
    medians = {k: round(float(np.median([r[k] for r in out])), 3) for k in out[0]
               if k.endswith(("_over_alone", "_over_beside", "_over_loop_ms"))}
    print(json.dumps({"what": "cycles_median", "cycles": n, "route": route, **medians}), flush=True)
    return out + [{"what": "cycles_median", **medians}]


def print_over_provider(rows: list[dict]) -> None:
    """Each route's p50 minus the provider route's in the same round (routes loaded back to back), and the median."""
    by = {(r["settings"], r["concurrency"], r["batch"], r["round"], r["route"]): r["p50_ms"] for r in rows}
    print("\n| settings | c x b | route | p50 over the provider route's, per round (ms) | median |\n| --- | --- | --- | --- | --- |")
    for settings, c, b, route in dict.fromkeys((s, c, b, rt) for s, c, b, _, rt in by if rt != "provider"):
        deltas = [round(p50 - by[(settings, c, b, i, "provider")], 2) for (s, cc, bb, i, rt), p50 in by.items()
                  if (s, cc, bb, rt) == (settings, c, b, route) and (settings, c, b, i, "provider") in by]
        if deltas:
            print(f"| {settings} | {c} x {b} | {route} | {', '.join(f'{d:+.2f}' for d in deltas)} | "
                  f"{float(np.median(deltas)):+.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-serve")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per loadgen config")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per ceiling config")
    parser.add_argument("--configs", default="1x1,32x1,32x16", help="concurrency x batch, comma separated")
    parser.add_argument("--provider", default=json.dumps({"num_cpus": float(len(os.sched_getaffinity(0)))}),
                        help="provider settings as JSON (serve/settings.py ProviderSettings); default: what "
                             "`python -m serve --model-dir` gives one replica here (num_cpus = this machine's cores)")
    parser.add_argument("--tuned", default=None,
                        help="also run the gateway configs with these provider settings over --provider, as JSON, "
                             "e.g. '{\"precision\": \"int8\", \"spin\": true}'; the table shows both")
    parser.add_argument("--routes", default="openai,provider",
                        help="which URLs to load, each config alternating between them: openai (/v1/embeddings: the "
                             "gateway forwards the body to the model's own route), provider (that route, answered by "
                             "the model's own application) and model (the model-entity route: the gateway calls the "
                             "replicas through a Serve handle)")
    parser.add_argument("--skip-ceiling", action="store_true", help="only the gateway (for quick config comparisons)")
    parser.add_argument("--alternate", type=int, metavar="ROUNDS", default=1,
                        help="load each config's routes this many times, in turn (ABBA...), and print each route's p50 "
                             "over the provider route's, per round and its median (the VM's drift taken out)")
    parser.add_argument("--gateway-replicas", type=int, default=1, help="replicas of the gateway deployment")
    parser.add_argument("--gateway-env", default="{}", help="gateway_env in the routing table, as JSON: Ray Serve "
                        "settings for the gateway's processes over the defaults (serve.gateway.GATEWAY_SERVE_ENV); "
                        "'{\"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD\": \"\", \"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP\": \"\"}' "
                        "restores Ray's")
    parser.add_argument("--port", type=int, default=8181)
    parser.add_argument("--compare-graphs", type=int, metavar="ROUNDS", default=0,
                        help="only compare the artifact's graphs in process (2 threads), alternated ROUNDS times")
    parser.add_argument("--compare-plans", type=int, metavar="ROUNDS", default=0,
                        help="only compare the batch planner's cuts in process (one call per 32 texts against the "
                             "least-cost cut), alternated ROUNDS times, --ceiling-seconds each")
    parser.add_argument("--cycles", type=int, metavar="N", default=0,
                        help="only the goals' ratios, N times in turn: the minimal loop alone, the server idle with the "
                             "loop beside it, --configs through the first of --routes; prints per-cycle ratios and medians")
    parser.add_argument("--graphs", default="fp32,optimized",
                        help="with --compare-graphs: provider precisions to compare, the first is the reference "
                             "(fp32, optimized, int8), or transformers: ONNX Runtime's transformer optimizer's graph")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.compare_graphs:
        return compare_graphs(ensure_artifact(args.model_dir, args.work), read_texts(ensure_texts(args.work)),
                              args.ceiling_seconds, args.compare_graphs, tuple(args.graphs.split(",")), args.work)
    if args.compare_plans:
        return compare_plans(ensure_artifact(args.model_dir, args.work), read_texts(ensure_texts(args.work)),
                             args.ceiling_seconds, args.compare_plans)
    model_dir = ensure_artifact(args.model_dir, args.work)
    texts_path = ensure_texts(args.work)
    if args.cycles:
        configs = [tuple(int(x) for x in spec.split("x")) for spec in args.configs.split(",")]
        rows = cycles(model_dir, texts_path, args.cycles, args.ceiling_seconds, args.duration, configs,
                      args.routes.split(",")[0], json.loads(args.provider), args.port, args.work / "server.log")
        with (args.work / "results.jsonl").open("a") as fh:
            for r in rows:
                fh.write(json.dumps({"provider": json.loads(args.provider), **r, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        return 0
    texts = read_texts(texts_path)

    provider = json.loads(args.provider)
    rows = [] if args.skip_ceiling else (minimal_loop(model_dir, texts, args.ceiling_seconds)
                                         + ceiling(model_dir, texts, args.ceiling_seconds))
    runs = [("defaults", provider)] + ([("tuned", {**provider, **json.loads(args.tuned)})] if args.tuned else [])
    for label, settings in runs:
        proc = start_server(model_dir, args.port, settings, args.work / "server.log", args.gateway_replicas,
                            json.loads(args.gateway_env))
        try:
            if not args.skip_ceiling and label == "defaults":  # the loop with idle Ray + Serve sharing the CPUs
                rows += ceiling(model_dir, texts, args.ceiling_seconds, "ceiling_beside_idle_ray",
                                grid=((2, False), (2, True)), batches=(1, 16, 32))
            for spec in args.configs.split(","):
                c, b = (int(x) for x in spec.split("x"))
                routes = args.routes.split(",")
                for i in range(args.alternate):
                    for route in routes if i % 2 == 0 else routes[::-1]:
                        rows.append({**load(args.port, texts_path, c, b, args.duration, route), "settings": label,
                                     "provider": settings, "round": i + 1})
        finally:
            stop_server(proc)
    if not args.skip_ceiling:
        rows += minimal_loop(model_dir, texts, args.ceiling_seconds) + ceiling(model_dir, texts, args.ceiling_seconds)

    nan = [{"texts_per_s": float("nan"), "p50_ms": float("nan"), "batch": 1}]
    ceil = [r for r in rows if r["what"] == "minimal"] or nan
    best = max(r["texts_per_s"] for r in ceil)
    one = min(r["p50_ms"] for r in ceil if r["batch"] == 1)
    print(f"\nceiling: the minimal loop (tokenizers + numpy padding + session.run, 2 threads, no Ray running, "
          f"before and after the server): {best} texts/s; one text p50 {one} ms")
    own = [r for r in rows if r["what"] == "replica_code"] or nan
    own_best, own_one = max(r["texts_per_s"] for r in own), min(r["p50_ms"] for r in own if r["batch"] == 1)
    print(f"the replica's own code in process (best of {len(own)} configs): {own_best} texts/s "
          f"({own_best / best:.2f}x the minimal loop); one text p50 {own_one} ms")
    beside = [r for r in rows if r["what"] == "ceiling_beside_idle_ray"]
    best_beside = max((r["texts_per_s"] for r in beside), default=float("nan"))
    if beside:
        one_beside = min(r["p50_ms"] for r in beside if r["batch"] == 1)
        print(f"ceiling beside an idle Ray + Serve on the same CPUs: {best_beside} texts/s; one text p50 {one_beside} ms")
    for label, settings in runs:
        print(f"{label}: provider {json.dumps(settings)}")
    print("| settings | route | c x b | texts/s | x ceiling | x ceiling beside idle Ray | p50 ms | p99 ms | errors |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in (r for r in rows if r["what"] == "gateway"):
        print(f"| {r['settings']} | {r['route']} | {r['concurrency']} x {r['batch']} | {r['texts_per_s']} | {r['texts_per_s'] / best:.2f} | "
              f"{r['texts_per_s'] / best_beside:.2f} | {r['p50_ms']} | {r['p99_ms']} | {sum(r['errors'].values())} |")
    if args.alternate > 1:
        print_over_provider([r for r in rows if r["what"] == "gateway"])
    with (args.work / "results.jsonl").open("a") as fh:
        for r in rows:
            fh.write(json.dumps({"provider": provider, **r, "gateway_replicas": args.gateway_replicas,
                                 "gateway_env": json.loads(args.gateway_env),
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
