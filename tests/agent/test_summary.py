"""Flow summaries from conntrack events and NFLOG packets (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bulkhead.agent.summary import Summarizer, decision_for, parse_prefix
from bulkhead.policy.evaluate import DECISIONS

ME, PEER = "10.0.0.1", "10.0.0.2"


@dataclass(frozen=True)
class Ct:
    kind: str
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    icmp_type: int | None = None
    bytes_orig: int = 0
    bytes_reply: int = 0
    ct_id: int = 0


@dataclass(frozen=True)
class Pkt:
    prefix: str
    proto: int
    src: str
    dst: str
    sport: int
    dport: int


def resolver(calls: list[tuple[object, ...]]):  # type: ignore[no-untyped-def]
    def resolve(direction: str, proto: int, lip: str, lport: int | None, rip: str,
                rport: int | None) -> tuple[str | None, str | None]:
        calls.append((direction, proto, lip, lport, rip, rport))
        if direction == "in" and lport == 5432:
            return "postgres", "postgresql.service"
        if direction == "out":
            return "curl", None
        return None, None
    return resolve


def summ(enforcement: str | None = "visibility") -> tuple[Summarizer, list[tuple[object, ...]]]:
    calls: list[tuple[object, ...]] = []
    s = Summarizer([ME], resolver(calls))
    s.set_policy(enforcement, {3: "shop/web-db", 7: "pci/fence"})
    return s, calls


def test_connections_are_counted_once_per_key_with_processes_and_direction() -> None:
    s, calls = summ()
    for i, sport in enumerate((40000, 40001, 40002)):
        s.connection(Ct("new", 6, PEER, ME, sport, 5432, ct_id=10 + i), 100.0 + i)
    s.connection(Ct("new", 6, ME, PEER, 50000, 443, ct_id=20), 101.5)
    rows = sorted(s.flush(103.0), key=lambda r: str(r["direction"]))
    assert rows == [
        {"ts": 103.0, "src_ip": PEER, "dst_ip": ME, "proto": 6, "direction": "in",
         "dst_port": 5432, "first_seen": 100.0, "last_seen": 102.0, "connections": 3,
         "bytes": 0, "decision": "allowed", "process": "postgres",
         "unit": "postgresql.service"},
        {"ts": 103.0, "src_ip": ME, "dst_ip": PEER, "proto": 6, "direction": "out",
         "dst_port": 443, "first_seen": 101.5, "last_seen": 101.5, "connections": 1,
         "bytes": 0, "decision": "allowed", "process": "curl"}]
    # serving process for inbound (local = dst), client process for outbound (local = src)
    assert calls[0] == ("in", 6, ME, 5432, PEER, 40000)
    assert calls[-1] == ("out", 6, ME, 50000, PEER, 443)
    assert s.flush(104.0) == []  # the next window starts empty


def test_bytes_come_from_counter_updates_as_deltas_across_windows() -> None:
    s, _ = summ()
    s.connection(Ct("new", 6, PEER, ME, 40000, 5432, ct_id=1), 100.0)
    s.counters(Ct("dump", 6, PEER, ME, 40000, 5432, bytes_orig=100, bytes_reply=900,
                  ct_id=1), 100.5)
    (row,) = s.flush(101.0)
    assert (row["connections"], row["bytes"]) == (1, 1000)
    s.counters(Ct("destroy", 6, PEER, ME, 40000, 5432, bytes_orig=150, bytes_reply=1350,
                  ct_id=1), 101.5)
    (row,) = s.flush(102.0)
    assert (row["connections"], row["bytes"]) == (0, 500)  # the growth only, no new connection
    s.counters(Ct("dump", 6, PEER, ME, 40000, 5432, bytes_orig=999, ct_id=1), 102.5)
    assert s.flush(103.0) == []  # destroyed: forgotten


def test_dump_forgets_connections_it_no_longer_lists() -> None:
    s, _ = summ()
    s.connection(Ct("new", 17, PEER, ME, 5000, 53, ct_id=1), 100.0)
    s.connection(Ct("new", 17, PEER, ME, 5001, 53, ct_id=2), 100.0)
    s.dump_done([2])
    assert list(s.tracked) == [2]


@pytest.mark.parametrize(("enforcement", "prefix", "decision", "rule"), [
    ("visibility", "bh:n:-", "potentially_blocked_no_rule", None),
    ("selective", "bh:n:-", "potentially_blocked_no_rule", None),
    ("full", "bh:n:-", "blocked_no_rule", None),
    ("visibility", "bh:d:3", "potentially_blocked_by_deny", "shop/web-db"),
    ("selective", "bh:d:3", "blocked_by_deny", "shop/web-db"),
    ("full", "bh:o:7", "blocked_by_override_deny", "pci/fence"),
    ("visibility", "bh:o:7", "potentially_blocked_by_override_deny", "pci/fence"),
])
def test_logged_verdicts_follow_the_enforcement_state(enforcement: str, prefix: str,
                                                      decision: str, rule: str | None) -> None:
    s, _ = summ(enforcement)
    s.logged(Pkt(prefix, 6, PEER, ME, 40000, 6000), 100.0)
    if not decision.startswith("blocked"):  # log and accept: conntrack sees it too
        s.connection(Ct("new", 6, PEER, ME, 40000, 6000, ct_id=5), 100.0)
    (row,) = s.flush(101.0)
    assert (row["decision"], row.get("rule"), row["connections"]) == (decision, rule, 1)
    assert decision in DECISIONS


def test_dropped_retries_are_one_connection_even_across_windows() -> None:
    s, _ = summ("full")
    for t in (100.0, 100.1, 101.0):  # SYN and retries, same 5-tuple
        s.logged(Pkt("bh:n:-", 6, PEER, ME, 40000, 6000), t)
    s.logged(Pkt("bh:n:-", 6, PEER, ME, 40001, 6000), 100.2)
    (row,) = s.flush(101.5)
    assert (row["connections"], row["decision"], row["first_seen"], row["last_seen"]) == (
        2, "blocked_no_rule", 100.0, 101.0)
    s.logged(Pkt("bh:n:-", 6, PEER, ME, 40000, 6000), 103.0)  # a late retry
    assert s.flush(104.0) == []


def test_a_log_that_arrives_after_its_conntrack_event_moves_the_connection() -> None:
    s, _ = summ("visibility")
    s.connection(Ct("new", 6, PEER, ME, 40000, 6000, ct_id=9), 100.0)
    s.logged(Pkt("bh:n:-", 6, PEER, ME, 40000, 6000), 100.01)
    (row,) = s.flush(101.0)
    assert (row["decision"], row["connections"]) == ("potentially_blocked_no_rule", 1)


def test_nothing_enforced_means_unknown_and_loopback_is_ignored() -> None:
    s, _ = summ(None)
    s.connection(Ct("new", 6, "127.0.0.1", "127.0.0.1", 1, 2), 100.0)
    s.connection(Ct("new", 1, PEER, ME, 0, 0, icmp_type=8, ct_id=3), 100.0)
    (row,) = s.flush(101.0)
    assert (row["proto"], row["dst_port"], row["decision"]) == (1, 8, "unknown")
    assert "process" not in row  # ICMP has no process


def test_prefixes() -> None:
    assert parse_prefix("bh:d:12") == ("d", 12)
    assert parse_prefix("bh:n:-") == ("n", None)
    assert parse_prefix("other") is None and parse_prefix("bh:x:1") is None
    assert decision_for("z", "full") == "unknown"


def test_memory_holds_seconds_of_connections_not_the_whole_window() -> None:
    s, _ = summ("visibility")
    for i in range(1000):  # 100 s of connections inside one (long) window
        t = 100.0 + i / 10
        s.logged(Pkt("bh:n:-", 6, PEER, ME, 10000 + i, 6000), t)
        s.connection(Ct("new", 6, PEER, ME, 10000 + i, 6000, ct_id=i + 1), t)
    assert len(s.recent) + len(s.recent_old) <= 41 and len(s.verdicts) <= 41
    (row,) = s.flush(200.0)
    assert (row["connections"], row["decision"]) == (1000, "potentially_blocked_no_rule")
