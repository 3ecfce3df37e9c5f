"""The lab end to end: `lab up` of each example topology, every declared traffic edge
connects, attacks run, agents report in, and `lab down` leaves nothing behind - also after a
`lab up` killed with SIGKILL midway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead.lab.netns import NETNS_DIR, cgroup2_mount
from bulkhead.lab.runner import Lab

pytestmark = pytest.mark.privileged

TOPOLOGIES = Path(__file__).resolve().parents[2] / "examples" / "topologies"
CLI = [sys.executable, "-c", "import sys; from bulkhead.cli.main import app; "
       "sys.argv[0] = 'bulkhead'; app()", "lab"]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A Lab in its own state dir, torn down after the test whatever happened."""
    the_lab = Lab(tmp_path / "lab")
    try:
        yield the_lab
    finally:
        the_lab.down()


def cli(lab: Lab, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BULKHEAD_LAB_DIR=str(lab.dir))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def assert_nothing_left(lab: Lab, pids: list[int]) -> None:
    assert lab.leftovers() == []
    assert not [n for n in os.listdir(NETNS_DIR) if n.startswith(lab.prefix)]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert lab.prefix not in links
    mount = cgroup2_mount()
    assert mount is None or not (Path(mount) / lab.prefix).exists()
    alive = [p for p in pids if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().rpartition(")")[2][:3]]
    assert alive == []
    assert not lab.dir.exists()


def recorded_pids(lab: Lab) -> list[int]:
    state = json.loads(lab.state_path.read_text())
    return [int(p["pid"]) for p in state["processes"]]


def check_traffic(lab: Lab) -> None:
    results = lab.probe_traffic()
    assert results
    assert [r for r in results if not r.connected] == []


def test_shop_through_the_cli(lab: Lab) -> None:
    cp = cli(lab, "up", str(TOPOLOGIES / "shop.yaml"), "--no-agents", "--json")
    assert cp.returncode == 0, cp.stderr
    st = json.loads(cp.stdout)
    assert st["status"] == "up" and len(st["hosts"]) == 12
    assert all(h["up"] for h in st["hosts"]) and all(p["alive"] for p in st["processes"])
    check_traffic(lab)
    # exit statuses of `lab probe`: 0 connects, 1 refused, 2 usage
    ok = cli(lab, "probe", "web-1", "api-1", "tcp/8080")
    assert ok.returncode == 0 and "connected" in ok.stdout
    refused = cli(lab, "probe", "web-1", "api-1", "tcp/9")
    assert refused.returncode == 1 and "refused" in refused.stdout
    assert cli(lab, "probe", "web-1", "nowhere", "tcp/1").returncode == 2
    assert cli(lab, "probe", "web-1", "api-1", "tcp/x").returncode == 2
    out = json.loads(cli(lab, "attack", "lateral-from-web", "--json").stdout)
    reached = {(r["to"], r["port"]) for r in out["reached"]}
    assert ("db-1", "tcp/3306") in reached and ("db-1", "tcp/22") in reached  # no policy yet
    assert ("db-1", "tcp/6379") not in reached and ("web-1", "tcp/22") not in reached
    exfil = json.loads(cli(lab, "attack", "exfiltration", "--json").stdout)
    assert {r["port"] for r in exfil["reached"]} == {"tcp/443", "tcp/22"}
    assert cli(lab, "attack", "nope").returncode == 2
    # the traffic generators really run: connections counted per source host
    deadline = time.monotonic() + 20
    while True:
        st = json.loads(cli(lab, "status", "--json").stdout)
        counts = {h["name"]: h["traffic"] for h in st["hosts"]}
        if counts["web-1"] and counts["web-1"]["ok"] > 0:
            break
        assert time.monotonic() < deadline, counts
        time.sleep(1)
    assert all(c is None or c["failed"] == 0 for c in counts.values())
    pids = recorded_pids(lab)
    down = cli(lab, "down")
    assert down.returncode == 0, down.stderr
    assert_nothing_left(lab, pids)
    again = cli(lab, "down")
    assert again.returncode == 0 and "no lab was up" in again.stdout


def test_microservices_up_probe_down(lab: Lab) -> None:
    st = lab.up(TOPOLOGIES / "microservices.yaml", agents=False)
    assert len(st["hosts"]) == 20
    check_traffic(lab)
    # the serving processes carry their declared names and units
    inv = {h["name"]: h for h in st["hosts"]}
    assert inv["orders-db"]["serve"] == ["tcp/5432", "tcp/9100"]
    pids = recorded_pids(lab)
    exe = {os.path.basename(os.readlink(f"/proc/{p}/exe")) for p in pids
           if Path(f"/proc/{p}").exists()}
    assert {"postgres", "redis-server", "envoy", "node_exporter"} <= exe
    mount = cgroup2_mount()
    assert mount is not None
    assert (Path(mount) / lab.prefix / "orders-db" / "postgresql.service").is_dir()
    lab.down()
    assert_nothing_left(lab, pids)


def test_killed_up_leaves_nothing_and_up_cleans_first(lab: Lab, tmp_path: Path) -> None:
    env = dict(os.environ, BULKHEAD_LAB_DIR=str(lab.dir))
    proc = subprocess.Popen([*CLI, "up", str(TOPOLOGIES / "office.yaml"), "--no-agents"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    try:
        while True:  # midway: the control plane is starting, services are coming up
            if lab.state_path.exists():
                with open(lab.state_path) as fh:
                    state = json.load(fh)
                if any(p["role"] == "server" for p in state["processes"]):
                    break
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    pids = recorded_pids(lab)
    assert [n for n in os.listdir(NETNS_DIR) if n.startswith(lab.prefix)]  # it was midway
    # `lab up` after the crash cleans the leftovers first, then works
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("name: tiny\nnetwork: 10.81.0.0/24\nhosts:\n"
                    "  - {name: a, labels: {role: a}, serve: [tcp/80]}\n"
                    "  - {name: b, labels: {role: b}}\n"
                    "traffic:\n  - {from: b, to: a, port: tcp/80, every: 1s}\n")
    st = lab.up(tiny, agents=False)
    assert [h["name"] for h in st["hosts"]] == ["a", "b"]
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not os.path.exists(f"{NETNS_DIR}/{lab.prefix}-jump-1")
    check_traffic(lab)
    pids = recorded_pids(lab)
    lab.down()
    assert_nothing_left(lab, pids)


def _agent_available() -> bool:
    cp = subprocess.run([sys.executable, "-c", "import sys; from bulkhead.cli.main import app;"
                         " sys.argv[0] = 'bulkhead'; app()", "agent", "run", "--help"],
                        capture_output=True, text=True, check=False)
    return cp.returncode == 0


def test_office_with_real_agents(lab: Lab) -> None:
    if not _agent_available():
        pytest.skip("`bulkhead agent run` is not available")
    st = lab.up(TOPOLOGIES / "office.yaml", agent_timeout=150)
    managed = {h["name"] for h in st["hosts"] if h["managed"]}
    assert len(managed) == 9
    agents = {h["name"]: h["agent"] for h in st["hosts"]}
    assert all(agents[n] is not None and agents[n]["online"] for n in managed)
    assert agents["dns"] is None  # unmanaged: imported, no agent
    dns = lab.api("GET", "/workloads/dns")
    assert dns["managed"] is False and dns["labels"]["role"] == "dns"
    check_traffic(lab)
    # the agents report the lab's traffic, the serving process and unit attributed
    deadline = time.monotonic() + 30
    while True:
        groups = lab.api("GET", "/traffic?group_by=dst_port,process,unit&limit=1000")["items"]
        seen = {(g.get("dst_port"), g.get("process"), g.get("unit")) for g in groups}
        if (445, "smbd", "smbd.service") in seen and (389, "slapd", "slapd.service") in seen:
            break
        assert time.monotonic() < deadline, seen
        time.sleep(1)
    pids = recorded_pids(lab)
    lab.down()
    assert_nothing_left(lab, pids)
