"""The whole story through the control plane (after `rayembed up`), on the embedded default:

    python examples/quickstart.py

Registers the packaged all-MiniLM-L6-v2 (exported to ONNX and verified once), uploads the shipped Debian
sample as a dataset (over HTTP, so the cluster may be anywhere), fine-tunes it with LoRA merged as a
customization job (a Ray job), follows it with a progress bar, prints base vs tuned, deploys the result,
and embeds through the model-entity route, the provider route and the official openai client.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a source checkout

from cluster.cli import evaluation_table, follow_job  # noqa: E402
from cluster.client import ApiError, Client  # noqa: E402
from cluster.settings import settings  # noqa: E402


DATA = ROOT / "data" / "debian-pkgdesc-sample"
DATASET = "debian-sample"


def job_config(model: str, max_steps: int | None) -> dict:
    return {
        "model": model, "name": "quickstart",  # the model entity registered in step 1: a job names entities
        "dataset": {"name": DATASET},  # the uploaded files, wherever the job runs
        "training": {"finetuning_type": "lora_merged", "max_seq_length": 128, "lora": {"rank": 16, "alpha": 32}},
        "schedule": {"max_steps": max_steps} if max_steps else {"epochs": 1},
        "batch": {"global_batch_size": 32},
        "optimizer": {"learning_rate": 1e-4},  # LoRA moves fewer weights: a higher rate than full SFT's
        "loss": {"temperature": 0.05, "negatives_per_query": 1, "in_batch_negatives": True},
        "output": {"checkpoint_every_steps": 50, "log_every_steps": 2},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="the API (default: what `rayembed up` started)")
    parser.add_argument("--base-model", default="all-MiniLM-L6-v2")
    parser.add_argument("--name", default="minilm", help="model entity name of the base model")
    parser.add_argument("--max-steps", type=int, default=None, help="train this many steps instead of one epoch")
    args = parser.parse_args(argv)
    client = Client(base_url=args.base_url or settings().base_url, workspace="default")
    tuned, started = f"{args.name}-debian", time.monotonic()

    print(f"1. register the base model {args.base_model} as '{args.name}' (exported to ONNX and verified once)")
    try:
        client.models.create(args.name, base_model=args.base_model)
    except ApiError as exc:
        if exc.status != 409:  # already registered by an earlier run: reuse it
            raise
    base = client.models.wait_ready(args.name)
    print(f"   {base.name}: {base.embedding_dim}-d, max {base.max_seq_length} tokens, {base.artifact.uri}")

    print(f"2. upload the Debian sample as dataset '{DATASET}' (validated line by line, stored in the cluster's storage)")
    try:
        ds = client.datasets.create(DATASET, training=str(DATA / "train.jsonl"), evaluation=str(DATA / "eval"))
    except ApiError as exc:
        if exc.status != 409:  # created by an earlier run: reuse it, finishing its upload if that stopped halfway
            raise
        ds = client.datasets.retrieve(DATASET)
        if len(ds.files) < 4:
            ds = client.datasets.upload(DATASET, training=str(DATA / "train.jsonl"), evaluation=str(DATA / "eval"))
    print(f"   {', '.join(f'{p} ({f.records} records)' for p, f in ds.files.items())}")

    print(f"3. customization job: LoRA merged on the Debian sample -> model '{tuned}'")
    for job in client.customization.jobs.list():  # a finished earlier run already made it
        if job.output_model == tuned and job.status == "completed":
            break
    else:
        job = client.customization.jobs.create(output_model=tuned, config=job_config(args.name, args.max_steps))
        print(f"   job {job.name} (Ray job id {job.ray_job_id}, see the dashboard's Jobs view)")
        job = follow_job(client, job.name)
        if job.status != "completed":
            print(f"job {job.status}:\n{job.error}", file=sys.stderr)
            return 1
    model = client.models.retrieve(tuned)
    print(evaluation_table(model.evaluation))

    print(f"4. deploy '{tuned}'")
    try:
        client.deployments.create(tuned, model=tuned, num_cpus=1)
    except ApiError as exc:
        if exc.code == "promotion_refused":  # the gate works; the demo deploys anyway, and says so
            print(f"   refused: {exc.message}\n   deploying anyway with allow_worse (a demo)")
            client.deployments.create(tuned, model=tuned, num_cpus=1, allow_worse=True)
        elif exc.status != 409:
            raise
    deployed = time.monotonic()
    client.deployments.wait_ready(tuned)
    print(f"   READY in {time.monotonic() - deployed:.1f} s")

    texts = ["convert images between formats", "a daemon that watches disks"]
    print("5. embed through the gateway")
    body = {"input": texts, "input_type": "query"}
    by_model = client.inference.gateway.model.post("v1/embeddings", name=tuned, body=body)
    by_provider = client.inference.gateway.provider.post("v1/embeddings", name=tuned, workspace="default", body=body)
    openai = client.models.get_openai_client().embeddings.create(model=tuned, input=texts, dimensions=model.embedding_dim)
    for route, out in (("model entity", by_model), ("provider", by_provider)):
        v = out.data[0].embedding
        print(f"   {route:<13} {len(out.data)} x {len(v)}-d  [{', '.join(f'{x:+.4f}' for x in v[:4])}, ...]  "
              f"{out.usage.prompt_tokens} tokens")
    v = openai.data[0].embedding
    print(f"   {'openai SDK':<13} {len(openai.data)} x {len(v)}-d  [{', '.join(f'{x:+.4f}' for x in v[:4])}, ...]")
    print(f"done in {time.monotonic() - started:.0f} s; `rayembed status` shows everything, `rayembed down` stops it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
