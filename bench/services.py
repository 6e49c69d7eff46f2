"""Real services the cluster tests start on loopback: a PostgreSQL 15 server (Debian's, run as the `postgres`
user in a temporary folder) and an S3 endpoint (moto's server mode)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from rayembed.runtime import free_port

PG_BIN = Path(os.environ.get("RAYEMBED_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _as_postgres(cmd: list[str]) -> list[str]:
    return cmd if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def postgres_server():
    """A fresh PostgreSQL server; yields (its SQLAlchemy URL: database `rayembed`, user `postgres`, password set;
    a function that stops it)."""
    if not (PG_BIN / "initdb").is_file():
        raise RuntimeError(f"PostgreSQL is not installed at {PG_BIN}: apt-get install postgresql-15 (or set RAYEMBED_PG_BIN)")
    folder = Path(tempfile.mkdtemp(prefix="rayembed-pg-"))
    data, port, password = folder / "data", free_port(), uuid.uuid4().hex
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    pwfile = folder / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    run = lambda cmd: subprocess.run(_as_postgres(cmd), check=True, capture_output=True, text=True, timeout=120)
    stop = lambda: subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                                  capture_output=True, timeout=60)
    try:
        run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}"])
        run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
             f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"])
        env = {**os.environ, "PGPASSWORD": password}
        subprocess.run(_as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                     "rayembed"]), check=True, capture_output=True, env=env, timeout=60)
        yield f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port}/rayembed", stop
    finally:
        stop()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def s3_server(bucket: str = "rayembed-test"):
    """moto's S3 on loopback with one bucket; yields the environment a process needs to reach it
    (AWS_ENDPOINT_URL and credentials, read by pyarrow and boto3 alike)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=bucket)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
