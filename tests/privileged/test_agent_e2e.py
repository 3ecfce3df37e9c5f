"""The host agent end to end: a real `bulkhead server` (subprocess, temporary SQLite data dir)
and real agents (`bulkhead agent run`), each in its own network namespace of a `NetnsLab`.

One test walks the whole story, because pairing, policy delivery and traffic take seconds
each and every later step needs the earlier ones: pairing, flows with processes, counts and
decisions, enforcement exactly as the evaluator decides, visibility -> full, a hand-flushed
ruleset restored with a tamper event, and a control-plane outage after which every flow
summary arrives exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bulkhead.agent.netlink import in_netns
from bulkhead.lab.netns import HostSpec, NetnsLab
from bulkhead.policy.evaluate import Evaluator, Flow
from bulkhead.policy.fileformat import loads_policy

pytestmark = pytest.mark.privileged

CP, WEB, DB = "10.99.0.2", "10.99.0.11", "10.99.0.13"
WEB6, DB6 = "fd00:99::11", "fd00:99::13"
PORT = 8443
BULKHEAD = str(Path(sys.executable).with_name("bulkhead"))  # the console script of this venv
SERVER = f"http://{CP}:{PORT}"
POLICY = f"""
version: 1
services:
  - {{name: pg, ports: ["tcp/5432"]}}
workloads:
  - {{name: web, ips: [{WEB}, "{WEB6}"], labels: {{role: web, app: shop, env: prod}}, managed: true,
     enforcement: visibility}}
  - {{name: db, ips: [{DB}, "{DB6}"], labels: {{role: db, app: shop, env: prod}}, managed: true,
     enforcement: visibility}}
rulesets:
  - name: shop
    rules:
      - {{id: web-db, action: allow, consumers: [{{labels: {{role: web}}}}],
         providers: [{{labels: {{role: db}}}}], services: [pg]}}
"""


def _bulkhead(*args: str, stdin: str | None = None) -> str:
    cp = subprocess.run([BULKHEAD, *args], input=stdin,
                        capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == 0, f"bulkhead {' '.join(args)}: {cp.stderr}"
    return cp.stdout


class Api:
    """Admin calls to the server, made from inside the control plane's namespace."""

    def __init__(self, lab: NetnsLab, token: str) -> None:
        self.ns = lab.netns_path("cp")
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        with in_netns(self.ns), httpx.Client(timeout=10) as c:
            headers = {**self.headers, **kw.pop("headers", {})}
            return c.request(method, f"{SERVER}/api/v1{path}", headers=headers, **kw)

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        r = self.call(method, path, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None


def _wait(what: str, cond: Callable[[], Any], timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            last = cond()
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Procs:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, lab: NetnsLab, host: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.procs[name] = subprocess.Popen(
            ["nsenter", f"--net={lab.netns_path(host)}", BULKHEAD, *args], stdout=log,
            stderr=log, env=env, start_new_session=True)
        log.close()

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()


def _flows(api: Api, **params: Any) -> list[dict[str, Any]]:
    return list(api.ok("GET", "/traffic", params={"limit": 10000, **params})["items"])


def _connections(api: Api, **params: Any) -> int:
    return sum(int(f["connections"]) for f in _flows(api, **params))


def test_agents_pair_report_enforce_restore_and_spool(netns_lab: Callable[..., NetnsLab],
                                                        procs: Procs, tmp_path: Path) -> None:
    lab = netns_lab([HostSpec("cp", CP), HostSpec("web", WEB, WEB6), HostSpec("db", DB, DB6)])
    data = tmp_path / "server"
    _bulkhead("server", "init", "--data-dir", str(data), "--password-stdin",
              stdin="e2e-password-long\n")
    token = _bulkhead("server", "api-key", "create", "--user", "owner", "--data-dir",
                      str(data)).strip()
    server_args = ["server", "run", "--data-dir", str(data), "--host", CP, "--port", str(PORT),
                   "--log-level", "warning"]
    procs.start("server", lab, "cp", server_args)
    api = Api(lab, token)
    _wait("server", lambda: api.call("GET", "/policy/versions").status_code == 200)

    api.ok("POST", "/policy/import", content=POLICY,
           headers={"content-type": "application/yaml"})
    version = api.ok("POST", "/policy/provision", json={"note": "e2e"})["id"]
    key = api.ok("POST", "/pairing-keys", json={"name": "e2e", "enforcement": "visibility"})

    for host in ("web", "db"):
        procs.start(f"agent-{host}", lab, host, [
            "agent", "run", "--server", SERVER, "--pairing-key", key["key"],
            "--state-dir", str(tmp_path / f"state-{host}"), "--hostname", host,
            "--flow-window", "1", "--heartbeat", "1", "--log-format", "text"])

    def agents_in_sync(enforcement: str) -> bool:
        agents = [a for a in api.ok("GET", "/agents") if a["state"] == "paired"]
        return len(agents) == 2 and all(
            a["in_sync"] and a["applied_enforcement"] == enforcement and
            str(a["applied_version"]).startswith(f"{version}.") for a in agents)

    try:
        _wait("agents paired with the policy applied", lambda: agents_in_sync("visibility"))
    except AssertionError:
        raise AssertionError(procs.log("agent-db") + procs.log("agent-web")) from None
    agent_ids = {a["workload"]: a["id"] for a in api.ok("GET", "/agents")}
    status = json.loads(_bulkhead("agent", "status", "--state-dir", str(tmp_path / "state-db"),
                                  "--json"))
    assert status["paired"] and status["enforcement"] == "visibility"
    assert (tmp_path / "state-db" / "credential.json").stat().st_mode & 0o777 == 0o600

    # -- flows with processes, counts and decisions (visibility: nothing dropped) ------------
    lab.serve("db", tcp=[5432, 6000], udp=[5353])
    probes = [(DB, "tcp", 5432)] * 3 + [(DB6, "tcp", 5432), (DB, "tcp", 6000), (DB, "tcp", 6000),
                                         (DB, "udp", 5353)]
    assert lab.probe("web", probes) == ["open"] * 7
    inbound = {"reporter": "db", "direction": "in"}
    _wait("db's flows", lambda: _connections(api, port="5432", **inbound) == 4
          and _connections(api, port="6000", **inbound) == 2
          and _connections(api, port="5353", **inbound) == 1)
    flows = _flows(api, **inbound)
    by_port = {f["dst_port"]: f for f in flows if f["src_ip"] == WEB}
    v6 = [f for f in flows if f["src_ip"] == WEB6]
    assert [(f["dst_ip"], f["dst_port"], f["connections"], f["decision"]) for f in v6] == [
        (DB6, 5432, 1, "allowed")]
    assert by_port[5353]["proto"] == 17 and by_port[5353]["decision"] == \
        "potentially_blocked_no_rule"
    assert by_port[5432]["decision"] == "allowed"
    assert by_port[6000]["decision"] == "potentially_blocked_no_rule"
    assert by_port[5432]["process"] == by_port[6000]["process"] == \
        os.path.basename(os.path.realpath(sys.executable))
    assert by_port[5432]["src_ip"] == WEB and by_port[5432]["dst_ip"] == DB
    _wait("web's outbound view", lambda: _connections(
        api, reporter="web", direction="out", port="5432") == 4)

    # -- visibility -> full: enforcement exactly as the evaluator decides -------------------
    api.ok("PATCH", "/workloads/db", json={"enforcement": "full"})
    _wait("db enforcing full", lambda: any(
        a["workload"] == "db" and a["applied_enforcement"] == "full" and a["in_sync"]
        for a in api.ok("GET", "/agents")))
    policy = loads_policy(POLICY.replace("enforcement: visibility}\nrulesets",
                                         "enforcement: full}\nrulesets"))
    ev = Evaluator(policy)
    checks = [(DB, "tcp", 5432), (DB, "tcp", 6000), (DB, "udp", 5353), (DB6, "tcp", 5432),
              (DB6, "tcp", 6000)]
    got = lab.probe("web", checks, timeout=1.0)
    want = ["timeout" if ev.decide(Flow(WEB, dst, 6 if proto == "tcp" else 17, port)).blocked
            else "open" for dst, proto, port in checks]
    assert want == ["open", "timeout", "timeout", "open", "timeout"]
    assert got == want
    _wait("blocked flows reported", lambda: any(
        f["decision"] == "blocked_no_rule" for f in _flows(api, port="6000", **inbound)))

    # -- tamper: a hand-flushed ruleset comes back and is reported --------------------------
    lab.run("db", ["nft", "flush", "ruleset"])
    _wait("tamper event", lambda: [e for e in api.ok(
        "GET", "/events", params={"kind": "tamper_detected"})["items"]
        if e["subject"] == f"agent:{agent_ids['db']}"], timeout=15)
    _wait("ruleset restored", lambda: lab.run(
        "db", ["nft", "list", "table", "inet", "bulkhead"], check=False).returncode == 0)
    assert lab.probe("web", [(DB, "tcp", 6000)], timeout=1.0) == ["timeout"]

    # -- outage: every summary arrives exactly once -----------------------------------------
    since = time.time()
    time.sleep(1.1)  # the windows before the outage are closed and sent
    procs.stop("server")
    sent = 0
    for _ in range(4):
        assert lab.probe("web", [(DB, "tcp", 5432)] * 5) == ["open"] * 5
        sent += 5
        time.sleep(0.7)
    time.sleep(1.5)  # the last window closes into the spool
    procs.start("server2", lab, "cp", server_args)
    after = {"from": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since + 1.0)),
             "port": "5432"}
    _wait("spooled flows", lambda: _connections(api, **after, **inbound) >= sent, timeout=30)
    time.sleep(2.5)  # any duplicate would arrive by now
    assert _connections(api, **after, **inbound) == sent
    assert _connections(api, **after, reporter="web", direction="out") == sent

    # -- unpair: db removes our rules, web keeps its last policy; db then pairs again -------
    api.ok("POST", f"/agents/{agent_ids['db']}/unpair", json={"final_state": "remove"})
    api.ok("POST", f"/agents/{agent_ids['web']}/unpair", json={"final_state": "keep"})
    _wait("agents stopped after unpairing", lambda: procs.procs["agent-db"].poll() == 0
          and procs.procs["agent-web"].poll() == 0)

    def has_table(host: str) -> bool:
        return lab.run(host, ["nft", "list", "table", "inet", "bulkhead"],
                       check=False).returncode == 0

    assert not has_table("db") and has_table("web")
    status = json.loads(_bulkhead("agent", "status", "--state-dir", str(tmp_path / "state-db"),
                                  "--json"))
    assert not status["paired"]
    procs.start("agent-db-again", lab, "db", [
        "agent", "--server", SERVER, "--pairing-key", key["key"],  # the short form
        "--state-dir", str(tmp_path / "state-db"), "--hostname", "db",
        "--flow-window", "1", "--heartbeat", "1", "--log-format", "json"])
    again = _wait("db paired again", lambda: [
        a for a in api.ok("GET", "/agents", params={"state": "paired"})
        if a["workload"] == "db" and a["in_sync"]])
    assert again[0]["id"] != agent_ids["db"] and has_table("db")
