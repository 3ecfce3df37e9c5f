"""Recorded flows from a topology, without running it: what the lab's traffic would produce.

Each source host of a traffic (or noise) entry opens one connection every `every` seconds,
starting at a random phase in [0, every); with several targets it goes round-robin from a
random starting target, so a window shorter than a full round does not see every pair. This
is the schedule `bulkhead.lab.traffic` follows live. Deterministic per seed. Pure.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bulkhead.lab.topology import Edge, Topology

__all__ = ["Schedule", "schedules", "synthesize_flows"]


@dataclass(frozen=True)
class Schedule:
    """One source host's share of an edge: connections at phase + k*every, round-robin."""

    edge: Edge
    source: str
    dst_ips: tuple[str, ...]
    processes: tuple[str | None, ...]  # serving process per dst (None when not declared)
    phase: float  # seconds after the start
    first: int  # index into dst_ips of the first connection

    def connection(self, k: int) -> tuple[float, int]:
        """(offset from start, dst index) of connection number k."""
        return self.phase + k * self.edge.every_s, (self.first + k) % len(self.dst_ips)


def schedules(topology: Topology, *, seed: int, noise: bool = True) -> list[Schedule]:
    """Every (edge, source) schedule, with phase and first target drawn from `seed`."""
    rng = random.Random(seed)
    out: list[Schedule] = []
    for edge in topology.traffic + (topology.noise if noise else ()):
        for source in edge.sources:
            if edge.external is not None:
                ips: tuple[str, ...] = (edge.external,)
                procs: tuple[str | None, ...] = (None,)
            else:
                names = edge.targets_for(source)
                if not names:
                    continue
                hosts = [topology.host(n) for n in names]
                ips = tuple(h.ip for h in hosts)
                procs = tuple(_process(h.serving(edge.proto, edge.port)) for h in hosts)
            phase = rng.uniform(0.0, edge.every_s)
            first = rng.randrange(len(ips))
            out.append(Schedule(edge, source, ips, procs, phase, first))
    return out


def _process(serve: Any) -> str | None:
    return serve.process if serve is not None else None


def _connections(s: Schedule, duration_s: float) -> Iterator[tuple[float, int]]:
    if s.phase >= duration_s:
        return
    n = math.ceil((duration_s - s.phase) / s.edge.every_s)
    for k in range(n):
        off, idx = s.connection(k)
        if off < duration_s:
            yield off, idx


def synthesize_flows(topology: Topology, *, start: float, duration_s: float, seed: int,
                     noise: bool = True, window_s: float | None = None) -> list[dict[str, Any]]:
    """Flows (src_ip, dst_ip, proto, dst_port, process, ts, count) in [start, start+duration).

    One record per connection (count 1), sorted by time; with `window_s`, records of the same
    (src, dst, proto, port) are summed per window (ts = window start), as an agent reports them.
    """
    if duration_s < 0:
        raise ValueError("duration_s must be >= 0")
    if window_s is not None and window_s <= 0:
        raise ValueError("window_s must be > 0")
    rows: list[dict[str, Any]] = []
    for s in schedules(topology, seed=seed, noise=noise):
        src_ip = topology.host(s.source).ip
        for off, idx in _connections(s, duration_s):
            rows.append({"src_ip": src_ip, "dst_ip": s.dst_ips[idx], "proto": s.edge.proto,
                         "dst_port": s.edge.port, "process": s.processes[idx],
                         "ts": start + off, "count": 1})
    rows.sort(key=lambda r: (r["ts"], r["src_ip"], r["dst_ip"], r["dst_port"]))
    if window_s is None:
        return rows
    buckets: dict[tuple[float, str, str, str, int], dict[str, Any]] = {}
    for r in rows:
        w = start + math.floor((r["ts"] - start) / window_s) * window_s
        key = (w, r["src_ip"], r["dst_ip"], r["proto"], r["dst_port"])
        if key in buckets:
            buckets[key]["count"] += 1
        else:
            buckets[key] = dict(r, ts=w)
    return list(buckets.values())
