"""Standalone serving: `python -m serve --model-dir DIR [--name NAME] [--port 8080] [--replicas N]`.

Starts (or joins) Ray, runs the model as its own application (which answers its provider route itself)
and the gateway in front of it, and blocks until Ctrl-C. With `--config gateway.yaml` it serves a whole
routing table instead (several models, providers).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

from rayembed.artifact import ArtifactError
from rayembed.config import ConfigError
from serve.settings import GatewayAuth, ProviderSettings, load_gateway_config, single_model_config

APP_NAME = "rayembed-gateway"


def default_name(model_dir: Path) -> str:
    """The training job's name, else the base model's directory name."""
    from rayembed.artifact import read_manifest

    manifest = read_manifest(model_dir)
    return manifest.job or Path(manifest.base_model or str(model_dir)).name


def gateway_auth(args, given: GatewayAuth) -> GatewayAuth:
    """The gateway's keys: --api-keys-file (hashed here), the config's own and $RAYEMBED_API_KEYS (read by each
    replica). Without any, only --open serves, and only on a loopback --host; ValueError says what to give."""
    from rayembed.runtime import loopback
    from serve.auth import records_of

    records = list(given.keys)
    if args.api_keys_file is not None:
        records += records_of(args.api_keys_file.read_text(), str(args.api_keys_file))
    has_keys = bool(records) or bool(given.keys_env and os.environ.get(given.keys_env))
    open_ = args.open or given.open
    if open_ and not loopback(args.host):
        raise ValueError(f"--open answers without keys, so only on a loopback --host, not {args.host}: give "
                         "--api-keys-file FILE (or $RAYEMBED_API_KEYS)")
    if not has_keys and not open_:
        raise ValueError("the gateway needs API keys (--api-keys-file FILE, or $RAYEMBED_API_KEYS) or, on a loopback "
                         "--host, --open to answer without them")
    return given.model_copy(update={"keys": records, "open": open_ and not has_keys})


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def replica_resources(cores: int, replicas: int, gpus: float, cuda: bool, num_cpus: float | None = None,
                      num_gpus: float | None = None, precision: str = "auto") -> tuple[float, float, str | None]:
    """(CPUs, GPUs) per replica for `python -m serve --model-dir` on this machine, and a note for the console.

    `gpus`: what Ray can give now (available GPU resources); `cuda`: this onnxruntime has its CUDA provider. Given
    values win. Unset, a replica gets a GPU when both hold (replicas share whole free GPUs evenly when they outnumber
    them: a fraction must fit on one GPU) and then one CPU (tokenizing and batching; the model runs on the GPU), else
    this machine's cores / replicas (its ONNX Runtime threads), as training takes the GPU where there is one. The
    int8 graph (dynamic quantization) is made for CPU replicas: asking for it keeps them on the CPU unless GPUs are given.
    """
    note, whole = None, int(gpus)
    if num_gpus is None:
        num_gpus = 0.0
        if whole >= 1 and precision == "int8":
            note = "--precision int8 is the CPU graph: serving on CPU although Ray has a GPU free (--num-gpus 1 overrides)"
        elif whole >= 1 and cuda:
            num_gpus = 1.0 / math.ceil(replicas / whole)
        elif whole >= 1:
            note = (f"Ray has {gpus:g} GPU(s) free but this onnxruntime has no CUDA provider: serving on CPU. Install "
                    "the `gpu` extra (onnxruntime-gpu instead of onnxruntime) to serve on the GPU, or pass --num-gpus 0")
    if num_cpus is None:
        num_cpus = 1.0 if num_gpus > 0 else float(max(1, cores // replicas))
    return num_cpus, num_gpus, note


def describe(p: ProviderSettings) -> str:
    """One console line: what each of the provider's replicas holds."""
    if p.num_gpus > 0:
        return f"replicas: {p.num_replicas} x ({p.num_gpus:g} GPU, {p.num_cpus:g} CPU), ONNX Runtime on CUDA (--num-gpus 0: CPU)"
    return f"replicas: {p.num_replicas} x {p.num_cpus:g} CPU, ONNX Runtime on CPU with {p.threads()} thread(s) each"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="ONNX artifact directory (a job's onnx/ or train.export output)")
    source.add_argument("--config", type=Path, help="routing table YAML (models -> providers), see examples/gateway.yaml")
    parser.add_argument("--name", help="model name clients send (default: the training job's name)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to accept remote clients)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-keys-file", type=Path, help="API keys the gateway accepts, one per line (rek_<id>_<secret>, "
                                                           "as `rayembed keys create` prints them); only their SHA-256 "
                                                           "is kept. Also: $RAYEMBED_API_KEYS")
    parser.add_argument("--open", action="store_true", help="no API keys: answer every request; only on a loopback "
                                                            "--host")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--num-cpus", type=float, default=None,
                        help="CPUs per replica (= its ONNX Runtime threads on CPU); default: this machine's cores / "
                             "replicas, or 1 for a GPU replica")
    parser.add_argument("--num-gpus", type=float, default=None,
                        help="GPUs per replica (CUDA provider when > 0); default: 1 when Ray has a free GPU and "
                             "onnxruntime has its CUDA provider (shared when replicas outnumber GPUs), else 0")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "optimized", "int8"], default="auto",
                        help="which of the artifact's graphs replicas load (auto: the fused graph on CPU, fp16 on CUDA "
                             "when exported; int8: model.int8.onnx from python -m train.quantize)")
    parser.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                        help="HTTP ingress when this command starts Ray: Serve's HAProxy (default; one fewer Python "
                             "hop per request; replica ports 30000-31000, no TLS) or Ray Serve's Python proxy; "
                             "a joined cluster keeps its own")
    args = parser.parse_args(argv)
    try:
        if args.config:
            config = load_gateway_config(args.config)
        else:  # checked here, before Ray starts; resources left unset are chosen once Ray says what it has
            name = args.name or default_name(args.model_dir)
            given = {k: v for k, v in (("num_cpus", args.num_cpus), ("num_gpus", args.num_gpus)) if v is not None}
            config = single_model_config(str(args.model_dir), name, replicas=args.replicas, precision=args.precision,
                                         **given)
            if args.precision == "int8" and not (args.model_dir / "model.int8.onnx").is_file():
                raise FileNotFoundError(f"--precision int8 needs {args.model_dir / 'model.int8.onnx'}: write it with "
                                        f"`python -m train.quantize --model-dir {args.model_dir} --eval BEIR_DIR`")
        config = config.model_copy(update={"auth": gateway_auth(args, config.auth)})
    except (ConfigError, ArtifactError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from rayembed.runtime import ensure_ray, local_cluster_address, serve_ingress_env, wait_http

    joined = os.environ.get("RAY_ADDRESS", "local") != "local" or (
        not os.environ.get("RAY_ADDRESS") and local_cluster_address() is not None)
    if not joined:  # Serve reads these once, when its processes (and this one's `ray.serve`) start
        os.environ.update(serve_ingress_env(args.ingress))

    import ray
    from ray import serve

    from ray.serve.api import RunTarget

    from serve.direct import provider_prefix, standalone_apps
    from serve.routing import model_id

    ensure_ray()
    if not args.config:
        import onnxruntime as ort

        from rayembed.engine import CUDA

        num_cpus, num_gpus, note = replica_resources(
            len(os.sched_getaffinity(0)), args.replicas, ray.available_resources().get("GPU", 0.0),
            CUDA in ort.get_available_providers(), args.num_cpus, args.num_gpus, args.precision)
        if note:
            print(f"note: {note}", flush=True)
        auth = config.auth
        config = single_model_config(str(args.model_dir), name, replicas=args.replicas, num_cpus=num_cpus,
                                     num_gpus=num_gpus, precision=args.precision)
        config = config.model_copy(update={"auth": auth})
        print(describe(next(iter(config.providers().values()))), flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"enable_access_log": False})
    base = f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}"
    apps = standalone_apps(config, APP_NAME, base)
    serve.run_many([RunTarget(target=target, name=name, route_prefix=prefix) for name, target, prefix in apps])
    wait_http(base + "/v1/health/ready")
    direct = [(m, p) for m in config.models for p in m.providers if p.model_dir is not None]
    model = next(iter(config.models))
    print(f"serving {', '.join(model_id(m) for m in config.models)} at {base}/v1/embeddings\n"
          f"  curl {base}/v1/embeddings -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{model_id(model)}\", \"input\": [\"hello world\"]}}'\n"
          f"  gateway: {base}/v2/workspaces/{model.workspace}/inference/gateway/model/{model.name}/-/v1/embeddings\n"
          + "".join(f"  provider {p.name} (answered by its own replicas, one hop fewer): "
                    f"{base}{provider_prefix(m.workspace, p.name)}/v1/embeddings\n" for m, p in direct)
          + "Ctrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    if joined:  # a shared cluster: take our applications down, leave the cluster and Serve running
        for name, _, _ in apps:
            serve.delete(name)
    else:  # our own local Ray: stop it with us
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
