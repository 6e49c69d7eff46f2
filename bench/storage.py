"""Storage throughput against an S3 endpoint (moto on loopback): publish (upload with a SHA-256 per file and the
seal) and materialize (download into the node cache, every file verified) against a plain `pyarrow.fs.copy_files`
of the same files in the same run; then a replica's time from deploy to its first embedding, cold and warm cache.

    python -m bench.storage --model-dir runs/minilm-onnx --big-gb 5 --rounds 2

`--model-dir`: an ONNX artifact (python -m train.export --model all-MiniLM-L6-v2 --output DIR); `--big-gb`: a
second folder with one file of that size (random bytes: an external-data graph of a nemotron-sized model).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from rayembed.runtime import init_ray


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_files(src: str, dest: str) -> None:
    """pyarrow's own copy, with the chunk size our reads use (its 1 MiB default crawls on moto's range reads)."""
    from pyarrow import fs

    from rayembed.storage import CHUNK

    src_fs, src_path = fs.FileSystem.from_uri(src) if "://" in src else (fs.LocalFileSystem(), src)
    dst_fs, dst_path = fs.FileSystem.from_uri(dest) if "://" in dest else (fs.LocalFileSystem(), dest)
    dst_fs.create_dir(dst_path, recursive=True)
    fs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs, chunk_size=CHUNK)


def measure(label: str, folder: Path, rounds: int, scratch: Path) -> None:
    from rayembed import cache, storage

    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    for r in range(rounds):
        ours_up = timed(lambda: storage.publish(str(folder), f"s3://rayembed-bench/{label}-{r}/ours"))
        plain_up = timed(lambda: copy_files(str(folder), f"s3://rayembed-bench/{label}-{r}/plain"))
        root = scratch / f"cache-{label}-{r}"
        ours_down = timed(lambda: cache.materialize(f"s3://rayembed-bench/{label}-{r}/ours", root=root))
        plain_down = timed(lambda: copy_files(f"s3://rayembed-bench/{label}-{r}/plain", str(scratch / f"plain-{label}-{r}")))
        print(f"{label:<8} {size:9.1f} MiB  round {r + 1}: publish {size / ours_up:7.1f} MiB/s vs copy_files "
              f"{size / plain_up:7.1f} MiB/s ({plain_up / ours_up:.2f}x); materialize {size / ours_down:7.1f} MiB/s vs "
              f"copy_files {size / plain_down:7.1f} MiB/s ({plain_down / ours_down:.2f}x)", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(scratch / f"plain-{label}-{r}", ignore_errors=True)
        storage.delete_tree(f"s3://rayembed-bench/{label}-{r}")


def deploy_to_ready(model_dir: Path, scratch: Path) -> None:
    """A provider application on a local Ray serving the artifact from S3: cold cache, then warm."""
    import ray
    from ray import serve

    from rayembed import storage
    from serve.app import build_provider_app

    seal = storage.publish(str(model_dir), "s3://rayembed-bench/deploy/onnx")
    os.environ["RAYEMBED_CACHE"] = str(scratch / "node-cache")  # the replica's node cache (inherited by Ray)
    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for state in ("cold", "warm"):
            start = time.perf_counter()
            serve.run(build_provider_app({"name": "bench", "model_dir": "s3://rayembed-bench/deploy/onnx",
                                          "model_sha256": seal["sha256"], "num_cpus": 1}), name="bench", route_prefix=None)
            serve.get_app_handle("bench").embed.remote(["ready?"], "query", "END", None).result(timeout_s=120)
            print(f"deploy -> first embedding, {state} cache: {time.perf_counter() - start:.1f} s", flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, type=Path, help="an ONNX artifact folder")
    p.add_argument("--big-gb", type=float, default=5.0, help="size of the one-file folder (0: skip)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    from bench.services import s3_server

    with s3_server("rayembed-bench"), tempfile.TemporaryDirectory(prefix="rayembed-bench-") as tmp:
        scratch = Path(tmp)
        measure("minilm", args.model_dir, args.rounds, scratch)
        if args.big_gb > 0:
            big = scratch / "big"
            big.mkdir()
            with (big / "model.onnx.data").open("wb") as fh:
                for _ in range(int(args.big_gb * 1024)):
                    fh.write(os.urandom(2**20))
            measure("big", big, args.rounds, scratch)
            shutil.rmtree(big)
        deploy_to_ready(args.model_dir, scratch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
