"""The README's main command: the story runs to the end and its summary proves the claims
(the attack is contained, legitimate traffic still flows, nothing legitimate was blocked).
Recorded flows without root; live hosts, agents and nftables as root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bulkhead.cli.main import app


def _check(summary: dict[str, object]) -> None:
    assert summary["contained"] is True and summary["legitimate_ok"] is True
    assert summary["legit_would_block"] == 0 and summary["legit_failed"] == []
    before, after = summary["attack_before"], summary["attack_after"]
    assert isinstance(before, list) and isinstance(after, list)
    assert len(before) > len(after)
    assert summary["attack_after_allowed"] == len(after)
    assert summary["rules"] and summary["flows_seen"] and summary["labels_imported"]
    assert summary["coverage_train"] == 1.0


@pytest.mark.parametrize("topology", ["shop", "microservices", "office"])
def test_the_demo_on_recorded_flows(tmp_path: Path, topology: str) -> None:
    out = tmp_path / "summary.json"
    r = CliRunner().invoke(app, ["demo", "--recorded", "--exit", "-t", topology,
                                 "--summary", str(out)])
    assert r.exit_code == 0, r.output
    assert "contained" in r.output and "nothing legitimate blocked" in r.output
    s = json.loads(out.read_text())
    assert s["mode"] == "recorded"
    _check(s)


def test_an_unknown_topology_is_a_usage_error() -> None:
    r = CliRunner().invoke(app, ["demo", "--recorded", "--exit", "-t", "nope"])
    assert r.exit_code == 2 and "no topology file 'nope'" in r.output


def test_an_invalid_topology_names_the_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  - name: A!\n")
    r = CliRunner().invoke(app, ["demo", "--recorded", "--exit", "-t", str(bad)])
    assert r.exit_code == 2, r.output
    assert "bad.yaml:2: hosts[0].name: invalid host name" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


_SIGTERM_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from rich.console import Console
import bulkhead.cli.demo as demo
import bulkhead.demo.live as live
from bulkhead.lab.runner import Lab

def fake_run_live(topology, console, traffic_s):
    os.kill(os.getpid(), signal.SIGTERM)  # stopped half-way through the story
    time.sleep(5)
    raise AssertionError("SIGTERM did not interrupt")

def fake_down(self, *, keep_logs=False):
    print("TEARDOWN", keep_logs, flush=True)
    return []

demo._why_not_live = lambda: None
live.run_live = fake_run_live
Lab.down = fake_down
try:
    demo.run(Path(sys.argv[1]), live=True, exit_=True, traffic_s=10, summary_file=None,
             console=Console())
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
"""


def test_sigterm_during_the_live_demo_still_removes_the_lab(tmp_path: Path) -> None:
    import subprocess
    import sys

    from bulkhead.demo.story import examples_dir

    cp = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT,
                         str(examples_dir() / "topologies" / "shop.yaml")],
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, "BULKHEAD_LAB_DIR": str(tmp_path / "lab")})
    assert cp.returncode == 0, cp.stderr
    assert "TEARDOWN True" in cp.stdout and "INTERRUPTED" in cp.stdout


@pytest.mark.privileged
def test_the_demo_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULKHEAD_LAB_DIR", str(tmp_path / "lab"))
    out = tmp_path / "summary.json"
    r = CliRunner().invoke(app, ["demo", "--live", "--exit", "--traffic-seconds", "15",
                                 "--summary", str(out)])
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())
    assert s["mode"] == "live" and s["provisioned_version"]
    _check(s)
    assert s["legit_probes"] > 0
    assert s["agents"] and s["agents_enforcing"] == s["agents"]  # every agent enforced
    assert not (tmp_path / "lab" / "state.json").exists()  # the lab is gone


def test_the_live_summary_says_how_many_agents_enforce() -> None:
    from rich.console import Console

    from bulkhead.demo.live import _in_sync
    from bulkhead.demo.story import Summary, render

    class FakeLab:  # the agents API as the control plane answers it
        def api(self, method: str, path: str) -> list[dict[str, object]]:
            assert (method, path) == ("GET", "/agents?state=paired&limit=5000")
            return [{"in_sync": True, "applied_enforcement": "full"},
                    {"in_sync": True, "applied_enforcement": "visibility"},  # not enforcing yet
                    {"in_sync": False, "applied_enforcement": "full"}]

    assert _in_sync(FakeLab()) == (1, 3)
    console = Console(record=True, width=200)
    render(console, Summary(mode="live", topology="t", provisioned_version=4, agents=3,
                            agents_enforcing=1))
    assert "version 4, full enforcement applied by 1/3 agents" in console.export_text()


@pytest.mark.privileged
def test_the_live_demo_leaves_a_lab_that_is_up_alone(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    state = lab_dir / "state.json"
    state.write_text('{"version": 1, "status": "up"}')
    monkeypatch.setenv("BULKHEAD_LAB_DIR", str(lab_dir))
    r = CliRunner().invoke(app, ["demo", "--live", "--exit"])
    assert r.exit_code == 2 and "a lab is up" in r.output
    assert state.read_text() == '{"version": 1, "status": "up"}'
