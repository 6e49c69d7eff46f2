"""Joining Ray: a stale `ray start` address file must not make a job hang."""

import socket

import pytest

import rayembed.runtime as runtime


def test_stale_address_file_is_ignored_and_live_one_used(tmp_path, monkeypatch):
    address_file = tmp_path / "ray_current_cluster"
    monkeypatch.setattr(runtime, "ADDRESS_FILE", address_file)
    assert runtime.local_cluster_address() is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address_file.write_text(f"127.0.0.1:{port}")  # nobody listens there any more
    assert runtime.local_cluster_address() is None
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        address_file.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert runtime.local_cluster_address() == f"127.0.0.1:{live.getsockname()[1]}"


def test_free_port_stays_out_of_the_ephemeral_range_and_never_repeats():
    """A port from `bind(0)` is one the kernel also gives outgoing connections: Ray's can take it before our
    server binds it. free_port answers below that range, free, and never twice in one process."""
    lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    ports = [runtime.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(runtime.PORT_RANGE[0] <= p < runtime.PORT_RANGE[1] and not lo <= p <= hi for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when handed out


def test_free_port_skips_a_port_someone_listens_on(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("RAYEMBED_PORT_RANGE", f"{port}-{port + 1}")
        with pytest.raises(RuntimeError, match="no free TCP port"):
            runtime.free_port()


def _gone(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"  # killed, waiting to be reaped


def test_kill_processes_takes_a_heads_children_that_name_nothing(tmp_path):
    """`rayembed down` kills its head by what names its temp dir; the raylet's dashboard and runtime-env agents
    name nothing of it and outlived `down` (seen 2026-11-29). Their parent does: they go too; a stranger stays."""
    import subprocess
    import sys
    import time

    from cluster.local import kill_processes

    temp_dir = tmp_path / "head-session"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    spawn = f"import subprocess, time; c = subprocess.Popen({sleeper!r}); print(c.pid, flush=True); time.sleep(60)"
    head = subprocess.Popen([sys.executable, "-c", spawn, str(temp_dir)], stdout=subprocess.PIPE, text=True)
    stranger = subprocess.Popen(sleeper)
    # the Ray Client server names only the head's GCS address (seen outliving `down` 2026-11-29); another head's stays
    client = subprocess.Popen(sleeper + ["--address=192.0.2.7:23189", "--mode=proxy"])
    other = subprocess.Popen(sleeper + ["--address=192.0.2.7:23180"])
    try:
        agent = int(head.stdout.readline())
        kill_processes(temp_dir, "192.0.2.7:23189")
        head.wait(10)
        client.wait(10)
        assert other.poll() is None
        deadline = time.monotonic() + 10
        while not _gone(agent):
            assert time.monotonic() < deadline, "the head's child outlived it"
            time.sleep(0.05)
        assert stranger.poll() is None
    finally:
        for proc in (stranger, head, client, other):
            proc.kill()


def test_free_port_keeps_to_rayembed_port_range(monkeypatch):
    monkeypatch.setenv("RAYEMBED_PORT_RANGE", "23000-23010")
    ports = {runtime.free_port() for _ in range(5)}
    assert all(23000 <= p < 23010 for p in ports) and len(ports) == 5
    monkeypatch.setenv("RAYEMBED_PORT_RANGE", "23010-23000")
    with pytest.raises(ValueError, match="RAYEMBED_PORT_RANGE='23010-23000': expected 1024 <= LO < HI"):
        runtime.free_port()
