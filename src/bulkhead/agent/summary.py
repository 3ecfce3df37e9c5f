"""Per-window flow summaries from conntrack events and NFLOG packets.

Theory of operation
-------------------
The runtime feeds three things into a `Summarizer` and asks for the window's rows at its end:

* `connection(ev, now)` for a conntrack NEW event: the connection is attributed to its local
  process at once (serving process for inbound, client process for outbound; the process may
  be gone by the end of the window) and counted once, in the window it appeared in;
* `counters(ev, now)` for a conntrack update, destroy or dump entry carrying byte counters:
  the growth since the last report is added to the connection's summary of the current
  window (a long connection shows up with `connections` 0 and its new bytes later on);
  `dump_done(seen)` forgets connections that a complete dump no longer lists;
* `logged(pkt, now)` for an NFLOG packet: the renderers log every non-allow verdict with the
  prefix `bh:<o|d|n>:<instance>`, so the packet says which rule (or the default) decided.
  A connection that conntrack also saw (the verdict was "log and accept": visibility or
  selective) takes that decision; one it never saw was dropped, and is summarised from the
  log alone, once per 5-tuple (SYN retries are not new connections).

The decision follows the enforcement state the policy had when the packet was logged:
a `d`/`o` verdict blocks in `full` and `selective` and only would block in `visibility`; the
default `n` blocks only in `full`. Connections not logged were allowed (or `unknown` when
nothing is enforced: `idle`, or no policy yet). `flush(now)` returns FLOW_SCHEMA-shaped dicts
(the agent channel's JSON flow record) and starts the next window. Pure: no clock, no I/O;
the process lookup is injected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

ICMP_PROTOS = (1, 58)
LOG_ACTIONS = {"o": "override_deny", "d": "deny", "n": "no_rule"}
MAX_TRACKED = 150_000  # connections whose byte counters we follow (~100 bytes each)
DROP_MEMORY_S = 30.0  # a dropped 5-tuple seen again within this is a retry, not a connection
PAIRING_S = 2.0  # how long a connection and its NFLOG verdict wait for each other


class PacketLike(Protocol):
    """The 5-tuple the summarizer reads of a conntrack event or an NFLOG packet."""

    @property
    def proto(self) -> int: ...
    @property
    def src(self) -> str: ...
    @property
    def dst(self) -> str: ...
    @property
    def sport(self) -> int: ...
    @property
    def dport(self) -> int: ...


class CtLike(PacketLike, Protocol):
    """What the summarizer reads of a conntrack event (`conntrack.CtEvent`)."""

    @property
    def kind(self) -> str: ...
    @property
    def icmp_type(self) -> int | None: ...
    @property
    def bytes_orig(self) -> int: ...
    @property
    def bytes_reply(self) -> int: ...
    @property
    def ct_id(self) -> int: ...


class LoggedLike(PacketLike, Protocol):
    """What the summarizer reads of an NFLOG packet (`nflog.LoggedPacket`)."""

    @property
    def prefix(self) -> str: ...


# (process, unit) of the local end; None when no process could be found
Resolve = Callable[[str, int, str, int | None, str, int | None], tuple[str | None, str | None]]


def decision_for(action: str, enforcement: str | None) -> str:
    """The policy vocabulary's decision for an NFLOG verdict (`o`, `d` or `n`)."""
    blocked = (enforcement == "full"
               or (enforcement == "selective" and action in ("o", "d")))
    what = {"o": "override_deny", "d": "deny", "n": "no_rule"}.get(action)
    if what is None:
        return "unknown"
    return f"{'blocked' if blocked else 'potentially_blocked'}_{'by_' if action != 'n' else ''}" \
           f"{what}"


def parse_prefix(prefix: str) -> tuple[str, int | None] | None:
    """`bh:d:12` -> ("d", 12); `bh:n:-` -> ("n", None); None when it is not ours."""
    parts = prefix.strip().rstrip(":").split(":")
    if len(parts) != 3 or parts[0] != "bh" or parts[1] not in LOG_ACTIONS:
        return None
    if parts[2] == "-":
        return parts[1], None
    try:
        return parts[1], int(parts[2])
    except ValueError:
        return None


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


FiveTuple = tuple[int, str, str, int | None, int | None]
Key = tuple[str, str, int, str, int, str | None, str | None, str, str | None]
# (src, dst, proto, direction, dst_port, process, unit, decision, rule)


@dataclass
class _Agg:
    connections: int
    bytes: int
    first: float
    last: float


@dataclass
class _Verdict:
    decision: str
    rule: str | None
    first: float
    last: float
    packets: int


class Summarizer:
    def __init__(self, local_ips: Iterable[str], resolve: Resolve | None = None) -> None:
        self.local = set(local_ips)
        self.resolve = resolve
        self.enforcement: str | None = None
        self.rules: dict[int, str] = {}
        self.window: dict[Key, _Agg] = {}
        self.tracked: dict[object, tuple[Key, int]] = {}  # ct id -> (key, bytes reported)
        self.verdicts: dict[FiveTuple, _Verdict] = {}  # logged this window
        self.dropped_seen: dict[FiveTuple, float] = {}  # emitted drops, by last sighting
        # connections of the last PAIRING_S..2*PAIRING_S, for a verdict logged after them
        self.recent: dict[FiveTuple, tuple[Key, object]] = {}
        self.recent_old: dict[FiveTuple, tuple[Key, object]] = {}
        self.rotate_at: float | None = None
        self.keys: dict[Key, Key] = {}  # interned summary keys of this window
        self.unresolved = 0

    # -- inputs ----------------------------------------------------------------------------
    def set_policy(self, enforcement: str | None, rules: dict[int, str]) -> None:
        """The enforcement state programmed now, and rule ids by rule instance."""
        self.enforcement = enforcement
        self.rules = dict(rules)

    def set_local(self, ips: Iterable[str]) -> None:
        self.local = set(ips)

    def _direction(self, src: str, dst: str) -> str | None:
        if _loopback(src) or _loopback(dst):
            return None
        if dst in self.local:
            return "in"
        if src in self.local or not self.local:
            return "out"
        return None  # forwarded traffic: not ours

    def _port(self, proto: int, dport: int | None, icmp_type: int | None) -> int:
        if proto in ICMP_PROTOS:
            return icmp_type if icmp_type is not None else -1
        return dport if dport is not None else -1

    def _process(self, direction: str, proto: int, src: str, sport: int | None, dst: str,
                 dport: int | None) -> tuple[str | None, str | None]:
        if self.resolve is None or proto in ICMP_PROTOS:
            return None, None
        if direction == "in":
            got = self.resolve("in", proto, dst, dport, src, sport)
        else:
            got = self.resolve("out", proto, src, sport, dst, dport)
        if got[0] is None and got[1] is None:
            self.unresolved += 1
        return got

    def _default_decision(self) -> str:
        return "unknown" if self.enforcement in (None, "idle") else "allowed"

    def _rotate(self, now: float) -> None:
        """Bounds memory to a few seconds of connections, whatever the window's length:
        a verdict and its connection meet within PAIRING_S or not at all."""
        if self.rotate_at is None:
            self.rotate_at = now + PAIRING_S
        elif now >= self.rotate_at:
            self.recent_old, self.recent = self.recent, {}
            self.verdicts = {k: v for k, v in self.verdicts.items()
                             if v.packets >= 0 or now - v.last < PAIRING_S}
            self.rotate_at = now + PAIRING_S

    def connection(self, ev: CtLike, now: float) -> None:
        """A conntrack NEW event."""
        self._rotate(now)
        direction = self._direction(ev.src, ev.dst)
        if direction is None:
            return
        five: FiveTuple = (ev.proto, ev.src, ev.dst, ev.sport, ev.dport)
        verdict = self.verdicts.get(five)
        if verdict is not None:
            decision, rule = verdict.decision, verdict.rule
            verdict.packets = -1  # matched: not a dropped connection
        else:
            decision, rule = self._default_decision(), None
        process, unit = self._process(direction, ev.proto, ev.src, ev.sport, ev.dst, ev.dport)
        key: Key = (ev.src, ev.dst, ev.proto, direction,
                    self._port(ev.proto, ev.dport, ev.icmp_type), process, unit, decision, rule)
        key = self.keys.setdefault(key, key)  # one tuple per summary, not per connection
        self._add(key, 1, self._bytes(ev), now)
        ident = ev.ct_id if ev.ct_id else five
        self.recent[five] = (key, ident)
        if len(self.tracked) < MAX_TRACKED:
            self.tracked[ident] = (key, self._bytes(ev))

    @staticmethod
    def _bytes(ev: CtLike) -> int:
        return (ev.bytes_orig or 0) + (ev.bytes_reply or 0)

    def counters(self, ev: CtLike, now: float) -> None:
        """A conntrack update, destroy or dump entry: adds the bytes since the last report."""
        ident = ev.ct_id if ev.ct_id else (ev.proto, ev.src, ev.dst, ev.sport, ev.dport)
        got = self.tracked.get(ident)
        if got is None:
            return
        key, reported = got
        total = self._bytes(ev)
        if total > reported:
            self._add(key, 0, total - reported, now)
            self.tracked[ident] = (key, total)
        if ev.kind.lower() == "destroy":
            del self.tracked[ident]

    def dump_done(self, seen: Iterable[object]) -> None:
        """After a complete dump: forget connections it no longer lists (ids as `ct_id`)."""
        keep = set(seen)
        for ident in [i for i in self.tracked if i not in keep and isinstance(i, int)]:
            del self.tracked[ident]

    def logged(self, pkt: LoggedLike, now: float) -> None:
        """An NFLOG packet from one of our rules."""
        parsed = parse_prefix(pkt.prefix)
        if parsed is None:
            return
        self._rotate(now)
        action, instance = parsed
        five: FiveTuple = (pkt.proto, pkt.src, pkt.dst, pkt.sport, pkt.dport)
        v = self.verdicts.get(five)
        if v is not None:
            v.last = now
            if v.packets >= 0:
                v.packets += 1
            return
        rule = None if instance is None else self.rules.get(instance, f"instance:{instance}")
        verdict = _Verdict(decision_for(action, self.enforcement), rule, now, now, 1)
        self.verdicts[five] = verdict
        seen = self.recent.get(five) or self.recent_old.get(five)
        if seen is not None:  # conntrack reported it first: move it to its decision
            verdict.packets = -1
            old, ident = seen
            agg = self.window.get(old)
            if agg is not None and agg.connections > 0:
                agg.connections -= 1
                new: Key = (*old[:7], verdict.decision, rule)
                self._add(new, 1, 0, now)
                self.recent[five] = (new, ident)
                if ident in self.tracked:
                    self.tracked[ident] = (new, self.tracked[ident][1])

    def _add(self, key: Key, connections: int, nbytes: int, now: float) -> None:
        agg = self.window.get(key)
        if agg is None:
            self.window[key] = _Agg(connections, nbytes, now, now)
        else:
            agg.connections += connections
            agg.bytes += nbytes
            agg.last = now

    # -- output ----------------------------------------------------------------------------
    def flush(self, now: float) -> list[dict[str, object]]:
        """The window's summaries (JSON flow records); starts the next window."""
        for five, v in self.verdicts.items():
            if v.packets < 0:
                continue  # conntrack saw it: counted there
            proto, src, dst, sport, dport = five
            direction = self._direction(src, dst)
            if direction is None:
                continue
            seen = self.dropped_seen.get(five)
            self.dropped_seen[five] = v.last
            if seen is not None and v.first - seen <= DROP_MEMORY_S:
                continue  # a retry of a drop already reported
            process, unit = self._process(direction, proto, src, sport, dst, dport)
            port = -1 if proto in ICMP_PROTOS else (dport if dport is not None else -1)
            key: Key = (src, dst, proto, direction, port, process, unit, v.decision, v.rule)
            agg = self.window.get(key)
            if agg is None:
                self.window[key] = _Agg(1, 0, v.first, v.last)
            else:
                agg.connections += 1
                agg.first = min(agg.first, v.first)
                agg.last = max(agg.last, v.last)
        self.verdicts = {}
        self.recent, self.recent_old = {}, {}
        self.keys = {}
        self.dropped_seen = {k: t for k, t in self.dropped_seen.items()
                             if now - t <= DROP_MEMORY_S}
        rows: list[dict[str, object]] = []
        for key, agg in self.window.items():
            if agg.connections == 0 and agg.bytes == 0:
                continue
            src, dst, proto, direction, port, process, unit, decision, rule = key
            row: dict[str, object] = {
                "ts": now, "src_ip": src, "dst_ip": dst, "proto": proto,
                "direction": direction, "dst_port": port, "first_seen": agg.first,
                "last_seen": agg.last, "connections": agg.connections, "bytes": agg.bytes,
                "decision": decision}
            if process is not None:
                row["process"] = process
            if unit is not None:
                row["unit"] = unit
            if rule is not None:
                row["rule"] = rule
            rows.append(row)
        self.window = {}
        return rows
