"""The host agent under load: CPU and memory at N new connections/s, and provision -> enforced.

Builds a `NetnsLab` with three hosts: `cp` runs a real `bulkhead server` (temporary SQLite
data dir), `srv` runs a real `bulkhead agent` and a TCP sink, `load` opens new TCP
connections to the sink at a fixed rate (default 1,000/s; each one is a new conntrack entry
in `srv`, with a process to attribute). The agent's CPU (utime + stime from /proc/PID/stat)
and RSS (VmRSS, VmHWM) are sampled over the measuring period; the connections the server
then holds for that period are counted against those sent.

Then provision -> enforced: a rule is added over the API and provisioned, and the time from
sending the provision request to the moment `srv`'s nft table changes is measured (polling
`nft -j list table` in the namespace every 10 ms), several rounds.

    python bench/bench_agent.py [--rate 1000] [--seconds 30] [--window 600] [--rounds 5]
                                [--profile FILE]

Targets: agent CPU <= 5% of one core and RSS <= 60 MB at 1,000 new connections/s;
provision -> enforced <= 1 s. Needs root (network namespaces, nftables).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bulkhead.agent.netlink import in_netns
from bulkhead.lab.netns import HostSpec, NetnsLab

CP, SRV, LOAD = "10.99.0.2", "10.99.0.20", "10.99.0.30"
SERVER = f"http://{CP}:8443"
BULKHEAD = str(Path(sys.executable).with_name("bulkhead"))
CLK = os.sysconf("SC_CLK_TCK")

SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("0.0.0.0", 7000)); s.listen(4096); print("READY", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""
LOAD_GEN = """
import socket, sys, time
rate, seconds, dst = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
n = 0; t0 = time.monotonic(); fails = 0
while time.monotonic() - t0 < seconds:
    due = t0 + n / rate
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    s = socket.socket()
    try:
        s.connect((dst, 7000))
    except OSError:
        fails += 1
    s.close(); n += 1
print(n, fails, flush=True)
"""
POLICY = f"""
version: 1
services:
  - {{name: sink, ports: ["tcp/7000"]}}
workloads:
  - {{name: srv, ips: [{SRV}], labels: {{role: srv}}, managed: true, enforcement: visibility}}
  - {{name: load, ips: [{LOAD}], labels: {{role: load}}, managed: false}}
rulesets:
  - name: bench
    rules:
      - {{id: load-srv, action: allow, consumers: [{{labels: {{role: load}}}}],
         providers: [{{labels: {{role: srv}}}}], services: [sink]}}
"""


def bulkhead(*args: str, stdin: str | None = None) -> str:
    cp = subprocess.run([BULKHEAD, *args], input=stdin, capture_output=True, text=True,
                        timeout=60, check=True)
    return cp.stdout


class Api:
    def __init__(self, lab: NetnsLab, token: str) -> None:
        self.ns = lab.netns_path("cp")
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, **kw: Any) -> Any:
        with in_netns(self.ns), httpx.Client(timeout=30) as c:
            headers = {**self.headers, **kw.pop("headers", {})}
            r = c.request(method, f"{SERVER}/api/v1{path}", headers=headers, **kw)
        r.raise_for_status()
        return r.json() if r.content else None


def wait(what: str, cond: Any, timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            got = cond()
            if got:
                return got
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def memory_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def table_digest(lab: NetnsLab) -> str:
    cp = lab.run("srv", ["nft", "-j", "list", "table", "inet", "bulkhead"], check=False)
    return hashlib.sha256(cp.stdout.encode()).hexdigest() if cp.returncode == 0 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--window", type=float, default=600.0,
                    help="the agent's flow window (default: the production default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--generators", type=int, default=2, help="load processes sharing --rate")
    ap.add_argument("--profile", metavar="FILE",
                    help="record the agent with py-spy (raw format) during the load")
    args = ap.parse_args()
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f} "
          f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp, NetnsLab(
            [HostSpec("cp", CP), HostSpec("srv", SRV), HostSpec("load", LOAD)]) as lab:
        data = Path(tmp) / "server"
        bulkhead("server", "init", "--data-dir", str(data), "--password-stdin",
                 stdin="bench-password-1\n")
        token = bulkhead("server", "api-key", "create", "--user", "owner", "--data-dir",
                         str(data)).strip()

        def start(host: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
            with open(Path(tmp) / log, "wb") as f:
                p = subprocess.Popen(["nsenter", f"--net={lab.netns_path(host)}", *argv],
                                     stdout=f, stderr=f, start_new_session=True)
            procs.append(p)
            return p

        try:
            start("cp", [BULKHEAD, "server", "run", "--data-dir", str(data), "--host", CP,
                         "--port", "8443", "--log-level", "warning"], "server.log")
            api = Api(lab, token)
            wait("the server", lambda: api.call("GET", "/policy/versions") is not None)
            api.call("POST", "/policy/import", content=POLICY,
                     headers={"content-type": "application/yaml"})
            api.call("POST", "/policy/provision", json={"note": "bench"})
            key = api.call("POST", "/pairing-keys", json={"name": "bench"})["key"]
            for _ in range(2):  # two acceptors on one port (SO_REUSEPORT)
                sink = subprocess.Popen(["nsenter", f"--net={lab.netns_path('srv')}",
                                         sys.executable, "-c", SINK], stdout=subprocess.PIPE,
                                        start_new_session=True)
                procs.append(sink)
                assert sink.stdout is not None and sink.stdout.readline().startswith(b"READY")
            agent_argv = [sys.executable, "-m", "bulkhead.cli.agent", "run", "--server", SERVER,
                          "--state-dir", f"{tmp}/agent", "--hostname", "srv",
                          "--flow-window", str(args.window), "--log-format", "json"]
            agent = start("srv", [*agent_argv, "--pairing-key", key], "agent.log")
            try:
                wait("the agent", lambda: any(a["in_sync"] and a["applied_version"]
                                              for a in api.call("GET", "/agents")))
            except SystemExit:
                print((Path(tmp) / "agent.log").read_text()[-2000:])
                raise
            time.sleep(2)
            idle0, t0 = cpu_seconds(agent.pid), time.monotonic()
            time.sleep(3)
            idle_cpu = (cpu_seconds(agent.pid) - idle0) / (time.monotonic() - t0)
            idle_mem = memory_kb(agent.pid)

            # -- load --------------------------------------------------------------------
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
            spy = None
            if args.profile:
                spy = subprocess.Popen(["py-spy", "record", "-p", str(agent.pid), "-d",
                                        str(int(args.seconds)), "-f", "raw", "-o", args.profile,
                                        "--nonblocking"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            c0, t0 = cpu_seconds(agent.pid), time.monotonic()
            gens = [subprocess.Popen(
                ["nsenter", f"--net={lab.netns_path('load')}", sys.executable, "-c", LOAD_GEN,
                 str(args.rate / args.generators), str(args.seconds), SRV],
                stdout=subprocess.PIPE, text=True) for _ in range(args.generators)]
            outs = [g.communicate(timeout=args.seconds + 60)[0] for g in gens]
            elapsed = time.monotonic() - t0
            cpu = (cpu_seconds(agent.pid) - c0) / elapsed
            mem = memory_kb(agent.pid)
            sent = sum(int(o.split()[0]) for o in outs)
            fails = sum(int(o.split()[1]) for o in outs)
            if spy is not None:
                spy.wait(60)
            # once per window the agent dumps conntrack for byte counters: its cost alone
            from bulkhead.agent.conntrack import ConntrackSocket, parse
            d0 = time.process_time()
            entries = sum(len(parse(b)) for b in
                          ConntrackSocket.dump_raw(netns=lab.netns_path("srv")))
            dump_cpu = time.process_time() - d0
            # a stop spools the open window; the restarted agent uploads it
            agent.terminate()
            agent.wait(30)
            procs.remove(agent)
            agent = start("srv", agent_argv, "agent2.log")

            def counted() -> int:
                rows = api.call("GET", "/traffic", params={
                    "from": since, "port": "7000", "reporter": "srv", "direction": "in",
                    "limit": 10000})["items"]
                return sum(int(r["connections"]) for r in rows)

            try:
                got = wait("the flows", lambda: counted() >= sent - fails and counted(),
                           timeout=60)
            except SystemExit:
                got = counted()
            time.sleep(1)
            got = counted()
            print(f"load: {sent} connections in {elapsed:.1f} s ({sent / elapsed:.0f}/s, "
                  f"{fails} failed); window {args.window:g} s")
            print(f"agent CPU: {cpu * 100:.1f}% of one core under load (idle: "
                  f"{idle_cpu * 100:.1f}%); target <= 5%")
            print(f"agent memory: RSS {mem['VmRSS'] / 1024:.1f} MB, peak "
                  f"{mem['VmHWM'] / 1024:.1f} MB (idle before the load: "
                  f"{idle_mem['VmRSS'] / 1024:.1f} MB); target <= 60 MB")
            made = sent - fails  # a failed connect (local port exhaustion) never reached srv
            print(f"connections at the server after a stop and restart: {got} of {made} made "
                  f"({'all' if got == made else f'{got - made:+d}'})")
            print(f"conntrack dump (once per window): {entries} entries, {dump_cpu:.2f} s CPU "
                  f"({dump_cpu / args.window * 100:.2f}% of a core at a {args.window:g} s "
                  f"window)")

            # -- provision -> enforced -----------------------------------------------------
            lat = []
            for i in range(args.rounds):
                before = table_digest(lab)
                api.call("POST", "/rulesets/bench/rules", json={
                    "id": f"extra-{i}", "action": "allow",
                    "consumers": [{"labels": {"role": "load"}}],
                    "providers": [{"labels": {"role": "srv"}}],
                    "services": [f"tcp/{9000 + i}"]})
                t0 = time.monotonic()
                api.call("POST", "/policy/provision", json={"note": f"round {i}"})
                while table_digest(lab) == before:
                    if time.monotonic() - t0 > 30:
                        raise SystemExit("policy never enforced")
                    time.sleep(0.01)
                lat.append(time.monotonic() - t0)
                time.sleep(0.5)
            lat.sort()
            print(f"provision -> enforced: p50 {lat[len(lat) // 2]:.3f} s, max {lat[-1]:.3f} s "
                  f"over {len(lat)} rounds; target <= 1 s")
            print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        finally:
            for p in reversed(procs):
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
                if p.poll() is None:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    main()
