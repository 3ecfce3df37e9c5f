"""Benchmark: render and atomically apply an nftables ruleset with many peer addresses.

    sudo .venv/bin/python bench/bench_nftables.py [--peers 100000] [--repeat 3] [--render-only]

Builds one workload's compiled policy with `--peers` distinct peer addresses (88% IPv4 hosts,
5% IPv6 hosts, 7% IPv4 networks, spread over allow, deny and override_deny rules in both
directions, with some peer groups shared), renders it with `render_nftables`, and applies the
script with `nft -f -` inside a throwaway network namespace: first into an empty namespace,
then again over the existing table (the atomic replace an agent does on every policy change).
Prints render time, apply times, script size and the peak RSS of `nft`.
Target on a 2-core machine: render + apply of 100,000 peers within 1.5 s.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace

from bulkhead.dataplane.model import (
    CompiledRule,
    CompiledWorkload,
    Endpoint,
    HostContext,
    PeerSet,
)
from bulkhead.dataplane.nftables import render_nftables
from bulkhead.domain.addresses import AddressSet
from bulkhead.domain.ports import PortSpec
from bulkhead.policy.resolve import ResolvedService


def services(*specs: str) -> tuple[ResolvedService, ...]:
    return tuple(ResolvedService(PortSpec.parse(s)) for s in specs)


def workload(peers: int) -> CompiledWorkload:
    """A workload whose rules reference `peers` distinct addresses in total."""
    n6 = peers * 5 // 100
    nnet = peers * 7 // 100
    n4 = peers - n6 - nnet
    base4 = int(ipaddress.IPv4Address("10.0.0.0"))
    base6 = int(ipaddress.IPv6Address("fd00:ab::"))
    v4 = [str(ipaddress.IPv4Address(base4 + 1 + i)) for i in range(n4)]
    v6 = [str(ipaddress.IPv6Address(base6 + 1 + i)) for i in range(n6)]
    # /29 networks, spaced so they never merge into bigger intervals
    net_base = int(ipaddress.IPv4Address("100.64.0.0"))
    nets = AddressSet.build(v4=[(net_base + 16 * i, net_base + 16 * i + 7)
                                for i in range(nnet)])
    split = n4 * 2 // 3
    clients = PeerSet(frozenset(v4[:split] + v6))
    monitoring = PeerSet(frozenset(v4[split:]))
    quarantine = PeerSet(nets=nets)
    inbound = (
        CompiledRule("override_deny", monitoring, services("tcp/22"), "mon-no-ssh", 0),
        CompiledRule("allow", clients, services("tcp/443", "tcp/8443", "udp/443"), "clients", 1),
        CompiledRule("allow", monitoring, services("udp/161", "tcp/9100-9102"), "monitoring", 2),
        CompiledRule("deny", quarantine, services("any"), "quarantine", 3),
    )
    outbound = (
        CompiledRule("allow", clients, services("tcp/443"), "callbacks", 4),
        CompiledRule("deny", quarantine, services("any"), "quarantine", 3),
    )
    return CompiledWorkload("bench", ("10.255.0.1",), "full", "linux", "enforce",
                            inbound, outbound)


def apply(ns: str, script: str) -> tuple[float, int]:
    """(seconds, peak RSS of the nft process in KiB) for one `nft -f -` in `ns`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", "nft", "-f", "-"],
                       input=script, text=True, capture_output=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"nft -f failed: {r.stderr.strip()[:500]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, max(after, before)


def element_count(ns: str) -> int:
    out = subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", "nft", "-j", "list", "sets"],
                         text=True, capture_output=True, check=True).stdout
    return sum(len(i["set"].get("elem", [])) for i in json.loads(out)["nftables"] if "set" in i)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="renders/applies to time (median)")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()

    cw = workload(args.peers)
    ctx = HostContext(control_plane=(Endpoint("192.0.2.10", 8443),), table="bulkhead")
    renders = []
    script = ""
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        script = render_nftables(cw, ctx)
        renders.append(time.perf_counter() - t0)
    render_s = statistics.median(renders)
    print(f"peers:            {args.peers:,}")
    print(f"script:           {len(script) / 1e6:.1f} MB, {script.count(chr(10)):,} lines")
    print(f"render:           {render_s * 1000:.0f} ms (median of {args.repeat})")
    if args.render_only:
        return 0
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("nsenter") is None:
        print("apply:            skipped (needs root, nft and nsenter)")
        return 0
    ns = f"bhnft-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        first, rss = apply(ns, script)
        replaces = []
        for i in range(args.repeat):
            # alternate the enforcement state so every replace really changes the rules
            state = "selective" if i % 2 == 0 else "full"
            again = render_nftables(replace(cw, enforcement=state), ctx)
            seconds, rss = apply(ns, again)
            replaces.append(seconds)
        loaded = element_count(ns)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    replace_s = statistics.median(replaces)
    print(f"apply (empty):    {first * 1000:.0f} ms")
    print(f"apply (replace):  {replace_s * 1000:.0f} ms (median of {args.repeat}; "
          "deletes the old table and loads the new one in one transaction)")
    print(f"elements loaded:  {loaded:,}")
    print(f"nft peak RSS:     {rss / 1024:.0f} MiB")
    total = render_s + replace_s
    verdict = "OK" if total <= 1.5 else "OVER"
    print(f"render + replace: {total * 1000:.0f} ms (target <= 1500 ms: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
