"""Benchmark: the agent's conntrack sensor under a real load of new connections.

    sudo .venv/bin/python bench/bench_conntrack.py [--rate 1000] [--seconds 5] [--dump 20000]

In a two-host network-namespace lab (conntrack on through a `ct state` rule), a load process
in host a opens and closes TCP connections to a server in host b at `--rate` per second
while this process reads NEW|DESTROY events from a `ConntrackSocket` in a (16 MiB buffer),
parsing them as the agent does. Prints, for that phase (once waking per event, once waking
at most every `--coalesce` seconds): events received, overruns (ENOBUFS), the CPU this
process spent (recv + parse) per event and as a share of one core; then the
parse cost alone (re-parsing the captured buffers), a burst at the highest rate the load
process reaches, a dump of `--dump` entries (UDP flows) and the cost of process attribution
(`ProcessResolver.lookup` of a live connection, `listener` of a known port).
Targets: agent total <= 5% of one core at 1,000 new connections/s, so parse <= 20 us/event.
"""

from __future__ import annotations

import argparse
import os
import selectors
import subprocess
import sys
import time

from bulkhead.agent import conntrack
from bulkhead.agent.conntrack import ConntrackSocket, parse
from bulkhead.agent.procs import ProcessResolver
from bulkhead.lab.netns import HostSpec, NetnsLab, privileged_available

RULES = ("table inet bench {\n\tchain i {\n\t\ttype filter hook input priority 0;\n"
         "\t\tct state established accept\n\t}\n}\n")
A4, B4 = "10.99.0.11", "10.99.0.12"

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(4096); print("READY", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

# Connect + close at `rate`/s for `seconds` (rate 0: as fast as possible); prints the count.
LOAD = r"""
import socket, sys, time
dst, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
start = time.monotonic(); n = 0
while (now := time.monotonic()) - start < seconds:
    if rate and n >= (now - start) * rate:
        time.sleep(min(0.002, n / rate - (now - start))); continue
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    try: s.connect((dst, 80))
    except OSError: pass
    s.close(); n += 1
print(n, time.monotonic() - start, flush=True)
"""

UDP_FILL = r"""
import socket, sys
n = int(sys.argv[2]); u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    u.sendto(b"x", (sys.argv[1], 10000 + i % 50000)) if i < 50000 else None
print(n, flush=True)
"""


def _py(lab: NetnsLab, host: str, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["nsenter", f"--net={lab.netns_path(host)}", sys.executable, "-I",
                             "-c", code, *args], stdout=subprocess.PIPE, text=True)


def load_phase(lab: NetnsLab, rate: float, seconds: float, coalesce: float) -> dict[str, float]:
    """Run the load while reading events; CPU of this process = the sensor's recv + parse.

    After each wake-up the reader waits `coalesce` seconds before draining, so one wake-up
    serves many events (each event is its own datagram: waking per event costs more than
    parsing it)."""
    raw: list[bytes] = []
    events = 0
    with ConntrackSocket.events(conntrack.NEW | conntrack.DESTROY,
                                netns=lab.netns_path("a")) as sock:
        sel = selectors.DefaultSelector()
        sel.register(sock.fileno(), selectors.EVENT_READ)
        cpu0, wall0 = time.process_time(), time.monotonic()
        load = _py(lab, "a", LOAD, B4, str(rate), str(seconds))
        while load.poll() is None or sel.select(0):
            if sel.select(0.2):
                if coalesce:
                    time.sleep(coalesce)
                bufs = sock.read_raw()
                raw += bufs
                for buf in bufs:
                    events += len(parse(buf))
        time.sleep(0.2)
        for buf in sock.read_raw():
            raw.append(buf)
            events += len(parse(buf))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        overruns = sock.overruns
        sel.close()
    assert load.stdout is not None
    conns, took = (float(x) for x in load.stdout.read().split())
    return {"conns": conns, "rate": conns / took, "events": events, "overruns": overruns,
            "cpu_s": cpu, "wall_s": wall, "raw": raw}  # type: ignore[dict-item]


def parse_only(raw: list[bytes], repeat: int = 5) -> tuple[int, float]:
    data = [bytes(b) for b in raw]
    n = sum(len(parse(b)) for b in data)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for b in data:
            parse(b)
        best = min(best, time.process_time() - t0)
    return n, best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="new connections per second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--coalesce", type=float, default=0.05,
                    help="seconds to wait after a wake-up before draining (0: none)")
    ap.add_argument("--dump", type=int, default=20000, help="UDP flows to create and dump")
    args = ap.parse_args()
    reason = privileged_available()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    with NetnsLab([HostSpec("a", A4), HostSpec("b", B4)]) as lab:
        for host in ("a", "b"):
            lab.nft(host, RULES)
        server = _py(lab, "b", SERVER)
        assert server.stdout is not None and server.stdout.readline().strip() == "READY"
        try:
            for coalesce in (0.0, args.coalesce):
                r = load_phase(lab, args.rate, args.seconds, coalesce)
                per_event = r["cpu_s"] / max(r["events"], 1) * 1e6
                print(f"load: {r['conns']:.0f} connections at {r['rate']:.0f}/s for "
                      f"{r['wall_s']:.1f} s -> {r['events']:.0f} events (NEW+DESTROY), "
                      f"{r['overruns']:.0f} overruns")
                print(f"  sensor CPU (recv + parse), waking every {coalesce * 1e3:.0f} ms at "
                      f"most: {per_event:.1f} us/event, "
                      f"{r['cpu_s'] / r['wall_s'] * 100:.2f}% of one core")
            n, secs = parse_only(r["raw"])  # type: ignore[arg-type]
            print(f"parse only: {n / secs:,.0f} events/s, {secs / n * 1e6:.1f} us/event "
                  f"({n} events, {len(r['raw'])} buffers)")  # type: ignore[arg-type]
            burst = load_phase(lab, 0, 3, args.coalesce)
            print(f"burst: {burst['rate']:.0f} connections/s -> {burst['events']:.0f} events, "
                  f"{burst['overruns']:.0f} overruns, sensor "
                  f"{burst['cpu_s'] / max(burst['events'], 1) * 1e6:.1f} us/event, "
                  f"{burst['cpu_s'] / burst['wall_s'] * 100:.1f}% of one core")
            fill = _py(lab, "a", UDP_FILL, B4, str(args.dump))
            fill.communicate()
            t0, c0 = time.monotonic(), os.times()
            entries = ConntrackSocket.dump(netns=lab.netns_path("a"))
            took, c1 = time.monotonic() - t0, os.times()
            user, system = c1.user - c0.user, c1.system - c0.system
            print(f"dump: {len(entries)} entries in {took * 1e3:.0f} ms "
                  f"({len(entries) / took:,.0f} entries/s; CPU "
                  f"{(user + system) / len(entries) * 1e6:.1f} us/entry, of which kernel "
                  f"{system / len(entries) * 1e6:.1f})")
            attribution(lab)
        finally:
            server.kill()
            server.wait()
    return 0


HOLD = r"""
import socket, sys
t = socket.create_connection((sys.argv[1], 80)); print(t.getsockname()[1], flush=True)
sys.stdin.read()
"""


def attribution(lab: NetnsLab) -> None:
    """Cost of ProcessResolver calls as the agent makes them (caches warm)."""
    proc = subprocess.Popen(["nsenter", f"--net={lab.netns_path('a')}", sys.executable, "-I",
                             "-c", HOLD, B4], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with ProcessResolver(netns=lab.netns_path("a")) as ra, \
                ProcessResolver(netns=lab.netns_path("b")) as rb:
            t0 = time.perf_counter()
            first = ra.lookup("tcp", A4, port, B4, 80)
            cold = time.perf_counter() - t0
            assert first is not None and first.pid == proc.pid, first
            n = 2000
            t0 = time.perf_counter()
            for _ in range(n):
                ra.lookup("tcp", A4, port, B4, 80)
            warm = (time.perf_counter() - t0) / n
            rb.listener("tcp", B4, 80)
            t0 = time.perf_counter()
            for _ in range(n):
                rb.listener("tcp", B4, 80)
            listen = (time.perf_counter() - t0) / n
        print(f"attribution: lookup {warm * 1e6:.0f} us (first, with a /proc scan of "
              f"{len(os.listdir('/proc'))} entries: {cold * 1e3:.1f} ms); "
              f"listener {listen * 1e6:.1f} us")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.exit(main())
