"""Soak: `python -m serve` driven at a fixed share of its measured saturation for a bounded time; every
error counted, and the memory of every process of the server's Ray instance sampled over time.

    python -m bench.soak [--duration 600] [--warmup 120] [--load 0.8] [--model-dir DIR]

Steps: start the server (defaults of `python -m serve`, the packaged MiniLM when no --model-dir),
measure saturation (closed loop, 32 clients, one text each), then send requests open loop at
`--load` x that rate (at most 64 in flight) for `--duration` seconds, sampling the RSS of the server's
processes every few seconds. Prints the error count, the memory of each process at the end of the
warm-up and at the end, the growth, and writes <work>/soak.jsonl and a chart <work>/soak.png.
Goal (issue 13): 0 errors and < 5 % memory growth after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

if not __package__:  # `python bench/soak.py`: put the repository root (which holds `bench`) on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving import ROOT, ensure_artifact, ensure_texts, read_texts, start_server, stop_server

SAMPLE_S = 5.0
MAX_IN_FLIGHT = 64


def _title(pid: int) -> str:
    args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    if len(args) == 1:  # a process title set as one string
        args = args[0].split()
    if args[0].startswith("ray::"):  # Ray names a worker after its actor, then `.method` while a task runs
        return args[0].split(".")[0]
    name = Path(args[0]).name
    for i, a in enumerate(args[1:], 1):
        if a == "-m" and i + 1 < len(args):
            return f"{name} -m {args[i + 1]}"
        if a == "-c":
            return f"{name} -c (Ray worker starting)"
        if a.endswith(".py"):
            return f"{name} {Path(a).name}"
    return name


def session_rss(sid: int) -> dict[str, float]:
    """RSS (MiB) of every process in session `sid` (the server and the Ray it started), by process title."""
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != sid:  # field 6: session id
                continue
            rss = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                       if line.startswith("VmRSS:")) / 1024
            title = _title(int(proc.name))
        except (OSError, StopIteration, ValueError, IndexError):
            continue
        key, n = title, 2
        while key in out:  # two processes with one title (e.g. two replicas): number them
            key, n = f"{title} #{n}", n + 1
        out[key] = round(rss, 1)
    return out


async def saturation(url: str, texts: list[str], seconds: float, clients: int = 32) -> float:
    import aiohttp

    done, stop = 0, time.monotonic() + seconds

    async def client(session):
        nonlocal done
        while time.monotonic() < stop:
            async with session.post(url, json={"model": "bench", "input": [random.choice(texts)]}) as r:
                await r.read()
                done += r.status == 200

    async with aiohttp.ClientSession() as session:
        start = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return done / (time.monotonic() - start)


async def soak(url: str, texts: list[str], rate: float, seconds: float, sid: int, log) -> dict:
    """Open loop at `rate` requests/s; a sample every SAMPLE_S seconds: requests, errors, latency, memory."""
    import aiohttp

    window = {"ok": 0, "errors": 0, "late": 0, "ms": []}
    totals = {"requests": 0, "errors": 0, "skipped": 0, "error_kinds": {}}
    in_flight = 0

    async def one(session):
        nonlocal in_flight
        in_flight += 1
        start = time.perf_counter()
        try:
            async with session.post(url, json={"model": "bench", "input": [random.choice(texts)]}) as r:
                body = await r.read()
                ok = r.status == 200 and b'"embedding"' in body
                kind = None if ok else f"HTTP {r.status}"
        except Exception as exc:  # noqa: BLE001 - every failure counts, whatever its kind
            ok, kind = False, type(exc).__name__
        in_flight -= 1
        totals["requests"] += 1
        window["ok" if ok else "errors"] += 1
        window["ms"].append((time.perf_counter() - start) * 1000)
        if not ok:
            totals["errors"] += 1
            totals["error_kinds"][kind] = totals["error_kinds"].get(kind, 0) + 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = time.monotonic()
        next_send, next_sample, tasks = start, start + SAMPLE_S, set()
        while (now := time.monotonic()) < start + seconds:
            if now >= next_sample:
                ms = sorted(window["ms"]) or [float("nan")]
                log({"t": round(now - start, 1), "ok_per_s": round(window["ok"] / SAMPLE_S, 1), "errors": window["errors"],
                     "p50_ms": round(ms[len(ms) // 2], 1), "p99_ms": round(ms[int(len(ms) * 0.99)], 1),
                     "in_flight": in_flight, "rss_mib": session_rss(sid)})
                window = {"ok": 0, "errors": 0, "late": 0, "ms": []}
                next_sample += SAMPLE_S
            if now >= next_send:
                if in_flight < MAX_IN_FLIGHT:
                    task = asyncio.ensure_future(one(session))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    totals["skipped"] += 1  # the server fell behind: not sent (counted, reported)
                next_send += 1.0 / rate
            await asyncio.sleep(max(0.0, min(next_send, next_sample) - time.monotonic()))
        await asyncio.gather(*tasks)
    return totals


def growth(samples: list[dict], warmup: float) -> dict:
    after = [s for s in samples if s["t"] >= warmup]
    if len(after) < 2:
        return {}
    first, last = after[0]["rss_mib"], after[-1]["rss_mib"]
    per = {k: {"after_warmup_mib": first[k], "end_mib": last[k], "growth_pct": round(100 * (last[k] / first[k] - 1), 2)}
           for k in sorted(first) if k in last and first[k] > 0}
    total_first = sum(first[k] for k in per)
    total_last = sum(last[k] for k in per)
    return {"processes": per, "total_after_warmup_mib": round(total_first, 1), "total_end_mib": round(total_last, 1),
            "total_growth_pct": round(100 * (total_last / total_first - 1), 2) if total_first else None}


def chart(samples: list[dict], warmup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for s in samples for k in s["rss_mib"]}, key=lambda k: -samples[-1]["rss_mib"].get(k, 0))
    fig, (mem, rate) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    t = [s["t"] for s in samples]
    for name in names:
        mem.plot(t, [s["rss_mib"].get(name) for s in samples], label=name[:50])
    mem.axvline(warmup, color="grey", linestyle="--")
    mem.set_ylabel("RSS (MiB)")
    mem.set_title("memory of every process of the server's Ray instance")
    mem.legend(fontsize=6, loc="upper left", ncol=2)
    rate.plot(t, [s["ok_per_s"] for s in samples], label="answers/s")
    rate.plot(t, [s["errors"] for s in samples], label="errors per sample", color="red")
    rate.set_xlabel("seconds")
    rate.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-soak")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of soak")
    parser.add_argument("--warmup", type=float, default=120.0, help="memory growth is measured from here")
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured saturation rate")
    parser.add_argument("--saturation-seconds", type=float, default=20.0)
    parser.add_argument("--provider", default="{}", help="provider settings as JSON (default: python -m serve's)")
    parser.add_argument("--port", type=int, default=8191)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_artifact(args.model_dir, args.work)
    texts = read_texts(ensure_texts(args.work))
    url = f"http://127.0.0.1:{args.port}/v1/embeddings"
    samples: list[dict] = []
    out = (args.work / "soak.jsonl").open("w")

    def log(sample: dict) -> None:
        samples.append(sample)
        out.write(json.dumps(sample) + "\n")
        out.flush()
        total = sum(sample["rss_mib"].values())
        print(f"t={sample['t']:>6.1f}s  {sample['ok_per_s']:>6.1f} ok/s  errors {sample['errors']}  "
              f"p50 {sample['p50_ms']} ms  p99 {sample['p99_ms']} ms  in flight {sample['in_flight']}  "
              f"RSS {total:,.0f} MiB in {len(sample['rss_mib'])} processes", flush=True)

    proc = start_server(model_dir, args.port, json.loads(args.provider), args.work / "server.log")
    try:
        sid = os.getsid(proc.pid)
        peak = asyncio.run(saturation(url, texts, args.saturation_seconds))
        rate = args.load * peak
        print(f"saturation: {peak:.1f} requests/s (32 clients, 1 text each); soaking at {rate:.1f}/s "
              f"({args.load:.0%}) for {args.duration:.0f} s", flush=True)
        totals = asyncio.run(soak(url, texts, rate, args.duration, sid, log))
    finally:
        stop_server(proc)
        out.close()
    mem = growth(samples, args.warmup)
    chart(samples, args.warmup, args.work / "soak.png")
    result = {"saturation_rps": round(peak, 1), "rate_rps": round(rate, 1), "duration_s": args.duration,
              "warmup_s": args.warmup, **totals, "memory": mem,
              "goal_met": totals["errors"] == 0 and mem.get("total_growth_pct") is not None
              and mem["total_growth_pct"] < 5.0}
    for name, row in (mem.get("processes") or {}).items():
        print(f"{name:<60} {row['after_warmup_mib']:>8.1f} -> {row['end_mib']:>8.1f} MiB  {row['growth_pct']:+.2f} %")
    print(f"requests {totals['requests']}, errors {totals['errors']} {totals['error_kinds'] or ''}, not sent (server "
          f"behind) {totals['skipped']}; memory {mem.get('total_after_warmup_mib')} -> {mem.get('total_end_mib')} MiB "
          f"({mem.get('total_growth_pct')} %); chart {args.work / 'soak.png'}")
    print(json.dumps(result))
    return 0 if result["goal_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
