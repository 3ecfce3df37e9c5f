"""Vectorised batch evaluation: `Evaluator.decide` for millions of flows, row for row.

Theory of operation
-------------------
Every rule instance of the resolved policy owns one bit, so a set of instances is a *row* of
``W = ceil(instances / 64)`` uint64 words. A flow matches the instances in

    consumers(src, user) & providers(dst) & services(proto, port, process, unit)

and its decision is a function of that row (through the override_deny / allow / deny masks, as
in `evaluate.raw_verdict`) and of the enforcement states of its two ends (`evaluate.combine`).

Rows are never materialised per flow. Each distinct row lives once in a registry (`_Rows`,
keyed by its bytes; new batches of rows are first de-duplicated with a 64-bit hash and
`np.unique`, then verified word for word, falling back to an exact byte-wise unique on a
collision), and a flow only carries small integer *class ids*:

- addresses: per workload a consumer and a provider row (label identity rows, computed once per
  distinct label set, plus named-workload terms); per IP-list "elementary interval" (the
  segments between all IP-list boundaries, IPv4 and IPv6 separately) the rows of the instances
  whose IP lists cover it. An address's row is the OR of the two. For IPv4 the workload
  addresses are merged into the IP-list boundaries as one-address segments, and each segment
  gets its consumer class, provider class and enforcement state up front; a uint32 address
  finds its segment through a two-level radix table (`_V4Index`: top 16 bits, then a
  per-bucket table of offsets; `np.searchsorted` only for buckets beyond its memory budget).
  Address strings go through a dictionary of distinct values: canonical dotted quads take the
  uint32 path (for them the reference's lookup by text is a lookup by value); anything else
  (IPv6, other spellings, `ipaddress` objects) is parsed once per distinct value and looked up
  exactly as `Evaluator.workload_for` does, with `bisect` over the IPv6 IP-list segments.
- services: per protocol a 65,538-entry port table maps (proto, port) to a port *segment* (the
  port ranges of all specs cut the axis into segments that every spec treats alike); the
  process/unit of a flow maps to a *binding class* (which service bindings it satisfies); a
  small table maps (segment, binding class) to a service row.
- users: each distinct user name maps to the row of instances whose user groups include it.
  Only the consumer's host sees the user (docs/policy-format.md), so, as in `Evaluator.decide`,
  the provider side's raw verdict comes from the instances matched without user groups and the
  consumer side's (and the reported rules) from all of them.

Classes are then combined pairwise through memo tables: (consumer, provider) by AND into a
"pair" class, (pair, service) by AND into a final class, and, for flows with a user,
(consumer, user) by OR into another consumer class that goes the same way. A memo is a dense
int32 table indexed by ``a * cap_b + b`` (only combinations never seen before are computed,
once per evaluator), or, when the product of the class counts would make that table too large,
`np.unique` over the chunk. Each final class stores its raw verdict code and its pattern (the
tuple of matching rule ids, in instance order without repeats, exactly as the reference builds
it). The decision and the deciding side come from 625-entry lookup tables (provider raw
verdict x consumer raw verdict x provider state x consumer state, state 0 = no side) filled by
calling `evaluate.combine` itself, so softening, outbound mode and "worst side wins, ties to the
provider" cannot drift from the reference.

Flows are processed in chunks (`CHUNK` rows), so the temporaries are a few small integer arrays
per chunk whatever the input size; the memo tables are bounded by `DENSE_LIMIT` entries each.
Process, unit and user columns are reduced to classes once per distinct value.

Deliberate difference: an address that does not parse raises `ValueError` naming the row (the
reference treats it as external unless some rule uses an IP list).
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from bulkhead.domain.addresses import V4_MAX, V6_MAX, AddressSet, parse_ip
from bulkhead.domain.model import ENFORCEMENT_STATES, Policy, Workload
from bulkhead.domain.ports import PortSpec
from bulkhead.policy.evaluate import (
    DECISIONS,
    RAW_VERDICTS,
    Decision,
    combine,
    raw_verdict,
)
from bulkhead.policy.resolve import (
    Match,
    ResolvedPolicy,
    ResolvedService,
    Side,
    exe_name,
    match_labels,
    resolve,
)

U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
I32 = npt.NDArray[np.int32]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]

# a column of addresses: text, ipaddress objects, or IPv4 as integers (uint32 array: fast path)
Addresses = (Sequence[str] | Sequence[int] | Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]
             | npt.NDArray[Any])
SIDES: tuple[str, ...] = ("", "provider", "consumer")
CHUNK = 1 << 16  # flows per chunk
DENSE_LIMIT = 1 << 22  # largest memo table (entries of int32) before falling back to np.unique
PORT_SLOTS = 65538  # port index: 0 = no port (or negative), 1 + port for 0..65535, 65537 above
_DECISION_CODE = {d: i for i, d in enumerate(DECISIONS)}
_RAW_CODE = {r: i for i, r in enumerate(RAW_VERDICTS)}
_SIDE_CODE = {s: i for i, s in enumerate(SIDES)}
_HASH_MULT: U64 = (np.random.default_rng(0x5EED_B17).integers(
    1, 2**63, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)).astype(np.uint64)


# -- results ----------------------------------------------------------------------------------

@dataclass
class BatchResult:
    """One row per input flow; `row(i)` equals `Evaluator.decide` of that flow."""

    decision: U8  # codes indexing evaluate.DECISIONS
    side: U8  # 0 "", 1 "provider", 2 "consumer"
    pattern: I32  # index into `patterns`
    patterns: list[tuple[str, ...]]  # matching rule ids per pattern (policy order, no repeats)

    def __len__(self) -> int:
        return int(self.decision.shape[0])

    def decisions(self) -> list[str]:
        return np.asarray(DECISIONS, dtype=object)[self.decision].tolist()  # type: ignore[no-any-return]

    def sides(self) -> list[str]:
        return np.asarray(SIDES, dtype=object)[self.side].tolist()  # type: ignore[no-any-return]

    def rules(self, i: int) -> tuple[str, ...]:
        return self.patterns[int(self.pattern[i])]

    def row(self, i: int) -> Decision:
        return Decision(DECISIONS[int(self.decision[i])], SIDES[int(self.side[i])],
                        self.rules(i))


# -- distinct rows ----------------------------------------------------------------------------

def unique_rows(rows: U64) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(index of one representative per distinct row, inverse) for a (k, W) uint64 array.

    Rows are hashed to one uint64 each and `np.unique`d; the representatives are then checked
    word for word against every row, and on a collision an exact byte-wise unique is used."""
    k, w = rows.shape
    if k <= 1:
        return np.zeros(k, np.intp), np.zeros(k, np.intp)
    mult = _HASH_MULT[np.arange(w) % _HASH_MULT.shape[0]]
    mixed = rows ^ (rows >> np.uint64(29))
    h = (mixed * mult).sum(axis=1, dtype=np.uint64)
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    if not np.array_equal(rows[first[inv]], rows):
        raw = np.ascontiguousarray(rows).view(np.dtype((np.void, 8 * w))).reshape(-1)
        _, first, inv = np.unique(raw, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
    return first, inv


class _Rows:
    """A registry of distinct rows with stable ids (0, 1, ... in order of first sight)."""

    def __init__(self, words: int) -> None:
        self.words = words
        self.data: U64 = np.zeros((64, words), np.uint64)
        self.n = 0
        self.index: dict[bytes, int] = {}

    def rows(self) -> U64:
        return self.data[:self.n]

    def add(self, rows: U64) -> I32:
        """Ids of `rows` (k, W), registering the new ones."""
        if rows.shape[0] == 0:
            return np.zeros(0, np.int32)
        rows = np.ascontiguousarray(rows, dtype=np.uint64)
        first, inv = unique_rows(rows)
        ids = np.empty(first.shape[0], np.int32)
        for j, r in enumerate(first.tolist()):
            row = rows[r]
            key = row.tobytes()
            got = self.index.get(key)
            if got is None:
                got = self._append(row)
                self.index[key] = got
            ids[j] = got
        return ids[inv]

    def _append(self, row: U64) -> int:
        if self.n == self.data.shape[0]:
            grown = np.zeros((2 * self.n, self.words), np.uint64)
            grown[:self.n] = self.data
            self.data = grown
        self.data[self.n] = row
        self.n += 1
        return self.n - 1


class _FinalRows(_Rows):
    """Final classes: each also knows its raw verdict code and its pattern id."""

    def __init__(self, words: int, masks: tuple[U64, U64, U64], rule_ids: Sequence[str],
                 patterns: list[tuple[str, ...]], pattern_index: dict[tuple[str, ...], int]
                 ) -> None:
        super().__init__(words)
        self.masks = masks  # override_deny, allow, deny
        self.rule_ids = rule_ids
        self.patterns = patterns
        self.pattern_index = pattern_index
        # the raw verdict code r premultiplied for the decision tables: as the consumer side's
        # verdict (25 r), as the provider side's (125 r), as both (150 r)
        self.raw25: U16 = np.zeros(64, np.uint16)
        self.raw125: U16 = np.zeros(64, np.uint16)
        self.raw150: U16 = np.zeros(64, np.uint16)
        self.pattern: I32 = np.zeros(64, np.int32)
        self.raw_lut = [_RAW_CODE[raw_verdict(bool(o), bool(a), bool(d))]
                        for o in (0, 1) for a in (0, 1) for d in (0, 1)]

    def _append(self, row: U64) -> int:
        i = super()._append(row)
        if i == self.raw25.shape[0]:
            self.raw25 = np.concatenate([self.raw25, np.zeros_like(self.raw25)])
            self.raw125 = np.concatenate([self.raw125, np.zeros_like(self.raw125)])
            self.raw150 = np.concatenate([self.raw150, np.zeros_like(self.raw150)])
            self.pattern = np.concatenate([self.pattern, np.zeros_like(self.pattern)])
        o, a, d = (bool((row & m).any()) for m in self.masks)
        r = self.raw_lut[4 * o + 2 * a + d]
        self.raw25[i], self.raw125[i], self.raw150[i] = 25 * r, 125 * r, 150 * r
        bits = np.flatnonzero(np.unpackbits(row.astype("<u8").view(np.uint8),
                                            bitorder="little"))
        rules = tuple(dict.fromkeys(self.rule_ids[b] for b in bits.tolist()))
        pid = self.pattern_index.get(rules)
        if pid is None:
            pid = len(self.patterns)
            self.patterns.append(rules)
            self.pattern_index[rules] = pid
        self.pattern[i] = pid
        return i


class _Pairs:
    """Memo of (a, b) -> id in `out` of `rows_a[a] OP rows_b[b]`."""

    def __init__(self, a: _Rows, b: _Rows, out: _Rows, op: np.ufunc) -> None:
        self.a, self.b, self.out, self.op = a, b, out, op
        self.cap_a = self.cap_b = 0
        self.lut: I32 | None = np.zeros(0, np.int32)

    def _fit(self) -> None:
        na, nb = self.a.n, self.b.n
        if self.lut is None or (na <= self.cap_a and nb <= self.cap_b):
            return
        cap_a = max(self.cap_a, 1 << max(na - 1, 1).bit_length())
        cap_b = max(self.cap_b, 1 << max(nb - 1, 1).bit_length())
        if cap_a * cap_b > DENSE_LIMIT:
            self.lut = None
            return
        lut = np.full((cap_a, cap_b), -1, np.int32)
        if self.lut.size:
            lut[:self.cap_a, :self.cap_b] = self.lut.reshape(self.cap_a, self.cap_b)
        self.lut, self.cap_a, self.cap_b = lut.reshape(-1), cap_a, cap_b

    def _compute(self, xa: npt.NDArray[Any], xb: npt.NDArray[Any]) -> I32:
        rows = self.op(self.a.data[xa], self.b.data[xb])
        return self.out.add(rows)

    def __call__(self, x: I32, y: I32) -> I32:
        self._fit()
        if self.lut is None:
            nb = self.b.n
            key = x.astype(np.int64) * nb + y
            uk, inv = np.unique(key, return_inverse=True)
            ids: I32 = self._compute(uk // nb, uk % nb)[inv.reshape(-1)]
            return ids
        key32 = x * np.int32(self.cap_b) + y
        got: I32 = self.lut[key32]
        miss = got < 0
        if miss.any():
            mk = np.unique(key32[miss])
            self.lut[mk] = self._compute(mk // self.cap_b, mk % self.cap_b)
            got = self.lut[key32]
        return got


# -- helpers ------------------------------------------------------------------------------------

def _set_bits(rows: U64, mask: Bools, bit: int) -> None:
    """rows[mask] |= bit (instance number `bit`)."""
    rows[mask, bit >> 6] |= np.uint64(1 << (bit & 63))


def _pack(flags: Bools, words: int) -> U64:
    """A (k, n) bool matrix as (k, words) uint64 rows, bit i of the row = column i."""
    k, n = flags.shape
    padded = np.zeros((k, words * 64), np.bool_)
    padded[:, :n] = flags
    packed = np.packbits(padded, axis=1, bitorder="little")
    return packed.view("<u8").astype(np.uint64)


def _state(w: Workload | None) -> int:
    """0 = no side (external or unmanaged), 1 + index in ENFORCEMENT_STATES otherwise."""
    if w is None or not w.managed:
        return 0
    return 1 + ENFORCEMENT_STATES.index(w.enforcement)


@lru_cache(maxsize=4)
def _decision_tables(outbound: str) -> tuple[U8, U8]:
    """Decision and side codes indexed by
    provider_raw * 125 + consumer_raw * 25 + provider_state * 5 + consumer_state
    (read-only, shared by every evaluator with the same outbound mode)."""
    def stub(state: int) -> Workload | None:
        if state == 0:
            return None
        return Workload(f"s{state}", managed=True,
                        enforcement=ENFORCEMENT_STATES[state - 1])  # type: ignore[arg-type]

    dec = np.zeros(625, np.uint8)
    side = np.zeros(625, np.uint8)
    for rp, p_raw in enumerate(RAW_VERDICTS):
        for rc, c_raw in enumerate(RAW_VERDICTS):
            for ps in range(5):
                for cs in range(5):
                    d, s = combine(p_raw, stub(ps), stub(cs), outbound, consumer_raw=c_raw)
                    key = rp * 125 + rc * 25 + ps * 5 + cs
                    dec[key] = _DECISION_CODE[d]
                    side[key] = _SIDE_CODE[s]
    dec.flags.writeable = False
    side.flags.writeable = False
    return dec, side


def _as_list(values: Iterable[Any] | npt.NDArray[Any]) -> list[Any]:
    if isinstance(values, np.ndarray):
        return values.tolist()  # type: ignore[no-any-return]
    return list(values)


def _map_distinct(items: list[Any], classify: Callable[[Any], int]) -> I32:
    """`classify` of every item as int32, called once per distinct item."""
    table = {v: classify(v) for v in dict.fromkeys(items)}
    return np.fromiter(map(table.__getitem__, items), np.int32, count=len(items))


class _AddressSegments:
    """The elementary intervals of every IP list used by a rule, one family."""

    def __init__(self, sides: list[tuple[int, Side]], version: int, words: int) -> None:
        top = V4_MAX if version == 4 else V6_MAX
        sets: dict[AddressSet, int] = {}
        for _, s in sides:
            sets.setdefault(s.addresses, len(sets))

        def intervals(a: AddressSet) -> tuple[tuple[int, int], ...]:
            return a.v4 if version == 4 else a.v6

        bounds = {0}
        for a in sets:
            for lo, hi in intervals(a):
                bounds.add(lo)
                if hi < top:
                    bounds.add(hi + 1)
        self.starts = sorted(bounds)
        n = len(self.starts)
        member = np.zeros((len(sets), n), np.bool_)
        for j, a in enumerate(sets):
            diff = np.zeros(n + 1, np.int32)
            for lo, hi in intervals(a):
                diff[bisect_left(self.starts, lo)] += 1
                diff[bisect_left(self.starts, hi + 1) if hi < top else n] -= 1
            member[j] = np.cumsum(diff[:n]) > 0
        self.rows: U64 = np.zeros((n, words), np.uint64)
        for idx, s in sides:
            _set_bits(self.rows, member[sets[s.addresses]], idx)

    def find(self, value: int) -> int:
        return bisect_right(self.starts, value) - 1


# -- the evaluator ------------------------------------------------------------------------------

class _V4Index:
    """Segment of a uint32 address among sorted segment starts (starts[0] == 0).

    A two-level radix table replaces most binary searches: the top 16 bits pick a bucket;
    a bucket inside one segment answers directly, a bucket cut by segment starts has its own
    65,536-entry table of offsets (uint16, 128 KiB) for up to `max_tables` buckets (16 MiB;
    the ones with the most segments); flows in any other cut bucket fall back to
    `np.searchsorted`."""

    def __init__(self, starts: U32, max_tables: int = 128) -> None:
        self.starts = starts
        edges = np.arange(65537, dtype=np.int64) << 16
        first = np.searchsorted(starts.astype(np.int64), edges[:-1], side="right") - 1
        last = np.searchsorted(starts.astype(np.int64), edges[1:] - 1, side="right") - 1
        self.base: I32 = first.astype(np.int32)
        width = last - first
        cut = np.flatnonzero(width > 0)
        chosen = cut[np.argsort(-width[cut], kind="stable")[:max_tables]]
        self.table_of: I32 = np.zeros(65536, np.int32)  # 0: uniform (row 0 is all zeros)
        self.table_of[cut] = -1  # cut but without a table: binary search
        tables = np.zeros((len(chosen) + 1, 65536), np.uint16)
        starts64 = starts.astype(np.int64)
        for k, b in enumerate(np.sort(chosen).tolist(), start=1):
            self.table_of[b] = k
            lo, hi = int(first[b]), int(last[b])
            inner = starts64[lo + 1:hi + 1] - (b << 16)  # segment starts inside the bucket
            marks = np.zeros(65536, np.uint16)
            marks[inner] = 1
            tables[k] = np.cumsum(marks, dtype=np.uint16)
        self.tables: npt.NDArray[np.uint16] = tables.reshape(-1)
        self.searching = bool((self.table_of < 0).any())

    def find(self, x: U32) -> I32:
        bucket = x >> np.uint32(16)
        k = self.table_of[bucket]
        seg: I32 = self.base[bucket]  # fancy indexing copies: safe to update in place
        if self.searching:
            slow = k < 0
            if slow.any():
                seg[slow] = np.searchsorted(self.starts, x[slow], side="right") - 1
                k[slow] = 0
        # int32 is enough: k <= max_tables + 1, so (k << 16) stays far below 2**31
        seg += self.tables[(k << np.int32(16)) | (x & np.uint32(0xFFFF)).view(np.int32)]
        return seg


class _End:
    """Per-row class ids of one end of the flows (source or destination), and the end's
    state code (`_state`; times 5 for the destination, ready to index the decision tables)."""

    def __init__(self, index: npt.NDArray[Any] | None, cls: I32, state: U8,
                 v4: _V4Index | None = None, values: U32 | None = None) -> None:
        self.index = index  # per-row index into cls/state (strings), or None (uint32 path)
        self.cls = cls
        self.state = state
        self.v4 = v4
        self.values = values

    def chunk(self, lo: int, hi: int) -> tuple[I32, U8]:
        if self.index is not None:
            ix = self.index[lo:hi]
        else:
            assert self.v4 is not None and self.values is not None
            ix = self.v4.find(self.values[lo:hi])
        return self.cls[ix], self.state[ix]


class BatchEvaluator:
    """Decides many flows at once; agrees with `Evaluator.decide` on every row."""

    def __init__(self, policy: Policy | ResolvedPolicy) -> None:
        self.resolved = policy if isinstance(policy, ResolvedPolicy) else resolve(policy)
        self.policy = self.resolved.policy
        instances = self.resolved.instances
        self.n_instances = n = len(instances)
        self.words = words = max(1, (n + 63) // 64)
        self.rule_ids = [i.rule_id for i in instances]
        self.patterns: list[tuple[str, ...]] = []
        self._pattern_index: dict[tuple[str, ...], int] = {}
        masks = tuple(_pack(np.array([[i.action == a for i in instances]], np.bool_).reshape(
            1, n), words)[0] for a in ("override_deny", "allow", "deny"))
        self._dec_lut, self._side_lut = _decision_tables(self.policy.settings.outbound)

        self._cons = _Rows(words)
        self._prov = _Rows(words)
        self._svc = _Rows(words)
        self._users = _Rows(words)
        self._pair = _Rows(words)
        self._final = _FinalRows(words, (masks[0], masks[1], masks[2]), self.rule_ids,
                                 self.patterns, self._pattern_index)
        self._cons_user = _Pairs(self._cons, self._users, self._cons, np.bitwise_or)
        self._cons_prov = _Pairs(self._cons, self._prov, self._pair, np.bitwise_and)
        self._pair_svc = _Pairs(self._pair, self._svc, self._final, np.bitwise_and)
        self._users.add(np.zeros((1, words), np.uint64))  # id 0: no user bits

        self._build_workloads()
        self._build_ip_lists()
        self._build_v4_segments()
        self._build_services()
        self._user_instances: dict[str, list[int]] = {}
        for idx, inst in enumerate(instances):
            for u in inst.consumers.users:
                self._user_instances.setdefault(u, []).append(idx)
        self._user_ids: dict[str, int] = {}

    # -- set-up: workloads ----------------------------------------------------------------
    def _build_workloads(self) -> None:
        workloads = self.policy.workloads
        instances = self.resolved.instances
        words = self.words
        self.by_ip: dict[str, Workload] = {ip: w for w in workloads for ip in w.ips}
        # the reference indexes rows by name (the last workload of a name wins)
        self._row_of_name = {w.name: i for i, w in enumerate(workloads)}
        idents: dict[tuple[tuple[str, str], ...], int] = {}
        ident_of = np.zeros(len(workloads), np.intp)
        labels_of: list[dict[str, str]] = []
        for i, w in enumerate(workloads):
            lab = w.label_dict
            labels_of.append(lab)
            ident_of[i] = idents.setdefault(tuple(sorted(lab.items())), len(idents))
        ident_labels = [dict(k) for k in idents]
        n_ident = len(ident_labels)
        vocab: dict[str, dict[str, int]] = {}
        for lab in ident_labels:
            for k, v in lab.items():
                vk = vocab.setdefault(k, {})
                vk.setdefault(v, len(vk))
        cols = {k: np.array([vk[lab[k]] if k in lab else -1 for lab in ident_labels], np.intp)
                for k, vk in vocab.items()}
        masks: dict[Match, Bools] = {}

        def mask_of(m: Match) -> Bools:
            got = masks.get(m)
            if got is None:
                got = np.ones(n_ident, np.bool_)
                for key, values in m:
                    vk = vocab.get(key)
                    if vk is None:
                        got = np.zeros(n_ident, np.bool_)
                        break
                    table = np.zeros(len(vk) + 1, np.bool_)  # last entry: key absent
                    for v in values:
                        if v in vk:
                            table[vk[v]] = True
                    got &= table[cols[key]]
                masks[m] = got
            return got

        named: dict[str, list[tuple[Match, int, bool]]] = {}
        rows_c = np.zeros((n_ident, words), np.uint64)
        rows_p = np.zeros((n_ident, words), np.uint64)
        for idx, inst in enumerate(instances):
            for side, rows, is_prov in ((inst.consumers, rows_c, False),
                                        (inst.providers, rows_p, True)):
                acc: Bools | None = None
                for t in side.terms:
                    if t.name is not None:
                        named.setdefault(t.name, []).append((t.match, idx, is_prov))
                        continue
                    m = mask_of(t.match)
                    acc = m if acc is None else acc | m
                if acc is not None:
                    _set_bits(rows, acc, idx)
        nw = len(workloads)
        # workload rows, plus one all-zero row at index nw for "no workload"
        self._w_cons: U64 = np.zeros((nw + 1, words), np.uint64)
        self._w_prov: U64 = np.zeros((nw + 1, words), np.uint64)
        self._w_cons[:nw] = rows_c[ident_of]
        self._w_prov[:nw] = rows_p[ident_of]
        for i, w in enumerate(workloads):
            for match, idx, is_prov in named.get(w.name, ()):
                if match_labels(match, labels_of[i]):
                    target = self._w_prov if is_prov else self._w_cons
                    target[i, idx >> 6] |= np.uint64(1 << (idx & 63))

    def _workload_row(self, w: Workload | None) -> int:
        return len(self.policy.workloads) if w is None else self._row_of_name[w.name]

    # -- set-up: IP lists -------------------------------------------------------------------
    def _build_ip_lists(self) -> None:
        instances = self.resolved.instances
        segs: dict[tuple[int, bool], _AddressSegments] = {}
        for version in (4, 6):
            for consumer in (True, False):
                sides = [(idx, i.consumers if consumer else i.providers)
                         for idx, i in enumerate(instances)]
                sides = [(idx, s) for idx, s in sides
                         if (s.addresses.v4 if version == 4 else s.addresses.v6)]
                segs[version, consumer] = _AddressSegments(sides, version, self.words)
        self._ipl = segs

    def _build_v4_segments(self) -> None:
        """Merged IPv4 segments: IP-list boundaries plus every workload address as [a, a+1)."""
        ws4: dict[int, Workload] = {}
        for k, w in self.by_ip.items():
            try:
                a = ipaddress.ip_address(k)
            except ValueError:
                continue
            if a.version == 4 and str(a) == k:
                ws4[int(a)] = w
        bounds = set(self._ipl[4, True].starts) | set(self._ipl[4, False].starts) | set(ws4)
        bounds |= {a + 1 for a in ws4 if a < V4_MAX}
        starts = np.array(sorted(bounds), np.uint32)
        self._v4_index = _V4Index(starts)
        wrow = np.array([self._workload_row(ws4.get(x)) for x in starts.tolist()], np.intp)
        state = np.array([_state(ws4.get(x)) for x in starts.tolist()], np.uint8)
        ci = np.searchsorted(np.array(self._ipl[4, True].starts, np.uint64),
                             starts.astype(np.uint64), side="right") - 1
        pi = np.searchsorted(np.array(self._ipl[4, False].starts, np.uint64),
                             starts.astype(np.uint64), side="right") - 1
        self._v4_cons = self._cons.add(self._w_cons[wrow] | self._ipl[4, True].rows[ci])
        self._v4_prov = self._prov.add(self._w_prov[wrow] | self._ipl[4, False].rows[pi])
        self._v4_state: U8 = state

    # -- set-up: services --------------------------------------------------------------------
    def _build_services(self) -> None:
        instances = self.resolved.instances
        specs: dict[PortSpec, int] = {}
        binds: dict[tuple[str | None, str | None], int] = {}
        services: dict[ResolvedService, int] = {}
        for inst in instances:
            for s in inst.services:
                specs.setdefault(s.spec, len(specs))
                binds.setdefault((s.process, s.unit), len(binds))
                services.setdefault(s, len(services))
        self._binds = list(binds)
        self._svc_spec = np.array([specs[s.spec] for s in services], np.intp)
        self._svc_bind = np.array([binds[s.process, s.unit] for s in services], np.intp)
        self._inst_svcs = [np.array([services[s] for s in inst.services], np.intp)
                           for inst in instances]
        protos = sorted({s.proto for s in specs if s.proto is not None})
        slot_of = {p: k + 1 for k, p in enumerate(protos)}
        proto_slot = np.zeros(258, np.int32)  # index proto + 1, proto clipped to -1..256
        for p, k in slot_of.items():
            proto_slot[p + 1] = k
        # proto (-1..256, index + 1) -> where its row of the port table starts, plus one so
        # that adding the port (-1 = none .. 65536 = above) gives the cell
        self._slot_base: I32 = (proto_slot * PORT_SLOTS + 1).astype(np.int32)
        table = np.zeros((len(protos) + 1, PORT_SLOTS), np.int32)
        reps: list[tuple[int, int | None]] = []
        for k, proto in enumerate([-1, *protos]):
            starts = {0}
            for sp in specs:
                if sp.proto == proto and sp.lo is not None and sp.hi is not None:
                    starts.add(sp.lo + 1)
                    if sp.hi + 2 < PORT_SLOTS:
                        starts.add(sp.hi + 2)
            ordered = sorted(starts)
            for j, st in enumerate(ordered):
                end = ordered[j + 1] if j + 1 < len(ordered) else PORT_SLOTS
                table[k, st:end] = len(reps)
                reps.append((proto, None if st == 0 else st - 1))
        self._port_table: I32 = table.reshape(-1)
        spec_list = list(specs)
        self._spec_ok: Bools = np.array(
            [[sp.matches(proto, port) for sp in spec_list] for proto, port in reps],
            np.bool_).reshape(len(reps), len(spec_list))
        self._bind_ids: dict[tuple[bool, ...], int] = {}
        self._bind_cache: dict[tuple[str | None, str | None], int] = {}
        self._svc_cols: list[I32] = []
        self._svc_table: I32 = np.zeros(0, np.int32)
        self._binding_class(None, None)  # class 0
        self._any_binding = any(b != (None, None) for b in self._binds)

    def _binding_class(self, process: str | None, unit: str | None) -> int:
        key = (process, unit)
        got = self._bind_cache.get(key)
        if got is not None:
            return got
        exe = exe_name(process) if process is not None else None
        ok = tuple((pr is None or (exe is not None and exe == pr)) and (un is None or unit == un)
                   for pr, un in self._binds)
        got = self._bind_ids.get(ok)
        if got is None:
            got = len(self._bind_ids)
            self._bind_ids[ok] = got
            self._add_service_column(np.array(ok, np.bool_).reshape(len(ok)))
        self._bind_cache[key] = got
        return got

    def _add_service_column(self, bind_ok: Bools) -> None:
        n_seg = self._spec_ok.shape[0]
        svc_ok = self._spec_ok[:, self._svc_spec] & bind_ok[self._svc_bind]  # (seg, service)
        rows = np.zeros((n_seg, self.words), np.uint64)
        cache: dict[bytes, Bools] = {}
        for idx, svcs in enumerate(self._inst_svcs):
            key = svcs.tobytes()
            col = cache.get(key)
            if col is None:
                col = np.asarray(svc_ok[:, svcs].any(axis=1), np.bool_).reshape(n_seg)
                cache[key] = col
            _set_bits(rows, col, idx)
        self._svc_cols.append(self._svc.add(rows))
        self._svc_table = np.stack(self._svc_cols, axis=1).reshape(-1)

    # -- per-flow inputs ------------------------------------------------------------------------
    def _end(self, values: Any, n: int, what: str, consumer: bool) -> _End:
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
            arr = values.reshape(-1)
            if arr.shape[0] != n:
                raise ValueError(f"{what} has {arr.shape[0]} rows, expected {n}")
            if arr.dtype != np.uint32:
                bad = np.flatnonzero((arr < 0) | (arr > V4_MAX))
                if bad.size:
                    i = int(bad[0])
                    raise ValueError(f"row {i}: {what} {int(arr[i])} is not an IPv4 address "
                                     "as an integer (0..2**32-1)")
                arr = arr.astype(np.uint32)
            cls = self._v4_cons if consumer else self._v4_prov
            state = self._v4_state if consumer else self._v4_state * np.uint8(5)
            return _End(None, cls, state, self._v4_index, np.ascontiguousarray(arr))
        items = _as_list(values)
        if len(items) != n:
            raise ValueError(f"{what} has {len(items)} rows, expected {n}")
        if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return self._end(np.array(items, np.int64), n, what, consumer)
        return self._end_strings(items, what, consumer)

    def _end_strings(self, items: list[Any], what: str, consumer: bool) -> _End:
        try:
            uniq = list(dict.fromkeys(items))
        except TypeError:
            for i, v in enumerate(items):
                try:
                    hash(v)
                except TypeError:
                    raise ValueError(f"row {i}: {what} {v!r} is not an IP address") from None
            raise
        position = {v: j for j, v in enumerate(uniq)}
        codes = np.fromiter(map(position.__getitem__, items), np.int32, count=len(items))
        cls = np.empty(len(uniq), np.int32)
        state = np.empty(len(uniq), np.uint8)
        # canonical dotted quads (the common case) take the uint32 path: for them the reference's
        # workload lookup by text is a lookup by value
        fast: list[int] = []
        values: list[int] = []
        slow: list[int] = []
        for j, v in enumerate(uniq):
            if isinstance(v, str):
                try:
                    packed = socket.inet_pton(socket.AF_INET, v)
                except (OSError, ValueError):
                    slow.append(j)
                    continue
                if socket.inet_ntop(socket.AF_INET, packed) == v:
                    fast.append(j)
                    values.append(int.from_bytes(packed, "big"))
                    continue
            slow.append(j)
        if fast:
            seg = self._v4_index.find(np.array(values, np.uint32))
            cls[fast] = (self._v4_cons if consumer else self._v4_prov)[seg]
            state[fast] = self._v4_state[seg]
        if slow:
            cls[slow], state[slow] = self._classify_slowly(
                [uniq[j] for j in slow], codes, slow, what, consumer)
        return _End(codes, cls, state if consumer else state * np.uint8(5))

    def _classify_slowly(self, uniq: list[Any], codes: I32, positions: list[int], what: str,
                         consumer: bool) -> tuple[I32, U8]:
        """Class and state of addresses in any spelling (IPv6, non-canonical IPv4, objects),
        exactly as `Evaluator.workload_for` and the IP-list matching read them."""
        wrows = np.empty(len(uniq), np.intp)
        state = np.empty(len(uniq), np.uint8)
        ipl = np.empty(len(uniq), np.intp)
        v4_idx: list[int] = []
        v4_val: list[int] = []
        segs4 = self._ipl[4, consumer]
        segs6 = self._ipl[6, consumer]
        n4 = len(segs4.starts)
        for j, v in enumerate(uniq):
            text = str(v) if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address) else v
            try:
                if not isinstance(text, str):
                    raise ValueError(f"not an IP address: {text!r}")
                a = parse_ip(text)
            except ValueError:
                row = int(np.flatnonzero(codes == positions[j])[0])
                raise ValueError(f"row {row}: {what} {v!r} is not an IP address") from None
            w = self.by_ip.get(text)
            if w is None:
                w = self.by_ip.get(str(a))
            wrows[j] = self._workload_row(w)
            state[j] = _state(w)
            if a.version == 4:
                v4_idx.append(j)
                v4_val.append(int(a))
            else:
                ipl[j] = n4 + segs6.find(int(a))
        if v4_idx:
            ipl[np.array(v4_idx, np.intp)] = np.searchsorted(
                np.array(segs4.starts, np.uint64), np.array(v4_val, np.uint64),
                side="right") - 1
        ipl_rows = np.concatenate([segs4.rows, segs6.rows])
        if consumer:
            cls = self._cons.add(self._w_cons[wrows] | ipl_rows[ipl])
        else:
            cls = self._prov.add(self._w_prov[wrows] | ipl_rows[ipl])
        return cls, state

    def _user_classes(self, users: Sequence[str | None] | None, n: int) -> I32 | None:
        if users is None or not self._user_instances:
            return None
        items = _as_list(users)
        if len(items) != n:
            raise ValueError(f"user has {len(items)} rows, expected {n}")
        out = _map_distinct(items, self._user_class)
        return out if out.any() else None

    def _user_class(self, user: str | None) -> int:
        if user is None:
            return 0
        got = self._user_ids.get(user)
        if got is None:
            row = np.zeros((1, self.words), np.uint64)
            for idx in self._user_instances.get(user, ()):
                row[0, idx >> 6] |= np.uint64(1 << (idx & 63))
            got = self._user_ids[user] = int(self._users.add(row)[0])
        return got

    def _binding_classes(self, process: Sequence[str | None] | None,
                         unit: Sequence[str | None] | None, n: int) -> I32 | None:
        if not self._any_binding or (process is None and unit is None):
            return None
        procs = _as_list(process) if process is not None else None
        units = _as_list(unit) if unit is not None else None
        for name, col in (("process", procs), ("unit", units)):
            if col is not None and len(col) != n:
                raise ValueError(f"{name} has {len(col)} rows, expected {n}")
        pairs = list(zip(procs if procs is not None else repeat(None, n),
                         units if units is not None else repeat(None, n), strict=True))
        out = _map_distinct(pairs, lambda pu: self._binding_class(*pu))
        return out if out.any() else None

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, src_ip: Addresses, dst_ip: Addresses,
                 proto: npt.ArrayLike, dst_port: npt.ArrayLike, *,
                 process: Sequence[str | None] | None = None,
                 unit: Sequence[str | None] | None = None,
                 user: Sequence[str | None] | None = None) -> BatchResult:
        """Decide every flow, one row per flow.

        Addresses are strings (IPv4 or IPv6, any spelling `ipaddress` reads) or `ipaddress`
        objects, or IPv4 addresses as integers: a numpy integer array (uint32 is the fast path)
        or a list of ints. `proto` and `dst_port` are integer array-likes, `dst_port` -1 for
        "no port" (`Flow.dst_port is None`). `process`, `unit` and `user` are optional columns
        of str or None. An address that does not parse raises ValueError naming the row."""
        protos = np.asarray(proto).reshape(-1)
        ports = np.asarray(dst_port).reshape(-1)
        n = int(protos.shape[0])
        if ports.shape[0] != n:
            raise ValueError(f"dst_port has {ports.shape[0]} rows, proto has {n}")
        if n and (protos.dtype.kind not in "iu" or ports.dtype.kind not in "iu"):
            raise ValueError("proto and dst_port must be integers (dst_port -1 for no port)")
        # dtypes that can hold the clip bounds (-1..256 for protocols, -1..65536 for ports)
        if protos.dtype not in (np.uint8, np.int16, np.int32, np.int64):
            protos = protos.astype(np.int64)
        if ports.dtype not in (np.int32, np.int64):
            ports = ports.astype(np.int64)
        src = self._end(src_ip, n, "src_ip", consumer=True)
        dst = self._end(dst_ip, n, "dst_ip", consumer=False)
        users = self._user_classes(user, n)
        bind = self._binding_classes(process, unit, n)
        decision = np.empty(n, np.uint8)
        side = np.empty(n, np.uint8)
        pattern = np.empty(n, np.int32)
        n_bind = len(self._svc_cols)
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            c, c_state = src.chunk(lo, hi)
            p, p_state = dst.chunk(lo, hi)
            pr = protos[lo:hi]
            if pr.dtype == np.uint8:
                base = self._slot_base[1:257][pr]
            else:
                base = self._slot_base[np.clip(pr, -1, 256).astype(np.intp) + 1]
            seg = self._port_table[base + np.clip(ports[lo:hi], -1, PORT_SLOTS - 2)]
            if bind is None:
                s = self._svc_cols[0][seg]
            else:
                s = self._svc_table[seg * n_bind + bind[lo:hi]]
            states = p_state + c_state  # uint8: 5 * provider state + consumer state
            # f: the instances matched without user groups, all that the provider side sees
            f = self._pair_svc(self._cons_prov(c, p), s)
            if users is None:
                key = self._final.raw150[f] + states
                pattern[lo:hi] = self._final.pattern[f]
            else:
                # every matching instance, user-group consumers included: the consumer's view
                every = self._pair_svc(self._cons_prov(self._cons_user(c, users[lo:hi]), p), s)
                key = self._final.raw125[f] + self._final.raw25[every] + states
                pattern[lo:hi] = self._final.pattern[every]
            decision[lo:hi] = self._dec_lut[key]
            side[lo:hi] = self._side_lut[key]
        # renumber the patterns this batch uses, in order of first sight by the evaluator
        used = np.zeros(len(self.patterns), np.bool_)
        used[pattern] = True
        remap = (np.cumsum(used) - 1).astype(np.int32)
        patterns = [p for p, u in zip(self.patterns, used.tolist(), strict=True) if u]
        return BatchResult(decision, side, remap[pattern] if n else pattern, patterns)
