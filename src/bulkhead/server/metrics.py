"""Prometheus metrics of the control plane, in one registry served at `/metrics`.

Modules record with the objects below; gauges that are cheap to compute on demand (agents
online by state, active policy version) are set by their owners at scrape time through
`on_scrape` callbacks.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

FLOWS_INGESTED = Counter("bulkhead_flows_ingested", "Flow summary records stored",
                         registry=REGISTRY)
FLOW_BATCHES = Counter("bulkhead_flow_batches", "Flow batches received",
                       ["result"], registry=REGISTRY)  # stored | duplicate | rejected
REQUEST_SECONDS = Histogram("bulkhead_request_seconds", "API request latency",
                            ["method", "route", "status"], registry=REGISTRY,
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                     30, 60))
AGENTS = Gauge("bulkhead_agents", "Agents by state", ["state"], registry=REGISTRY)
POLICY_VERSION = Gauge("bulkhead_policy_version", "Active provisioned policy version",
                       registry=REGISTRY)
LONG_POLLS = Gauge("bulkhead_policy_long_polls", "Agents waiting for a policy change",
                   registry=REGISTRY)

_on_scrape: list[Callable[[], None]] = []


def on_scrape(fn: Callable[[], None]) -> None:
    if fn not in _on_scrape:
        _on_scrape.append(fn)


def render() -> bytes:
    for fn in list(_on_scrape):
        fn()
    return generate_latest(REGISTRY)
