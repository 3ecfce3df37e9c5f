"""One candidate: exact rules → core services → lattice generalisation → merged rules.

See the theory of operation in `generator.py`. Rules are handled as records keyed by atoms,
each remembering the exact rules it stands for, so evidence follows every rule to the end.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from bulkhead.domain.model import Rule, Ruleset, Service
from bulkhead.domain.ports import PORTED, PROTO_NUMBERS
from bulkhead.generate.generator import (
    GRANULARITY_KEYS,
    Candidate,
    Context,
    _iso,
    _name,
    _spec,
    ceil_share,
    confidence,
    rule,
)
from bulkhead.generate.lattice import Atom, generalise, port_ranges
from bulkhead.policy.resolve import exe_name

SvcAtom = tuple[str, str | None]  # (port spec, process)


@dataclass
class Rec:
    ids: list[int] = field(default_factory=list)
    unobserved: float = 0.0  # worst share of never-seen workloads a generalisation admitted

    def add(self, ids: list[int], unobserved: float) -> None:
        self.ids += ids
        self.unobserved = max(self.unobserved, unobserved)


def _svc_atoms(ctx: Context, gran: str) -> tuple[list[SvcAtom], np.ndarray]:
    sv = ctx.enc.services
    table: dict[SvcAtom, int] = {}
    out = np.empty(len(sv.process), np.int64)
    for i, (pr, po, proc) in enumerate(zip(sv.proto.tolist(), sv.port.tolist(), sv.process,
                                           strict=True)):
        if gran in ("env", "app", "tier"):
            a: SvcAtom = ("any", None)
        else:
            a = (_spec(pr, po), exe_name(proc) if gran == "process" and proc else None)
        out[i] = table.setdefault(a, len(table))
    return list(table), out


def _core(ctx: Context, ps: np.ndarray, src: np.ndarray, atoms: list[Atom], n_s: int
          ) -> set[int]:
    """(provider atom, service) ids reached from most application groups."""
    groups = ctx.app_groups()
    total = int(np.unique(groups[ctx.train.src][groups[ctx.train.src] >= 0]).shape[0])
    need = max(ctx.opts.core_min_groups, ceil_share(ctx.opts.core_share, total))
    if total < ctx.opts.core_min_groups:
        return set()
    cg = groups[src]
    ok = cg >= 0
    n_g = int(groups.max()) + 1
    pairs = np.unique(ps[ok] * n_g + cg[ok]) // n_g
    ids, counts = np.unique(pairs, return_counts=True)
    return {int(i) for i, n in zip(ids.tolist(), counts.tolist(), strict=True)
            if n >= need and atoms[i // n_s][0] in ("labels", "workload")}


class _Services:
    """Service atoms of one rule → port specs and named (process-bound) services."""

    def __init__(self, ctx: Context, tolerance: float) -> None:
        self.tolerance = tolerance
        self.prefix = ctx.opts.prefix
        self.taken = {s.name for s in ctx.policy.services}
        self.named: dict[str, Service] = {}

    def refs(self, atoms: list[SvcAtom]) -> tuple[str, ...]:
        if any(spec == "any" for spec, _ in atoms):
            return ("any",)
        ports: dict[tuple[str, str | None], list[int]] = defaultdict(list)
        out: list[str] = []
        for spec, proc in atoms:
            name, _, rest = spec.partition("/")
            if PROTO_NUMBERS.get(name) in PORTED and rest:
                ports[(name, proc)].append(int(rest))
            else:
                out.append(self._ref(spec, proc))
        for (name, proc), ps in sorted(ports.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            for lo, hi in port_ranges(ps, self.tolerance):
                out.append(self._ref(f"{name}/{lo}" if lo == hi else f"{name}/{lo}-{hi}", proc))
        return tuple(sorted(set(out)))

    def _ref(self, spec: str, proc: str | None) -> str:
        if proc is None:
            return spec
        name = _name(f"{self.prefix}-{proc}-{spec.replace('/', '-')}")
        while name in self.taken:
            name += "-g"
        self.named[name] = Service(name, (spec,), process=proc)
        return name


def build_candidate(ctx: Context, gran: str, tol: float) -> Candidate:
    from bulkhead.generate.measure import measure

    keys = tuple(k for k in GRANULARITY_KEYS[gran] if k in ctx.policy.label_keys)
    atoms, ent_atom = ctx.atoms(keys)
    index = ctx.index(keys)
    svc_atoms, svc_of = _svc_atoms(ctx, gran)
    g = ctx.gen
    n_a, n_s = len(atoms), len(svc_atoms)
    key = (ent_atom[g.src] * n_a + ent_atom[g.dst]) * n_s + svc_of[g.svc]
    uk, inv = np.unique(key, return_inverse=True)
    inv = inv.reshape(-1)
    exact = [(int(k) // n_s // n_a, int(k) // n_s % n_a, int(k) % n_s) for k in uk.tolist()]
    core = _core(ctx, key % (n_a * n_s), g.src, atoms, n_s) if len(g) else set()

    # consumers over the lattice, per (provider, service)
    by_ps: dict[tuple[int, int], list[int]] = defaultdict(list)
    stage1: dict[tuple[bool, Atom, Atom, int], Rec] = defaultdict(Rec)
    for e, (_c, p, s) in enumerate(exact):
        by_ps[(p, s)].append(e)
    for (p, s), es in by_ps.items():
        tag = p * n_s + s in core
        gen = generalise(index, {atoms[exact[e][0]] for e in es}, tol, ctx.by_name)
        for e in es:
            ga, adm, un = gen[atoms[exact[e][0]]]
            stage1[(tag, ga, atoms[p], s)].add([e], un / adm if adm else 0.0)
    # providers over the lattice, per (consumer, service)
    by_cs: dict[tuple[bool, Atom, int], list[tuple[Atom, Rec]]] = defaultdict(list)
    for (tag, c2, pa, s), rec in stage1.items():
        by_cs[(tag, c2, s)].append((pa, rec))
    stage2: dict[tuple[bool, Atom, Atom], dict[int, Rec]] = defaultdict(dict)
    for (tag, c2, s), items in by_cs.items():
        gen = generalise(index, {pa for pa, _ in items}, 0.0 if tag else tol, ctx.by_name)
        for pa, rec in items:
            ga, adm, un = gen[pa]
            slot = stage2[(tag, c2, ga)].setdefault(s, Rec())
            slot.add(rec.ids, max(rec.unobserved, un / adm if adm else 0.0))
    # services per (consumer, provider); then merge consumers, then providers
    services = _Services(ctx, tol)
    merged1: dict[tuple[bool, Atom, tuple[str, ...]], dict[Atom, Rec]] = defaultdict(dict)
    for (tag, c2, p2), by_s in stage2.items():
        refs = services.refs([svc_atoms[s] for s in by_s])
        slot = merged1[(tag, p2, refs)].setdefault(c2, Rec())
        for rec in by_s.values():
            slot.add(rec.ids, rec.unobserved)
    merged2: dict[tuple[bool, frozenset[Atom], tuple[str, ...]], dict[Atom, Rec]] = (
        defaultdict(dict))
    for (tag, p2, refs), by_c in merged1.items():
        total = Rec()
        for rec in by_c.values():
            total.add(rec.ids, rec.unobserved)
        merged2[(tag, frozenset(by_c), refs)][p2] = total
    finals: list[tuple[bool, list[Atom], list[Atom], tuple[str, ...], Rec]] = []
    for (tag, cons, refs), by_p in merged2.items():
        total = Rec()
        for rec in by_p.values():
            total.add(rec.ids, rec.unobserved)
        finals.append((tag, sorted(cons, key=repr), sorted(by_p, key=repr), refs, total))
    finals.sort(key=lambda f: (not f[0], repr(f[2]), repr(f[1]), f[3]))
    return measure(ctx, gran, tol, *_assemble(ctx, finals, len(exact), inv), services.named,
                   [str(a[1]) for f in finals for a in (*f[1], *f[2]) if a[0] == "ip_list"])


def _ruleset_name(ctx: Context, tag: bool, providers: list[Atom]) -> str:
    p = ctx.opts.prefix
    if tag:
        return f"{p}-core-services"
    kind, val = providers[0]
    if kind == "labels":
        assert isinstance(val, tuple)
        d = dict(val)
        # named after the providers' app and env, even when the selector no longer says them
        index = ctx.index(tuple(k for k in GRANULARITY_KEYS["tier"] if k in ctx.policy.label_keys))
        members = index.members(val).tolist() if set(d) <= set(index.keys) else []
        for k in ("app", "env"):
            values = {ctx.labels[i].get(k) for i in members}
            if k not in d and len(values) == 1 and None not in values:
                d[k] = values.pop() or ""
        parts = [d[k] for k in ("app", "env") if k in d] or [v for _, v in val]
        return _name(f"{p}-{'-'.join(parts)}")
    return f"{p}-{ {'ip_list': 'egress', 'workload': 'workloads', 'all': 'shared'}[kind] }"


def _assemble(ctx: Context, finals: list[tuple[bool, list[Atom], list[Atom], tuple[str, ...],
                                                Rec]], n_exact: int, inv: np.ndarray
              ) -> tuple[tuple[Ruleset, ...], dict[str, dict[str, object]]]:
    g = ctx.gen
    fmap = np.zeros(max(n_exact, 1), np.int64)
    for r, f in enumerate(finals):
        fmap[f[4].ids] = r
    n_r = len(finals)
    final = fmap[inv] if len(g) else np.zeros(0, np.int64)
    flows = np.bincount(final, weights=g.flows, minlength=n_r)
    first = np.full(n_r, np.inf)
    last = np.full(n_r, -np.inf)
    np.minimum.at(first, final, g.first)
    np.maximum.at(last, final, g.last)
    n_e = len(ctx.enc.entities.ips)
    sources = np.bincount(np.unique(final * n_e + g.src) // n_e, minlength=n_r)
    taken = {rs.name for rs in ctx.policy.rulesets}
    names: dict[str, str] = {}
    grouped: dict[str, list[Rule]] = defaultdict(list)
    evidence: dict[str, dict[str, object]] = {}
    for r, (tag, cons, provs, refs, rec) in enumerate(finals):
        base = _ruleset_name(ctx, tag, provs)
        if base not in names:
            name = base
            while name in taken:
                name += "-g"
            names[base] = name
        rs = names[base]
        rid = f"{rs}-{len(grouped[rs]) + 1}"
        ev = {"ruleset": rs, "flows": int(flows[r]), "sources": int(sources[r]),
              "first_seen": _iso(float(first[r])) if ctx.has_ts else None,
              "last_seen": _iso(float(last[r])) if ctx.has_ts else None,
              "exact_rules": len(rec.ids), "unobserved_share": round(rec.unobserved, 3),
              "confidence": confidence(int(sources[r]), rec.unobserved), "core": tag}
        evidence[rid] = ev
        seen = f"{ev['first_seen']} .. {ev['last_seen']}, " if ctx.has_ts else ""
        desc = (f"generated: {ev['flows']} flows from {ev['sources']} sources, {seen}"
                f"confidence {ev['confidence']}")
        grouped[rs].append(rule(rid, cons, provs, list(refs), desc))
    rulesets = tuple(Ruleset(name, tuple(rules), description="generated from observed flows")
                     for name, rules in grouped.items())
    return rulesets, evidence

