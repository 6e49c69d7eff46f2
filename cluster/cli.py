"""The `rayembed` command: `up`, `down`, `status`, and thin verbs over the client.

    rayembed up                                   # local Ray head on 127.0.0.1 (or RAY_ADDRESS), control plane, API on :8080
    rayembed models register minilm --base-model all-MiniLM-L6-v2
    rayembed jobs create --config examples/minilm-debian.yaml --output-model minilm-debian --wait
    rayembed deploy minilm-debian --model minilm-debian
    rayembed embed --model minilm-debian "a tool to convert images"
    rayembed deployments export minilm-debian -o rayservice.yaml   # serve it on a KubeRay cluster
    rayembed keys create --for default --label ci   # from then on every call needs a key (RAYEMBED_API_KEY)
    rayembed down
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cluster.client import ApiError, Client
from cluster.settings import settings


def _client(args) -> Client:
    return Client(base_url=args.base_url or settings().base_url, workspace=args.workspace)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def progress_bar(status) -> str:
    p = status.progress
    width = 30
    filled = int(width * (p.percent or 0) / 100)
    bar = "#" * filled + "-" * (width - filled)
    parts = [f"[{bar}] {p.percent:5.1f}%", f"step {p.step}/{p.total_steps or '?'}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.examples_per_s:
        parts.append(f"{p.examples_per_s:.1f} ex/s")
    if p.eta_seconds is not None:
        parts.append(f"ETA {p.eta_seconds:.0f}s")
    return f"{status.status:<9} " + "  ".join(parts)


def follow_job(client: Client, job_id: str, stream=sys.stdout) -> dict:
    """Wait for a job with a live progress line (one line per change when not a terminal)."""
    tty, last = stream.isatty(), None

    def show(status):
        nonlocal last
        line = progress_bar(status)
        if line != last:
            stream.write(("\r" + line.ljust(100)) if tty else line + "\n")
            stream.flush()
            last = line

    job = client.customization.jobs.wait(job_id, on_progress=show)
    if tty:
        stream.write("\n")
    return job


def evaluation_table(evaluation) -> str:
    rows = [f"evaluation on {evaluation.dataset} ({evaluation.queries} queries, {evaluation.documents} documents)",
            f"{'metric':<12} {'base':>8} {'tuned':>8} {'delta':>8}"]
    for metric in ("ndcg@10", "recall@1", "recall@10", "mrr@10"):
        b, t = evaluation.base[metric], evaluation.tuned[metric]
        rows.append(f"{metric:<12} {b:8.4f} {t:8.4f} {t - b:+8.4f}")
    rows.append(f"verdict: {evaluation.verdict}")
    return "\n".join(rows)


def cmd_up(args) -> int:
    from cluster.local import up

    up(settings(), num_cpus=args.num_cpus, num_gpus=args.num_gpus, ingress=args.ingress, data_roots=args.data_roots)
    return 0


def cmd_down(args) -> int:
    from cluster.local import down

    down(settings())
    return 0


def cmd_keys(args) -> int:
    """API keys go through Ray (the operator's access to the cluster), never through the HTTP API they guard."""
    from cluster.local import connect

    connect(settings())
    import ray

    from cluster.settings import CONTROL_PLANE, NAMESPACE

    try:
        plane = ray.get_actor(CONTROL_PLANE, namespace=NAMESPACE)
    except ValueError:
        raise RuntimeError("the control plane is not running: run `rayembed up` first") from None

    def call(method: str, *a):
        try:
            return ray.get(getattr(plane, method).remote(*a), timeout=60)
        except ray.exceptions.RayTaskError as exc:
            raise RuntimeError(str(getattr(exc, "cause", exc))) from None

    if args.action == "create":
        if bool(args.scope) == args.all_workspaces:
            raise RuntimeError("keys create needs --for WORKSPACE (repeatable) or --all-workspaces")
        key = call("create_key", ["*"] if args.all_workspaces else args.scope, args.label or "")
        print(f"key {key['id']} for {', '.join(key['workspaces'])} (shown once; only its SHA-256 is stored):")
        print(key["key"])
        print("use it as: export RAYEMBED_API_KEY=<key>   or   Authorization: Bearer <key>", file=sys.stderr)
    elif args.action == "list":
        keys = call("list_keys")
        for k in keys:
            print(f"{k['id']:<14} {','.join(k['workspaces']):<30} {time.strftime('%Y-%m-%d %H:%M', time.localtime(k['created_at']))}  {k['label']}")
        if not keys:
            print("no API keys: the API is open to whoever can reach it (`rayembed keys create` turns keys on)")
    elif args.action == "revoke":
        if not args.id:
            raise RuntimeError("keys revoke needs the key's id (`rayembed keys list`)")
        call("revoke_key", args.id)
        print(f"revoked key {args.id}")
    return 0


def cmd_status(args) -> int:
    c = _client(args)
    out = {"base_url": c.base_url, "workspaces": [w.name for w in c.workspaces.list()],
           "models": {m.name: m.status for m in c.models.list()},
           "jobs": {j.name: f"{j.status} -> {j.output_model}" for j in c.customization.jobs.list()},
           "deployments": {d.name: f"{d.status} ({d.model})" for d in c.deployments.list()},
           "providers": [p.name for p in c.providers.list()]}
    _print(out)
    return 0


def cmd_models(args) -> int:
    c = _client(args)
    if args.action == "list":
        for m in c.models.list():
            ev = f"  {m.evaluation['verdict']}" if m.get("evaluation") else ""
            print(f"{m.name:<32} {m.status:<10} {m.embedding_dim or '?':>5}-d  {m.base_model}{ev}")
    elif args.action == "get":
        _print(c.models.retrieve(args.name))
    elif args.action == "register":
        m = c.models.create(args.name, base_model=args.base_model, artifact=args.artifact)
        print(f"model {m.name}: {m.status}")
        if m.status != "ready" and not args.no_wait:
            m = c.models.wait_ready(args.name)
            print(f"model {m.name}: {m.status} ({m.embedding_dim}-d, max {m.max_seq_length} tokens)")
    elif args.action == "delete":
        c.models.delete(args.name)
        print(f"deleted model {args.name}")
    return 0


def cmd_datasets(args) -> int:
    c = _client(args)
    if args.action in ("create", "upload") and not args.name:
        raise ApiError(0, f"datasets {args.action} needs a NAME")
    if args.action == "create":
        d = c.datasets.create(args.name, training=args.training, validation=args.validation, evaluation=args.evaluation,
                              description=args.description or "")
        _dataset_summary(d)
    elif args.action == "upload":
        _dataset_summary(c.datasets.upload(args.name, training=args.training, validation=args.validation,
                                           evaluation=args.evaluation))
    elif args.action == "list":
        for d in c.datasets.list():
            print(f"{d.name:<32} {', '.join(d.files) or '(no files yet)'}")
    elif args.action == "get":
        _print(c.datasets.retrieve(args.name))
    elif args.action == "delete":
        c.datasets.delete(args.name)
        print(f"deleted dataset {args.name}")
    return 0


def _dataset_summary(d) -> None:
    print(f"dataset {d.name}: {d.uri}")
    for path, f in d.files.items():
        print(f"  {path:<28} {f.records:>8} records  {f.bytes / 2**20:8.2f} MiB  sha256 {f.sha256[:12]}")
    print(f"use it in a job config as  dataset: {{name: {d.name}}}")


def cmd_jobs(args) -> int:
    c = _client(args)
    if args.action == "create":
        if not args.config or not args.output_model:
            raise ApiError(0, "jobs create needs --config FILE and --output-model NAME")
        raw = _load_spec(args)
        job = c.customization.jobs.create(args.output_model, **({"sweep": raw} if args.sweep else {"config": raw}))
        print(f"job {job.name} ({job.kind}) -> model {job.output_model}: {job.status}")
        for warning in job.warnings:
            print(f"warning: {warning}")
        if args.wait:
            return _finish(c, job.name)
    elif args.action == "list":
        for j in c.customization.jobs.list():
            print(f"{j.name:<18} {j.status:<10} {j.kind:<8} -> {j.output_model}")
    elif args.action == "get":
        _print(c.customization.jobs.retrieve(args.id))
    elif args.action == "logs":
        print(c.customization.jobs.get_logs(args.id))
    elif args.action == "wait":
        return _finish(c, args.id)
    elif args.action == "cancel":
        print(f"job {args.id}: {c.customization.jobs.cancel(args.id).status}")
    elif args.action == "resume":
        job = c.customization.jobs.resume(args.id)
        print(f"job {args.id}: {job.status} ({job.status_history[-1].reason})")
        if args.wait:
            return _finish(c, args.id)
    return 0


def _load_spec(args) -> dict:
    """The YAML file with --set overrides applied (validated by the control plane, not here)."""
    from rayembed.config import parse_overrides, read_yaml, set_path

    raw = read_yaml(args.config)
    if args.sweep:
        from tune.config import inline_job

        raw = inline_job(raw, Path(args.config))
    for key, value in parse_overrides(args.overrides):
        set_path(raw, key, value)
    job = raw.get("job") if args.sweep else raw
    if isinstance(job, dict):  # paths relative to where the command runs, not to the control plane's folder
        for section, key in (("dataset", "training"), ("dataset", "validation"), ("dataset", "evaluation"), (None, "model")):
            node = job.get(section) if section else job
            value = node.get(key) if isinstance(node, dict) else None
            if isinstance(value, str) and "://" not in value and Path(value).expanduser().exists():
                node[key] = str(Path(value).expanduser().absolute())
    return raw


def _finish(c: Client, job_id: str) -> int:
    job = follow_job(c, job_id)
    if job.status != "completed":
        print(f"job {job_id} {job.status}:\n{job.error or ''}", file=sys.stderr)
        return 1
    model = c.models.retrieve(job.output_model)
    if model.get("evaluation"):
        print(evaluation_table(model.evaluation))
    print(f"model {model.name}: {model.artifact.uri}")
    return 0


def cmd_deploy(args) -> int:
    c = _client(args)
    settings_ = {k: v for k, v in {"num_replicas": args.replicas, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus}.items()
                 if v is not None}
    try:
        c.deployments.retrieve(args.name)
        exists = True
    except ApiError as exc:
        if exc.status != 404:
            raise
        exists = False
    start = time.monotonic()
    if exists:  # repoint: a zero-downtime swap
        c.deployments.update(args.name, model=args.model, allow_worse=args.allow_worse or None, **settings_)
        print(f"deployment {args.name}: swapping to model {args.model}")
    else:
        c.deployments.create(args.name, model=args.model, allow_worse=args.allow_worse, **settings_)
        print(f"deployment {args.name}: created for model {args.model}")
    if not args.no_wait:
        dep = c.deployments.wait_ready(args.name)
        print(f"deployment {args.name}: {dep.status} in {time.monotonic() - start:.1f} s")
        p = c.providers.retrieve(args.name)
        for route, url in p.routes.items():
            print(f"  {route:<9} {url}")
    return 0


def cmd_undeploy(args) -> int:
    c = _client(args)
    c.deployments.delete(args.name)
    if not args.no_wait:
        c.deployments.wait_deleted(args.name)
    print(f"deployment {args.name}: deleted")
    return 0


def cmd_deployments(args) -> int:
    c = _client(args)
    if args.verb == "list":
        for d in c.deployments.list():
            print(f"{d.name:<32} {d.status:<9} model {d.model}")
    elif args.verb == "get":
        _print(c.deployments.retrieve(args.name))
    else:  # export
        manifest = c.deployments.export(args.name, format=args.format, image=args.image, k8s_name=args.k8s_name)
        if args.output in (None, "-"):
            sys.stdout.write(manifest)
        else:
            Path(args.output).write_text(manifest)
            print(f"deployment {args.name}: {args.format} manifest written to {args.output} "
                  f"(kubectl apply -f {args.output})", file=sys.stderr)
    return 0


def cmd_embed(args) -> int:
    c = _client(args)
    body = {"input": args.text, "input_type": args.input_type, "dimensions": args.dimensions}
    body = {k: v for k, v in body.items() if v is not None}
    if args.provider:
        out = c.inference.gateway.provider.post("v1/embeddings", name=args.provider, body=body)
    else:
        out = c.inference.gateway.model.post("v1/embeddings", name=args.model, body=body)
    for row, text in zip(out.data, args.text):
        vec = row.embedding
        print(f"{text[:40]:<40} {len(vec)}-d [{', '.join(f'{x:+.4f}' for x in vec[:4])}, ...]")
    print(f"model {out.model}, {out.usage.prompt_tokens} tokens")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayembed", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--base-url", help="the API (default http://127.0.0.1:$RAYEMBED_PORT, port 8080)")
    p.add_argument("--workspace", "-w", default="default")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("up", help="start (or join RAY_ADDRESS) Ray, the control plane and the API; idempotent")
    s.add_argument("--num-cpus", type=int, help="CPUs of a local head (default: all)")
    s.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                   help="HTTP ingress of a local head: Serve's HAProxy (default; one fewer Python hop per request, "
                        "replica ports 30000-31000) or Ray Serve's Python proxy")
    s.add_argument("--num-gpus", type=int, help="GPUs of a local head (default: detected)")
    s.add_argument("--data-root", dest="data_roots", action="append", default=[], metavar="DIR",
                   help="a folder (or s3:// prefix) jobs submitted through the API may read datasets and models "
                        "from, besides their workspace's folder (repeatable; default: $RAYEMBED_DATA_ROOTS, else "
                        "the folder `up` runs in)")
    s.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop only what `up` started (state stays in RAYEMBED_HOME)").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="workspaces, models, jobs, deployments, providers").set_defaults(fn=cmd_status)

    s = sub.add_parser("keys", help="API keys: once one exists, every route but the health probes needs one")
    s.add_argument("action", choices=["create", "list", "revoke"])
    s.add_argument("id", nargs="?", help="revoke: the key's id")
    s.add_argument("--for", dest="scope", action="append", default=[], metavar="WORKSPACE",
                   help="create: a workspace the key may use (repeatable); other workspaces are 404 to it")
    s.add_argument("--all-workspaces", action="store_true", help="create: an admin key (also creates and deletes workspaces)")
    s.add_argument("--label", help="create: a note, such as who holds the key")
    s.set_defaults(fn=cmd_keys)

    s = sub.add_parser("models", help="model entities")
    s.add_argument("action", choices=["list", "get", "register", "delete"])
    s.add_argument("name", nargs="?")
    s.add_argument("--base-model", help="register: a local HF folder, a nemotron folder, or all-MiniLM-L6-v2 (exported once)")
    s.add_argument("--artifact", help="register: an ONNX folder this project wrote")
    s.add_argument("--no-wait", action="store_true")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("datasets", help="datasets uploaded into the cluster's storage (a job reads them wherever it runs)")
    s.add_argument("action", choices=["create", "upload", "list", "get", "delete"])
    s.add_argument("name", nargs="?")
    s.add_argument("--training", help="create, upload: the training JSONL file")
    s.add_argument("--validation", help="create, upload: a validation JSONL file")
    s.add_argument("--evaluation", help="create, upload: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    s.add_argument("--description")
    s.set_defaults(fn=cmd_datasets)

    s = sub.add_parser("jobs", help="customization jobs")
    s.add_argument("action", choices=["create", "list", "get", "logs", "wait", "cancel", "resume"])
    s.add_argument("id", nargs="?")
    s.add_argument("--config", help="create: a job YAML (or a sweep YAML with --sweep)")
    s.add_argument("--sweep", action="store_true", help="create: the file is a learning-rate sweep")
    s.add_argument("--output-model", help="create: the model entity the job creates")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--wait", action="store_true", help="create, resume: follow the job with a progress bar")
    s.set_defaults(fn=cmd_jobs)

    s = sub.add_parser("deploy", help="deploy a model entity (or swap an existing deployment to another model)")
    s.add_argument("name")
    s.add_argument("--model", required=True)
    s.add_argument("--replicas", type=int)
    s.add_argument("--num-cpus", type=float)
    s.add_argument("--num-gpus", type=float)
    s.add_argument("--allow-worse", action="store_true", help="deploy even if the job's evaluation says worse than base")
    s.add_argument("--no-wait", action="store_true")
    s.set_defaults(fn=cmd_deploy)

    s = sub.add_parser("undeploy", help="delete a deployment (its provider and routes go with it)")
    s.add_argument("name")
    s.add_argument("--no-wait", action="store_true")
    s.set_defaults(fn=cmd_undeploy)

    s = sub.add_parser("deployments", help="model deployments: list, get, export to another cluster")
    verbs = s.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="every deployment with its status and model")
    v = verbs.add_parser("get", help="one deployment as JSON")
    v.add_argument("name")
    v = verbs.add_parser("export", help="a manifest that serves the deployment's model on another cluster (KubeRay "
                                        "RayService: a serving-only cluster; the model must be in shared storage)")
    v.add_argument("name")
    v.add_argument("--format", choices=["rayservice"], default="rayservice")
    v.add_argument("--image", help="the node image its pods run (default: the platform's RAYEMBED_IMAGE, else "
                                   "rayembed:VERSION-gpu): what you built from deploy/Dockerfile")
    v.add_argument("--k8s-name", help="the RayService's name (default: the deployment's, made a Kubernetes name)")
    v.add_argument("--output", "-o", help="write it to this file (default: stdout)")
    s.set_defaults(fn=cmd_deployments)

    s = sub.add_parser("embed", help="embed texts through the gateway")
    s.add_argument("text", nargs="+")
    target = s.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="route by model entity")
    target.add_argument("--provider", help="route by provider (deployment)")
    s.add_argument("--input-type", choices=["query", "passage"])
    s.add_argument("--dimensions", type=int)
    s.set_defaults(fn=cmd_embed)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
