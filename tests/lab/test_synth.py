"""Synthesized flows: deterministic per seed, at the declared rates, round-robin over targets."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest

from bulkhead.lab.synth import schedules, synthesize_flows
from bulkhead.lab.topology import loads_topology

TOPO = loads_topology(textwrap.dedent("""\
    network: 10.60.0.0/24
    hosts:
      - {name: web-1, labels: {role: web}, serve: [tcp/443]}
      - {name: web-2, replicas_of: web-1}
      - {name: api-1, labels: {role: api}, serve: [{port: tcp/8080, process: java}]}
      - {name: api-2, replicas_of: api-1}
      - {name: api-3, replicas_of: api-1}
      - {name: dns, labels: {role: dns}, serve: [udp/53]}
    traffic:
      - {from: {role: web}, to: {role: api}, port: tcp/8080, every: 2s}
      - {from: web-1, to: "external:203.0.113.10", port: tcp/443, every: 10s}
    noise:
      - {from: {}, to: dns, port: udp/53, every: 5s}
    """), source="synth.yaml")
IP = {h.name: h.ip for h in TOPO.hosts}


def test_keys_and_deterministic_per_seed() -> None:
    a = synthesize_flows(TOPO, start=1000.0, duration_s=60, seed=7)
    assert a == synthesize_flows(TOPO, start=1000.0, duration_s=60, seed=7)
    assert a != synthesize_flows(TOPO, start=1000.0, duration_s=60, seed=8)
    assert set(a[0]) == {"src_ip", "dst_ip", "proto", "dst_port", "process", "ts", "count"}
    assert [r["ts"] for r in a] == sorted(r["ts"] for r in a)
    assert all(1000.0 <= r["ts"] < 1060.0 and r["count"] == 1 for r in a)


def test_rates_per_source() -> None:
    flows = synthesize_flows(TOPO, start=0.0, duration_s=100, seed=1)
    per = Counter((r["src_ip"], r["dst_port"]) for r in flows)
    assert per[(IP["web-1"], 8080)] == 50 and per[(IP["web-2"], 8080)] == 50
    assert per[(IP["web-1"], 443)] == 10
    # every host but dns itself asks dns every 5 s
    assert sum(n for (src, port), n in per.items() if port == 53) == 5 * 20
    assert (IP["dns"], 53) not in per


def test_round_robin_and_process() -> None:
    flows = [r for r in synthesize_flows(TOPO, start=0.0, duration_s=60, seed=3)
             if r["src_ip"] == IP["web-1"] and r["dst_port"] == 8080]
    dsts = [r["dst_ip"] for r in flows]
    apis = [IP["api-1"], IP["api-2"], IP["api-3"]]
    for i in range(len(dsts) - 1):  # each connection goes to the next target in turn
        assert apis.index(dsts[i + 1]) == (apis.index(dsts[i]) + 1) % 3
    assert Counter(dsts) == {ip: 10 for ip in apis}
    assert {r["process"] for r in flows} == {"java"}
    ext = [r for r in synthesize_flows(TOPO, start=0.0, duration_s=60, seed=3)
           if r["dst_port"] == 443]
    assert {r["dst_ip"] for r in ext} == {"203.0.113.10"} and ext[0]["process"] is None


def test_short_window_does_not_see_every_pair() -> None:
    # 2 s with every 2 s: one connection per web host, to one api each
    flows = synthesize_flows(TOPO, start=0.0, duration_s=2, seed=5, noise=False)
    pairs = {(r["src_ip"], r["dst_ip"]) for r in flows if r["dst_port"] == 8080}
    assert len(pairs) == 2
    seen = {(r["src_ip"], r["dst_ip"]) for r in synthesize_flows(TOPO, start=0.0,
                                                                 duration_s=6, seed=5)}
    assert {(IP[w], IP[a]) for w in ("web-1", "web-2") for a in ("api-1", "api-2", "api-3")} <= seen


def test_phases_differ_between_sources() -> None:
    phases = {s.source: s.phase for s in schedules(TOPO, seed=11) if s.edge.path == "noise[0]"}
    assert len(set(phases.values())) == len(phases) == 5
    assert all(0 <= p < 5 for p in phases.values())


def test_window_aggregation() -> None:
    flows = synthesize_flows(TOPO, start=0.0, duration_s=60, seed=2, window_s=30)
    assert sum(r["count"] for r in flows) == len(synthesize_flows(TOPO, start=0.0,
                                                                  duration_s=60, seed=2))
    assert {r["ts"] for r in flows} <= {0.0, 30.0}
    with pytest.raises(ValueError):
        synthesize_flows(TOPO, start=0.0, duration_s=1, seed=1, window_s=0)
