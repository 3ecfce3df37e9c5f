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


def test_down_leaves_a_directory_that_is_not_a_labs_alone(tmp_path: Path) -> None:
    # BULKHEAD_LAB_DIR pointed at a directory of one's own: its logs/ and bin/ are not the lab's.
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "keep").write_text("mine")
    (tmp_path / "bin").mkdir()
    (tmp_path / "topology.yaml").write_text("hosts: []\n")
    Lab(tmp_path).down()
    assert (tmp_path / "logs" / "keep").read_text() == "mine"
    assert (tmp_path / "bin").is_dir() and (tmp_path / "topology.yaml").exists()


def test_down_removes_what_a_lab_wrote_in_its_state_dir(tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    lab = Lab(lab_dir)
    lab_dir.mkdir()
    (lab_dir / ".bulkhead-lab").write_text(lab.prefix)
    for d in ("logs", "bin", "traffic"):
        (lab_dir / d).mkdir()
    (lab_dir / "logs" / "server.log").write_text("x")
    lab.down(keep_logs=True)  # a failed up: the logs stay, and so does the marker
    assert (lab_dir / "logs" / "server.log").exists() and not (lab_dir / "bin").exists()
    lab.down()
    assert not lab_dir.exists()


def test_down_goes_on_past_a_cgroup_it_cannot_remove(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from bulkhead.lab import runner

    lab = Lab(tmp_path / "lab")
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "cgroup2_mount", lambda: str(tmp_path / "cg"))
    (tmp_path / "cg" / lab.prefix).mkdir(parents=True)
    monkeypatch.setattr(runner, "_remove_cgroup_tree", lambda base: [f"cgroup {base}: busy"])
    monkeypatch.setattr(lab, "_namespaces", lambda: [f"{lab.prefix}-web"])

    def fake_run(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0 if argv[:2] == ["ip", "link"] else 1, "", "")

    monkeypatch.setattr(runner, "_run", fake_run)
    with pytest.raises(runner.LabError, match=r"teardown incomplete: cgroup .*busy"):
        lab.down()
    # the namespaces and the gateway link were still removed
    assert ["ip", "netns", "del", f"{lab.prefix}-web"] in calls
    assert ["ip", "link", "del", f"{lab.prefix}gw"] in calls


def test_a_failed_up_says_when_its_cleanup_failed_too(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from bulkhead.lab import runner

    topo = tmp_path / "t.yaml"
    topo.write_text("network: 10.90.0.0/24\nhosts: [{name: a}]\n")
    lab = Lab(tmp_path / "lab")
    real_down = lab.down

    def build(*_: object, **__: object) -> None:
        raise runner.LabError("agents not online")

    def down(*, keep_logs: bool = False) -> list[str]:
        if keep_logs:  # the cleanup after the failure
            raise runner.LabError("cgroup busy")
        return real_down()

    monkeypatch.setattr(lab, "_build", build)
    monkeypatch.setattr(lab, "down", down)
    with pytest.raises(runner.LabError) as err:
        lab.up(topo, agents=False)
    assert "agents not online" in str(err.value) and "cgroup busy" in str(err.value)
    real_down()
