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

from pydantic import BaseModel

from cluster.client import ApiError, Client, _wrap
from cluster.settings import settings


def _client(args) -> Client:
    return Client(base_url=args.base_url or settings().base_url, workspace=args.workspace)


def _print(obj) -> None:
    """An answer (a model of cluster/schemas.py, or plain JSON) as indented JSON."""
    print(json.dumps(obj, indent=2, default=lambda o: o.model_dump(mode="json") if isinstance(o, BaseModel) else str(o)))


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
    """Base against tuned, the verdict with its interval, and the report card where the job wrote one."""
    from rayembed.stats import verdict_line

    rows = [f"evaluation on {evaluation.dataset} ({evaluation.queries} queries, {evaluation.documents} documents)",
            f"{'metric':<12} {'base':>8} {'tuned':>8} {'delta':>8}"]
    for metric in ("ndcg@10", "recall@1", "recall@10", "mrr@10"):
        b, t = evaluation.base[metric], evaluation.tuned[metric]
        rows.append(f"{metric:<12} {b:8.4f} {t:8.4f} {t - b:+8.4f}")
    interval = evaluation.interval.model_dump() if evaluation.interval else None
    rows.append(verdict_line(evaluation.verdict, evaluation.delta_ndcg_at_10, interval))
    rows += [evaluation.regression.text()] if evaluation.regression else []
    rows += [f"note: {evaluation.note}"] if evaluation.note else []
    rows += [f"WARNING: {evaluation.warning}"] if evaluation.warning else []
    if evaluation.card is not None:
        from train.report_card import card_table

        rows.append(card_table(evaluation.card.model_dump()))
    return "\n".join(rows)


def cmd_up(args) -> int:
    from cluster.local import up

    try:
        up(settings(), num_cpus=args.num_cpus, num_gpus=args.num_gpus, ingress=args.ingress, data_roots=args.data_roots,
           open_=args.open)
    except ValueError as exc:  # a setting refused before anything started
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_down(args) -> int:
    from cluster.local import down

    down(settings())
    return 0


def _control_plane_call():
    """API keys go through Ray (the operator's access to the cluster), never through the HTTP API they guard."""
    from cluster.local import connect

    connect(settings())
    import ray

    from cluster.settings import CONTROL_PLANE, NAMESPACE

    try:
        plane = ray.get_actor(CONTROL_PLANE, namespace=NAMESPACE)
    except ValueError:
        raise RuntimeError("the control plane is not running: run `rayembed up` first") from None

    def call(method: str, *a, **kw):
        try:
            return ray.get(getattr(plane, method).remote(*a, **kw), timeout=60)
        except ray.exceptions.RayTaskError as exc:
            raise RuntimeError(str(getattr(exc, "cause", exc))) from None

    return call


def workspaces_grant(args) -> int:
    ws = _control_plane_call()("grant_data", args.workspace_name, args.prefix)
    print(f"workspace {ws['name']}: its jobs may read {', '.join(ws['data_grants'])}")
    return 0


def workspaces_revoke_grant(args) -> int:
    ws = _control_plane_call()("revoke_grant", args.workspace_name, args.prefix)
    print(f"workspace {ws['name']}: grants {', '.join(ws['data_grants']) or 'none'}")
    return 0


def workspaces_quota(args) -> int:
    changes = {k: v for k, v in vars(args).items() if k.startswith("max_") and v is not None}
    ws = _control_plane_call()("set_quota", args.workspace_name, changes)
    print(f"workspace {ws['name']}: " + ", ".join(f"{k} {v:g}" for k, v in ws["quota"].items()))
    return 0


def workspaces_policy(args) -> int:
    ws = _control_plane_call()("set_policy", args.workspace_name, args.require_improved == "yes")
    print(f"workspace {ws['name']}: require_improved {str(ws['require_improved']).lower()}")
    return 0


def keys_create(args) -> int:
    if bool(args.scope) == args.all_workspaces:
        raise RuntimeError("keys create needs --for WORKSPACE (repeatable) or --all-workspaces")
    key = _control_plane_call()("create_key", ["*"] if args.all_workspaces else args.scope, args.label or "")
    print(f"key {key['id']} for {', '.join(key['workspaces'])} (shown once; only its SHA-256 is stored):")
    print(key["key"])
    print("use it as: export RAYEMBED_API_KEY=<key>   or   Authorization: Bearer <key>", file=sys.stderr)
    return 0


def keys_list(args) -> int:
    keys = _control_plane_call()("list_keys")
    for k in keys:
        print(f"{k['id']:<14} {','.join(k['workspaces']):<30} {time.strftime('%Y-%m-%d %H:%M', time.localtime(k['created_at']))}  {k['label']}")
    if not keys:
        print("no API keys: the API is open to whoever can reach it (`rayembed keys create` turns keys on)")
    return 0


def keys_revoke(args) -> int:
    _control_plane_call()("revoke_key", args.id)
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


def models_list(args) -> int:
    for m in _client(args).models.list():
        ev = f"  {m.evaluation.verdict} {m.evaluation.figure()}" if m.evaluation else ""
        print(f"{m.name:<32} {m.status:<10} {m.embedding_dim or '?':>5}-d  {m.base_model}{ev}")
    return 0


def models_get(args) -> int:
    model = _client(args).models.retrieve(args.name)
    if args.json:
        _print(model)
        return 0
    print(f"model {model.name}: {model.status}, {model.embedding_dim or '?'}-d"
          + (f" (Matryoshka {', '.join(map(str, model.matryoshka_dims))})" if model.matryoshka_dims else "")
          + f", base {model.base_model}" + (f", from job {model.source_job}" if model.source_job else ""))
    if model.artifact:
        print(f"artifact: {model.artifact.uri}")
    print(evaluation_table(model.evaluation) if model.evaluation else "no evaluation (a base model, or an artifact "
          "registered without its job's eval.json)")
    return 0


def models_register(args) -> int:
    c = _client(args)
    local = args.base_model and Path(args.base_model).expanduser().is_dir()
    if args.artifact or local:  # a folder names a place: the operator's, over Ray (the HTTP API refuses it)
        field, given = ("artifact", args.artifact) if args.artifact else ("base_model", args.base_model)
        folder = given if "://" in given else str(Path(given).expanduser().absolute())
        m = _control_plane_call()("create_model", args.workspace, {"name": args.name, field: folder}, operator=True)
        print(f"model {m['name']}: {m['status']} ({m['artifact']['uri']})")
        if m["status"] != "ready" and not args.no_wait:
            m = c.models.wait_ready(args.name)
            print(f"model {m.name}: {m.status} ({m.embedding_dim}-d, max {m.max_seq_length} tokens)")
        return 0
    m = c.models.create(args.name, base_model=args.base_model)
    print(f"model {m.name}: {m.status}")
    if m.status != "ready" and not args.no_wait:
        m = c.models.wait_ready(args.name)
        print(f"model {m.name}: {m.status} ({m.embedding_dim}-d, max {m.max_seq_length} tokens)")
    return 0


def models_delete(args) -> int:
    _client(args).models.delete(args.name)
    print(f"deleted model {args.name}")
    return 0


def datasets_create(args) -> int:
    _dataset_summary(_client(args).datasets.create(args.name, training=args.training, validation=args.validation,
                                                   evaluation=args.evaluation, description=args.description or ""))
    return 0


def datasets_upload(args) -> int:
    _dataset_summary(_client(args).datasets.upload(args.name, training=args.training, validation=args.validation,
                                                   evaluation=args.evaluation))
    return 0


def datasets_list(args) -> int:
    for d in _client(args).datasets.list():
        print(f"{d.name:<32} {', '.join(d.files) or '(no files yet)'}")
    return 0


def datasets_get(args) -> int:
    _print(_client(args).datasets.retrieve(args.name))
    return 0


def datasets_delete(args) -> int:
    _client(args).datasets.delete(args.name)
    print(f"deleted dataset {args.name}")
    return 0


def _dataset_summary(d) -> None:
    print(f"dataset {d.name}: {d.uri}")
    for path, f in d.files.items():
        print(f"  {path:<28} {f.records:>8} records  {f.bytes / 2**20:8.2f} MiB  sha256 {f.sha256[:12]}")
    print(f"use it in a job config as  dataset: {{name: {d.name}}}")


def _names_places(raw: dict, sweep: bool) -> bool:
    """True when a job spec names files or folders (cluster.tenancy: only the operator may), not only entities."""
    from rayembed.config import places
    from train.config import JobConfig
    from tune.config import SweepConfig

    found = places(SweepConfig if sweep else JobConfig, raw)
    return any(kind != "model" or "/" in str(value) and Path(str(value)).expanduser().exists() for _, kind, value in found)


def jobs_create(args) -> int:
    c = _client(args)
    raw = _load_spec(args)
    body = {"output_model": args.output_model, **({"sweep": raw} if args.sweep else {"config": raw})}
    if _names_places(raw, args.sweep):  # the operator's job, over Ray; a tenant's names only entities (HTTP)
        job = _wrap(_control_plane_call()("create_job", args.workspace, body, operator=True))
    else:
        job = c.customization.jobs.create(args.output_model, **({"sweep": raw} if args.sweep else {"config": raw}))
    print(f"job {job.name} ({job.kind}) -> model {job.output_model}: {job.status}")
    for warning in job.warnings:
        print(f"warning: {warning}")
    return _finish(c, job.name) if args.wait else 0


def jobs_list(args) -> int:
    for j in _client(args).customization.jobs.list():
        print(f"{j.name:<18} {j.status:<10} {j.kind:<8} -> {j.output_model}")
    return 0


def jobs_get(args) -> int:
    _print(_client(args).customization.jobs.retrieve(args.id))
    return 0


def jobs_logs(args) -> int:
    print(_client(args).customization.jobs.get_logs(args.id))
    return 0


def jobs_wait(args) -> int:
    return _finish(_client(args), args.id)


def jobs_cancel(args) -> int:
    print(f"job {args.id}: {_client(args).customization.jobs.cancel(args.id).status}")
    return 0


def jobs_resume(args) -> int:
    c = _client(args)
    job = c.customization.jobs.resume(args.id)
    print(f"job {args.id}: {job.status} ({job.status_history[-1].reason})")
    return _finish(c, args.id) if args.wait else 0


def jobs_delete(args) -> int:
    _client(args).customization.jobs.delete(args.id)
    print(f"job {args.id}: deleted, with its folder")
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
    if model.evaluation:
        print(evaluation_table(model.evaluation))
    print(f"model {model.name}: {model.artifact.uri}")
    return 0


def cmd_deploy(args) -> int:
    c = _client(args)
    settings_ = {k: v for k, v in {"num_replicas": args.replicas, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                                   "default_dimensions": args.default_dimensions,
                                   "require_improved": args.require_improved}.items() if v is not None}
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
        if dep.verification:
            print(verification_line(dep.verification))
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


def deployments_list(args) -> int:
    for d in _client(args).deployments.list():
        print(f"{d.name:<32} {d.status:<9} model {d.model}")
    return 0


def deployments_get(args) -> int:
    _print(_client(args).deployments.retrieve(args.name))
    return 0


def verification_line(v) -> str:
    where = ", ".join(x for x in (v.graph, f"{v.dims}-d" if v.dims else None, f"{v.queries} queries" if v.queries else None) if x)
    return f"verification: {'passed' if v.passed else 'FAILED'}{f' ({where})' if where else ''}: {v.reason}"


def deployments_verify(args) -> int:
    dep = _client(args).deployments.verify(args.name)
    print(f"deployment {args.name} (model {dep.model}, generation {dep.generation})")
    print(verification_line(dep.verification))
    return 0 if dep.verification.passed else 1


def deployments_export(args) -> int:
    manifest = _client(args).deployments.export(args.name, format=args.format, image=args.image, k8s_name=args.k8s_name)
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
                   help="single-tenant installs: a folder (or s3:// prefix) every workspace's jobs may read from "
                        "(repeatable; default: $RAYEMBED_DATA_ROOTS, else none). It may not overlap the storage root "
                        "or RAYEMBED_HOME. Multi-tenant: `rayembed workspaces grant WS PREFIX` instead")
    s.add_argument("--open", action="store_true",
                   help="open mode: no API keys, every request allowed; only on a loopback bind (RAYEMBED_HOST "
                        "127.0.0.1), and only while no key exists. Without it, the API answers 401 until "
                        "`rayembed keys create` makes the first key")
    s.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop only what `up` started (state stays in RAYEMBED_HOME)").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="workspaces, models, jobs, deployments, providers").set_defaults(fn=cmd_status)

    def verbs(command: str, help: str):
        return sub.add_parser(command, help=help).add_subparsers(dest="verb", required=True, metavar="VERB")

    keys = verbs("keys", "API keys: once one exists, every route but the health probes needs one")
    v = keys.add_parser("create", help="a new key, shown once")
    v.add_argument("--for", dest="scope", action="append", default=[], metavar="WORKSPACE",
                   help="a workspace the key may use (repeatable); other workspaces are 404 to it")
    v.add_argument("--all-workspaces", action="store_true", help="an admin key (also creates and deletes workspaces)")
    v.add_argument("--label", help="a note, such as who holds the key")
    v.set_defaults(fn=keys_create)
    keys.add_parser("list", help="every key: id, workspaces, created, label").set_defaults(fn=keys_list)
    v = keys.add_parser("revoke", help="revoke a key at once")
    v.add_argument("id", help="the key's id (`rayembed keys list`)")
    v.set_defaults(fn=keys_revoke)

    wss = verbs("workspaces", "the operator's settings of a workspace (over Ray): data grants, quotas, policy")
    for verb, fn, help in (("grant", workspaces_grant, "let the workspace's jobs read under PREFIX (a folder or URI)"),
                           ("revoke-grant", workspaces_revoke_grant, "take a grant back")):
        v = wss.add_parser(verb, help=help)
        v.add_argument("workspace_name", metavar="WORKSPACE")
        v.add_argument("prefix", metavar="PREFIX")
        v.set_defaults(fn=fn)
    v = wss.add_parser("quota", help="change the workspace's limits (the others stay)")
    v.add_argument("workspace_name", metavar="WORKSPACE")
    from cluster.entities import Quota

    for name, field in Quota.model_fields.items():
        v.add_argument("--" + name.replace("_", "-"), dest=name, type=field.annotation, help=field.description)
    v.set_defaults(fn=workspaces_quota)
    v = wss.add_parser("policy", help="the workspace's promotion policy")
    v.add_argument("workspace_name", metavar="WORKSPACE")
    v.add_argument("--require-improved", choices=("yes", "no"), required=True,
                   help="yes: its deployments serve only models whose job's 95%% interval lies above zero")
    v.set_defaults(fn=workspaces_policy)

    models = verbs("models", "model entities")
    models.add_parser("list", help="every model with its status, size and verdict").set_defaults(fn=models_list)
    for verb, fn, help in (("get", models_get, "one model: its evaluation, verdict with interval and report card "
                                               "(--json: the whole entity)"), ("delete", models_delete, "delete a model")):
        v = models.add_parser(verb, help=help)
        v.add_argument("name")
        if verb == "get":
            v.add_argument("--json", action="store_true", help="the model entity as JSON")
        v.set_defaults(fn=fn)
    v = models.add_parser("register", help="register a base model (exported once) or an ONNX artifact")
    v.add_argument("name")
    source = v.add_mutually_exclusive_group(required=True)
    source.add_argument("--base-model", help="an allowed base model: all-MiniLM-L6-v2 (packaged) or what the operator "
                                             "lists in RAYEMBED_BASE_MODELS (exported once)")
    source.add_argument("--artifact", help="an ONNX folder this project wrote (the operator's: over Ray, copied in)")
    v.add_argument("--no-wait", action="store_true")
    v.set_defaults(fn=models_register)

    datasets = verbs("datasets", "datasets uploaded into the cluster's storage (a job reads them wherever it runs)")
    for verb, fn, help in (("create", datasets_create, "create a dataset and upload its files"),
                           ("upload", datasets_upload, "upload (or replace) files of a dataset")):
        v = datasets.add_parser(verb, help=help)
        v.add_argument("name")
        v.add_argument("--training", help="the training JSONL file")
        v.add_argument("--validation", help="a validation JSONL file")
        v.add_argument("--evaluation", help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
        if verb == "create":
            v.add_argument("--description")
        v.set_defaults(fn=fn)
    datasets.add_parser("list", help="every dataset and its files").set_defaults(fn=datasets_list)
    for verb, fn, help in (("get", datasets_get, "one dataset as JSON"), ("delete", datasets_delete, "delete a dataset")):
        v = datasets.add_parser(verb, help=help)
        v.add_argument("name")
        v.set_defaults(fn=fn)

    jobs = verbs("jobs", "customization jobs")
    v = jobs.add_parser("create", help="submit a training job (or a learning-rate sweep with --sweep)")
    v.add_argument("--config", required=True, help="a job YAML (or a sweep YAML with --sweep)")
    v.add_argument("--output-model", required=True, help="the model entity the job creates")
    v.add_argument("--sweep", action="store_true", help="the file is a learning-rate sweep")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--wait", action="store_true", help="follow the job with a progress bar")
    v.set_defaults(fn=jobs_create)
    jobs.add_parser("list", help="every job, newest first").set_defaults(fn=jobs_list)
    for verb, fn, help in (("get", jobs_get, "one job as JSON"), ("logs", jobs_logs, "the job's Ray log"),
                           ("wait", jobs_wait, "follow a job with a progress bar until it ends"),
                           ("cancel", jobs_cancel, "stop a job"),
                           ("resume", jobs_resume, "submit a failed or cancelled job again, from its last checkpoint"),
                           ("delete", jobs_delete, "a finished job and its folder (checkpoints, output); delete the "
                                                   "model it made first")):
        v = jobs.add_parser(verb, help=help)
        v.add_argument("id")
        if verb == "resume":
            v.add_argument("--wait", action="store_true", help="follow the job with a progress bar")
        v.set_defaults(fn=fn)

    deps = verbs("deployments", "model deployments: list, get, verify, export to another cluster")
    deps.add_parser("list", help="every deployment with its status and model").set_defaults(fn=deployments_list)
    v = deps.add_parser("get", help="one deployment as JSON")
    v.add_argument("name")
    v.set_defaults(fn=deployments_get)
    v = deps.add_parser("verify", help="score the model's evaluation set through the deployment's replicas again "
                                       "(exit 1 when it falls short of the job's figure)")
    v.add_argument("name")
    v.set_defaults(fn=deployments_verify)
    v = deps.add_parser("export", help="a manifest that serves the deployment's model on another cluster (KubeRay "
                                       "RayService: a serving-only cluster; the model must be in shared storage)")
    v.add_argument("name")
    v.add_argument("--format", choices=["rayservice"], default="rayservice")
    v.add_argument("--image", help="the node image its pods run (default: the platform's RAYEMBED_IMAGE, else "
                                   "rayembed:VERSION-gpu): what you built from deploy/Dockerfile")
    v.add_argument("--k8s-name", help="the RayService's name (default: the deployment's, made a Kubernetes name)")
    v.add_argument("--output", "-o", help="write it to this file (default: stdout)")
    v.set_defaults(fn=deployments_export)

    s = sub.add_parser("deploy", help="deploy a model entity (or swap an existing deployment to another model)")
    s.add_argument("name")
    s.add_argument("--model", required=True)
    s.add_argument("--replicas", type=int)
    s.add_argument("--num-cpus", type=float)
    s.add_argument("--num-gpus", type=float)
    s.add_argument("--default-dimensions", type=int, help="the size served when a request omits dimensions (the "
                                                          "model's report card suggests one: rayembed models get)")
    s.add_argument("--require-improved", action="store_true", default=None,
                   help="serve the model only if its job's 95%% interval lies above zero")
    s.add_argument("--allow-worse", action="store_true", help="deploy even if the job's evaluation says worse than base "
                                                              "(or not improved, with --require-improved)")
    s.add_argument("--no-wait", action="store_true")
    s.set_defaults(fn=cmd_deploy)

    s = sub.add_parser("undeploy", help="delete a deployment (its provider and routes go with it)")
    s.add_argument("name")
    s.add_argument("--no-wait", action="store_true")
    s.set_defaults(fn=cmd_undeploy)

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
