"""Benchmark: render and apply an iptables + ipset ruleset with many peer addresses.

    sudo .venv/bin/python bench/bench_iptables.py [--peers 100000] [--repeat 3]
        [--backend legacy|nft] [--render-only]

Uses the same synthetic workload as bench/bench_nftables.py (88% IPv4 hosts, 5% IPv6 hosts,
7% IPv4 /29 networks, over allow, deny and override_deny rules in both directions, some peer
groups shared), renders it with `render_iptables`, and applies it with `restore_commands`
inside a throwaway network namespace: first into an empty namespace, then again and again
over the running ruleset (the update an agent does on every policy change: temporaries
filled, swapped live, old contents destroyed; both chains refilled in one transaction per
family). Prints render time, per-step apply times, sizes, and the peak RSS of the tools.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_nftables import workload
from bulkhead.dataplane.iptables import (
    IptablesArtifact,
    remove_iptables,
    render_iptables,
    restore_commands,
)
from bulkhead.dataplane.model import Endpoint, HostContext

TOOLS = ("ip", "nsenter", "ipset", "sh")


def apply(ns: str, art: IptablesArtifact, backend: str) -> list[tuple[str, float]]:
    """(step, seconds) for every command that applies `art` in namespace `ns`."""
    out = []
    hooks_done = False
    for argv, text in restore_commands(art, backend):  # type: ignore[arg-type]
        t0 = time.perf_counter()
        r = subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", *argv], input=text,
                           text=True, capture_output=True)
        elapsed = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{argv[0]} failed: {r.stderr.strip()[:500]}")
        name = argv[0]
        if name == "sh":
            name = "stale-set sweep" if hooks_done else "hooks"
            hooks_done = True
        out.append((name, elapsed))
    return out


def entries(ns: str) -> int:
    out = subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", "ipset", "list", "-t"],
                         text=True, capture_output=True, check=True).stdout
    return sum(int(ln.split(":")[1]) for ln in out.splitlines()
               if ln.startswith("Number of entries:"))


def rules(ns: str, backend: str) -> int:
    save = "iptables-legacy-save" if backend == "legacy" else "iptables-nft-save"
    out = subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", save, "-t", "filter"],
                         text=True, capture_output=True, check=True).stdout
    return sum(ln.startswith("-A BULKHEAD-") for ln in out.splitlines())


def show(label: str, runs: list[list[tuple[str, float]]]) -> float:
    """Print the median of each step over runs; return the median total."""
    totals = [sum(s for _n, s in r) for r in runs]
    steps = "  ".join(f"{name} {statistics.median(r[i][1] for r in runs) * 1000:.0f}"
                      for i, (name, _s) in enumerate(runs[0]))
    total = statistics.median(totals)
    print(f"{label:<18}{total * 1000:.0f} ms  ({steps}; ms)")
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="renders/updates to time (median)")
    ap.add_argument("--backend", choices=("legacy", "nft"), default="legacy")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()

    cw = workload(args.peers)
    ctx = HostContext(control_plane=(Endpoint("192.0.2.10", 8443),))
    renders = []
    art = render_iptables(cw, ctx)
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        art = render_iptables(cw, ctx)
        renders.append(time.perf_counter() - t0)
    render_s = statistics.median(renders)
    print(f"peers:             {args.peers:,}")
    print(f"ipset script:      {len(art.ipset) / 1e6:.1f} MB, {art.ipset.count(chr(10)):,} lines"
          f", {len(art.sets)} sets")
    print(f"iptables rules:    {art.v4.count(chr(10) + '-A ')} (v4), "
          f"{art.v6.count(chr(10) + '-A ')} (v6)")
    print(f"render:            {render_s * 1000:.0f} ms (median of {args.repeat})")
    if args.render_only:
        return 0
    tools = (*TOOLS, f"iptables-{args.backend}-restore", f"ip6tables-{args.backend}-restore")
    missing = [t for t in tools if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        print(f"apply:             skipped (needs root and {', '.join(missing) or 'nothing'})")
        return 0
    ns = f"bhipt-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        first = apply(ns, art, args.backend)
        updates = []
        for i in range(args.repeat):
            # alternate the enforcement state so every update really changes the rules
            state = "selective" if i % 2 == 0 else "full"
            updates.append(apply(ns, render_iptables(replace(cw, enforcement=state), ctx),
                                 args.backend))
        loaded = entries(ns)
        loaded_rules = rules(ns, args.backend)
        removal = apply(ns, remove_iptables(ctx), args.backend)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"backend:           iptables-{args.backend}")
    show("apply (empty):", [first])
    update_s = show("apply (update):", updates)
    show("remove:", [removal])
    print(f"set entries:       {loaded:,}")
    print(f"rules loaded:      {loaded_rules} (v4)")
    print(f"tools' peak RSS:   {rss / 1024:.0f} MiB")
    print(f"render + update:   {(render_s + update_s) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
