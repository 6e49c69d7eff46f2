"""Verification time: a job's artifact served by one Serve replica (as a deployment's generation is), and its
evaluation set scored through it (`cluster.verify.verify`, what the control plane runs at READY); local Ray, CPU.

    python -m bench.verify_speed --model-dir runs/minilm-debian-demo/onnx --num-cpus 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rayembed.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.verify_speed", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="a job's onnx/ folder (model.onnx, manifest.json, eval.json)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the replica (its ONNX Runtime threads)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "optimized", "int8"])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from cluster import serve_apps, verify
    from cluster.entities import Evaluation
    from rayembed.runtime import free_port
    from serve.app import build_provider_app

    model_dir = Path(args.model_dir).absolute()
    evaluation = Evaluation.from_report(json.loads((model_dir / "eval.json").read_text()))
    init_ray(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    app = "bench-verify"
    start = time.perf_counter()
    serve.run(build_provider_app({"name": app, "model_dir": str(model_dir), "num_cpus": args.num_cpus,
                                  "precision": args.precision}), name=app, route_prefix=None)
    print(f"{model_dir}: replica up in {time.perf_counter() - start:.1f} s; {evaluation.queries} queries, "
          f"{evaluation.documents} documents; the job's tuned nDCG@10 {evaluation.tuned['ndcg@10']:.4f}", flush=True)
    try:
        for r in range(args.rounds):
            start = time.perf_counter()
            v = verify.verify(serve_apps.embedder(app), serve_apps.replica_info(app), evaluation, None, False)
            print(json.dumps({"round": r + 1, "seconds": round(time.perf_counter() - start, 2), "graph": v.graph,
                              "ndcg@10": v.ndcg_at_10, "expected": v.expected, "delta": v.delta, "passed": v.passed}),
                  flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
