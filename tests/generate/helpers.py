"""Shared fixtures of the generator tests: a synthetic estate, its flows, CSV writing."""

from __future__ import annotations

import csv
from pathlib import Path

from bulkhead.domain.model import Policy
from bulkhead.generate import FlowColumns
from bulkhead.generate import synthetic as syn

T0 = 1_800_000_000.0
DAY = 86_400.0


def estate(apps: int = 4) -> tuple[Policy, list[syn.Intent]]:
    return syn.estate(apps=apps)


def two_days(policy: Policy, intents: list[syn.Intent], n: int = 12_000,
             seed: int = 1) -> FlowColumns:
    return syn.flows(policy, intents, n, start=T0, duration=2 * DAY, seed=seed)


def write_csv(path: Path, f: FlowColumns) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["src_ip", "dst_ip", "proto", "dst_port", "ts", "count"])
        ts = list(f.ts) if f.ts is not None else []
        counts = list(f.count) if f.count is not None else []
        for i in range(len(f)):
            w.writerow([f.src_ip[i], f.dst_ip[i], int(f.proto[i]),  # type: ignore[index]
                        int(f.dst_port[i]), f"{ts[i]:.3f}", int(counts[i])])  # type: ignore[index]
