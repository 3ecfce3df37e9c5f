"""The README's main command: the story runs to the end and its summary proves the claims
(the attack is contained, legitimate traffic still flows, nothing legitimate was blocked).
Recorded flows without root; live hosts, agents and nftables as root."""

from __future__ import annotations

import json
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
    assert not (tmp_path / "lab" / "state.json").exists()  # the lab is gone
