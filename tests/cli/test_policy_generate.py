"""`bulkhead policy generate` as users script it (docs/policy-semantics.md §5): the draft
loads with every other command and its generated tests pass; the report has the contract's
keys; bad input is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bulkhead.cli.main import app
from bulkhead.domain.model import Policy
from bulkhead.policy.fileformat import dump_policy, load_policy
from tests.generate.helpers import DAY, T0, estate, two_days, write_csv

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    policy, intents = estate(apps=3)
    src = tmp_path / "estate.yaml"
    src.write_text(dump_policy(Policy(workloads=policy.workloads)))
    flows = tmp_path / "flows.csv"
    write_csv(flows, two_days(policy, intents, n=4000))
    return src, flows


def test_generate_draft_loads_tests_pass_and_report_has_contract_keys(tmp_path: Path) -> None:
    src, flows = _inputs(tmp_path)
    draft, report = tmp_path / "draft.yaml", tmp_path / "report.json"
    code, out, err = run("policy", "generate", str(src), "--flows", str(flows), "--out",
                         str(draft), "--train-until", str(T0 + DAY), "--report", str(report),
                         "--crown-jewel", "role=db")
    assert code == 0, err
    assert "rules" in out
    data = json.loads(report.read_text())
    for key in ("coverage_train", "coverage_test", "over_permission", "rules"):
        assert key in data
    assert data["coverage_train"] == 1.0
    assert data["coverage_test"] >= 0.99
    assert data["over_permission"] <= 0.05
    p = load_policy(str(draft))
    assert len(p.rulesets) >= 3 and p.tests
    assert any(t.expect == "blocked" for t in p.tests)  # the crown jewel stays denied
    assert run("policy", "validate", str(draft))[0] == 0
    code, out, _ = run("policy", "test", str(draft))
    assert code == 0 and " 0 failed" in out
    code, out, _ = run("policy", "evaluate", str(draft), "--flows", str(flows))
    assert code == 0 and "allowed" in out


def test_generate_at_each_granularity_and_scope(tmp_path: Path) -> None:
    src, flows = _inputs(tmp_path)
    for g in ("env", "app", "tier", "service", "process"):
        draft = tmp_path / f"{g}.json"
        code, _, err = run("policy", "generate", str(src), "--flows", str(flows), "--out",
                           str(draft), "--granularity", g, "--scope", "app=app1")
        assert code == 0, (g, err)
        p = load_policy(str(draft))
        assert p.rulesets and run("policy", "test", str(draft))[0] == 0


def test_generate_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    src, flows = _inputs(tmp_path)
    out = str(tmp_path / "d.yaml")
    code, _, err = run("policy", "generate", str(src), "--flows", str(flows), "--out", out,
                       "--granularity", "rack")
    assert code == 2 and "granularity" in err
    code, _, err = run("policy", "generate", str(src), "--flows", str(flows), "--out", out,
                       "--scope", "app")
    assert code == 2 and "--scope" in err
    code, _, err = run("policy", "generate", str(src), "--flows", str(flows), "--out", out,
                       "--noise", "dns,gossip")
    assert code == 2 and "gossip" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("src_ip,dst_ip,proto,dst_port,ts\n10.0.1.1,10.0.1.2,tcp,80,yesterday\n")
    code, _, err = run("policy", "generate", str(src), "--flows", str(bad), "--out", out)
    assert code == 1 and ":2: ts:" in err


def test_an_unwritable_output_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    src, flows = _inputs(tmp_path)
    report = tmp_path / "report.json"
    code, _, err = run("policy", "generate", str(src), "--flows", str(flows),
                         "--out", str(tmp_path / "missing" / "draft.yaml"),
                         "--report", str(report))
    assert code == 1
    assert "cannot write" in err and "missing" in err
    assert not report.exists() and not list(tmp_path.glob(".*.tmp"))
