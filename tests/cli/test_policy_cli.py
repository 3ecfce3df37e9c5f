"""`bulkhead policy …` as users script it: exit codes, stdout, one error per line on stderr."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bulkhead.cli.main import app
from bulkhead.policy.fileformat import load_policy

ROOT = Path(__file__).resolve().parents[2]
SHOP = str(ROOT / "examples" / "policies" / "shop.yaml")
SHOP2 = str(ROOT / "examples" / "policies" / "shop-v2.yaml")
FLOWS = str(ROOT / "examples" / "flows" / "shop.csv")
runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_validate_ok_and_errors(tmp_path: Path) -> None:
    code, out, _ = run("policy", "validate", SHOP)
    assert code == 0 and "valid" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("workloads:\n  - {name: a, ips: [10.0.0.300]}\n  - {name: a}\n")
    code, out, err = run("policy", "validate", str(bad))
    assert code == 1
    lines = err.strip().splitlines()
    assert lines == [f"{bad}:2: workloads[0].ips[0]: not an IP address: '10.0.0.300'",
                     f"{bad}:3: workloads[1].name: duplicate workload name 'a' "
                     "(first at workloads[0])"]


def test_validate_reports_rule_that_can_never_match(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("""rulesets:
  - name: r
    scopes: [{app: b}]
    rules: [{action: allow, consumers: [{all_workloads: true}],
             providers: [{labels: {app: a}}], services: [any]}]
""")
    code, _, err = run("policy", "validate", str(f))
    assert code == 1 and "rulesets[0].rules[0]" in err


def test_evaluate_csv_and_jsonl() -> None:
    code, out, _ = run("policy", "evaluate", SHOP, "--flows", FLOWS)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    src = list(csv.DictReader(io.StringIO(Path(FLOWS).read_text())))
    assert len(rows) == len(src)
    assert [r["src_ip"] for r in rows] == [r["src_ip"] for r in src]
    by = {(r["src_ip"], r["dst_ip"], r["dst_port"]): r for r in rows}
    assert by[("10.0.1.10", "10.0.1.20", "8080")]["decision"] == "allowed"
    assert by[("10.0.1.10", "10.0.1.20", "8080")]["rules"] == "web-api"
    assert by[("10.0.5.10", "10.0.2.10", "443")]["decision"] == "blocked_by_override_deny"
    assert by[("10.0.5.10", "10.0.5.30", "3306")]["decision"] == "allowed_across_boundary"
    assert by[("10.0.5.10", "10.0.5.30", "3306")]["rules"] == "web-dev-db;no-db-from-web"
    code, out, _ = run("policy", "evaluate", SHOP, "--flows", FLOWS, "--format", "jsonl")
    recs = [json.loads(line) for line in out.splitlines()]
    assert len(recs) == len(src) and recs[0]["decision"] == "allowed"
    assert recs[0]["side"] == "provider"


def test_evaluate_bad_flows_names_line(tmp_path: Path) -> None:
    f = tmp_path / "f.csv"
    f.write_text("src_ip,dst_ip,proto,dst_port\n10.0.0.1,10.0.0.2,tcp,80\n10.0.0.1,x,tcp,80\n")
    code, _, err = run("policy", "evaluate", SHOP, "--flows", str(f))
    assert code == 1
    assert err.strip() == f"{f}:3: dst_ip: not an IP address: 'x'"


def test_compile_targets() -> None:
    code, out, _ = run("policy", "compile", SHOP, "--workload", "db-1", "--target", "nftables",
                       "--control-plane", "10.0.0.2:8443")
    assert code == 0 and "table inet bulkhead" in out and "10.0.0.2" in out
    code, out, _ = run("policy", "compile", SHOP, "--workload", "db-1", "--target", "iptables")
    assert code == 0 and "*filter" in out and "COMMIT" in out
    code, _, err = run("policy", "compile", SHOP, "--workload", "db-1", "--target", "windows")
    assert code == 2 and "not available" in err
    code, _, err = run("policy", "compile", SHOP, "--workload", "nope")
    assert code == 1 and "no workload named 'nope'" in err


def test_lint_exit_codes() -> None:
    code, out, _ = run("policy", "lint", SHOP)
    assert code == 0 and "never-matches-in-scope" in out


def test_diff_is_semantic() -> None:
    code, out, _ = run("policy", "diff", SHOP, SHOP2, "--format", "json")
    assert code == 0
    data = json.loads(out)
    allowed = {(c["consumer"], c["provider"], c["service"]) for c in data["newly_allowed"]}
    blocked = {(c["consumer"], c["provider"], c["service"]) for c in data["newly_blocked"]}
    assert ("web-1", "api-1", "tcp/9090") in allowed
    assert any(p == "db-1" and s == "tcp/22" for _, p, s in blocked)
    assert ["db-1", "selective", "full"] in [list(e) for e in data["enforcement"]]
    code, _, _ = run("policy", "diff", SHOP, SHOP, "--exit-code")
    assert code == 0
    code, _, _ = run("policy", "diff", SHOP, SHOP2, "--exit-code")
    assert code == 1


def test_policy_tests_pass_and_fail(tmp_path: Path) -> None:
    code, out, _ = run("policy", "test", SHOP)
    assert code == 0 and out.strip().endswith("4 passed, 0 failed")
    f = tmp_path / "p.yaml"
    f.write_text(Path(SHOP).read_text().replace(
        "{from: web-1, to: db-1, port: tcp/3306, expect: blocked}",
        "{from: web-1, to: db-1, port: tcp/3306, expect: allowed}"))
    code, out, _ = run("policy", "test", str(f))
    assert code == 1
    assert "FAIL tests[3]: web-1 -> db-1 tcp/3306 expect allowed" in out
    assert "web-1 -> db-1: blocked_by_deny (side: provider; rules: no-db-from-web)" in out
    assert out.strip().endswith("3 passed, 1 failed")


def test_fmt_write_round_trips(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    shutil.copy(SHOP, f)
    code, _, _ = run("policy", "fmt", str(f), "--write")
    assert code == 0
    assert load_policy(str(f)) == load_policy(SHOP)
    first = f.read_text()
    run("policy", "fmt", str(f), "--write")
    assert f.read_text() == first


def test_schema_is_json() -> None:
    code, out, _ = run("policy", "schema")
    assert code == 0 and json.loads(out)["title"] == "Bulkhead policy file"


def test_console_script_entry_point() -> None:
    exe = Path(sys.executable).parent / "bulkhead"
    if not exe.exists():
        pytest.fail(f"console script missing at {exe}: is the package installed?")
    r = subprocess.run([str(exe), "policy", "validate", SHOP], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr
