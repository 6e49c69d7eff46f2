"""Joining Ray: a stale `ray start` address file must not make a job hang."""

import socket

import cluster.runtime as runtime


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
