"""Unprivileged parts of the lab runner and CLI: arguments, names, the traffic generator."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bulkhead.cli.main import app
from bulkhead.lab import responder, traffic
from bulkhead.lab.runner import Lab, UsageError, _agent_url, lab_prefix, parse_probe_port
from bulkhead.lab.topology import loads_topology


def test_parse_probe_port() -> None:
    assert parse_probe_port("tcp/22") == ("tcp", 22)
    assert parse_probe_port(" UDP/53 ") == ("udp", 53)
    assert parse_probe_port("icmp") == ("icmp", 0)
    for bad in ("tcp", "tcp/0", "tcp/70000", "sctp/1", "22"):
        with pytest.raises(UsageError):
            parse_probe_port(bad)


def test_prefix_is_per_state_dir_and_fits_interface_names(tmp_path: Path) -> None:
    a, b = lab_prefix(tmp_path / "a"), lab_prefix(tmp_path / "b")
    assert a != b and a == lab_prefix(tmp_path / "a")
    assert len(a + "gw") <= 15 and a.startswith("bhl")


def test_agent_url_rewrites_loopback_to_the_gateway() -> None:
    topo = loads_topology("network: 10.90.0.0/24\nhosts: [{name: a}]\n")
    assert _agent_url("http://127.0.0.1:8443", topo) == "http://10.90.0.1:8443"
    assert _agent_url("http://localhost:8443/x", topo) == "http://10.90.0.1:8443/x"
    assert _agent_url("https://cp.example:8443", topo) == "https://cp.example:8443"


def test_no_lab_is_a_usage_error(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "nothing")
    with pytest.raises(UsageError, match="no lab is up"):
        lab.status()
    assert lab.leftovers() == [] or os.geteuid() != 0


def test_cli_invalid_topology_exits_2_naming_the_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  - {name: a, serve: [tcp/80]}\n"
                   "traffic:\n  - {from: a, to: b, port: tcp/80, every: 1s}\n")
    result = CliRunner().invoke(app, ["lab", "up", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml:4: traffic[0].to: unknown host 'b'" in result.output


def test_traffic_generator_follows_its_schedule(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    resp = subprocess.Popen([sys.executable, "-I", responder.__file__, "--tcp", str(port),
                             "--udp", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert resp.stdout is not None and resp.stdout.readline().startswith("READY")
        status = tmp_path / "t.status"
        spec = tmp_path / "t.json"
        spec.write_text(json.dumps({"host": "t", "timeout": 1.0, "status": str(status),
                                    "schedules": [
            {"path": "traffic[0]", "proto": "tcp", "port": port, "every": 0.2, "phase": 0.0,
             "first": 0, "dst": ["127.0.0.1"]},
            {"path": "noise[0]", "proto": "udp", "port": port, "every": 0.5, "phase": 0.1,
             "first": 0, "dst": ["127.0.0.1"]},
            {"path": "traffic[1]", "proto": "tcp", "port": 9, "every": 0.5, "phase": 0.0,
             "first": 0, "dst": ["127.0.0.1"]}]}))
        gen = subprocess.Popen([sys.executable, "-I", traffic.__file__, str(spec)],
                               stdout=subprocess.PIPE, text=True)
        assert gen.stdout is not None and gen.stdout.readline().startswith("READY")
        time.sleep(2.1)
        gen.send_signal(signal.SIGTERM)
        assert gen.wait(10) == 0
        edges = {e["path"]: e for e in json.loads(status.read_text())["edges"]}
        assert 6 <= edges["traffic[0]"]["ok"] <= 12 and edges["traffic[0]"]["failed"] == 0
        assert 2 <= edges["noise[0]"]["ok"] <= 5
        assert edges["traffic[1]"]["ok"] == 0 and edges["traffic[1]"]["failed"] >= 3
        assert edges["traffic[1]"]["last_error"]  # refused, with the reason
    finally:
        resp.terminate()
        resp.wait(10)
