"""One candidate: exact rules → core services → lattice generalisation → merged rules.

See the theory of operation in `generator.py`. Rules are handled as records keyed by atoms,
each remembering the exact rules it stands for, so evidence follows every rule to the end.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

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
    external_lists,
    rule,
)
from bulkhead.generate.lattice import Atom, generalise, port_ranges
from bulkhead.policy.batch import BatchEvaluator
from bulkhead.policy.evaluate import DECISIONS
from bulkhead.policy.resolve import exe_name

SvcAtom = tuple[str, str | None]  # (port spec, process)
ACROSS = DECISIONS.index("allowed_across_boundary")
BLOCKED_BY_DENY = DECISIONS.index("blocked_by_deny")


@dataclass
class Rec:
    ids: list[int] = field(default_factory=list)
    unobserved: float = 0.0  # worst share of never-seen workloads a generalisation admitted

    def add(self, ids: list[int], unobserved: float) -> None:
        self.ids += ids
        self.unobserved = max(self.unobserved, unobserved)


Final = tuple[bool, list[Atom], list[Atom], tuple[str, ...], Rec]  # core?, cons, provs, services


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
        # names are sanitised: "my app" and "my-app" must not share (and overwrite) one
        while name in self.taken or (name in self.named and self.named[name].process != proc):
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
    finals: list[Final] = []
    for (tag, cons, refs), by_p in merged2.items():
        total = Rec()
        for rec in by_p.values():
            total.add(rec.ids, rec.unobserved)
        finals.append((tag, sorted(cons, key=repr), sorted(by_p, key=repr), refs, total))
    finals.sort(key=lambda f: (not f[0], repr(f[2]), repr(f[1]), f[3]))
    fmap = np.zeros(max(len(exact), 1), np.int64)
    for r, f in enumerate(finals):
        fmap[f[4].ids] = r
    edge_final = fmap[inv] if len(g) else np.zeros(0, np.int64)
    rulesets, evidence = _assemble(ctx, finals, edge_final)
    still: list[str] = []
    if ctx.has_deny and finals:
        # a generalised allow must not let through what an existing deny blocks (an allow
        # beats a plain deny): such rules fall back to the exact edges they stand for
        bad = _overriding(ctx, rulesets, evidence, finals, services.named)
        if bad:
            finals, edge_final = _exact_edges(ctx, gran, finals, edge_final, inv, bad, services)
            rulesets, evidence = _assemble(ctx, finals, edge_final)
            left = _overriding(ctx, rulesets, evidence, finals, services.named)
            ids = list(evidence)
            still = [ids[r] for r in sorted(left)]
    cand = measure(ctx, gran, tol, rulesets, evidence, services.named, _list_names(finals))
    cand.report["overrides_deny"] = still
    return cand


def _list_names(finals: list[Final]) -> list[str]:
    return [str(a[1]) for f in finals for a in (*f[1], *f[2]) if a[0] == "ip_list"]


def _overriding(ctx: Context, rulesets: tuple[Ruleset, ...], evidence: dict[str, dict[str, object]],
                finals: list[Final], named: dict[str, Service]) -> set[int]:
    """Finals whose rule turns a flow an existing deny blocks into an allowed one, probed over
    the over-permission triples and the deny-blocked edges of both windows."""
    draft = replace(ctx.base, rulesets=ctx.base.rulesets + rulesets,
                    ip_lists=ctx.policy.ip_lists + external_lists(ctx, _list_names(finals)),
                    services=ctx.policy.services + tuple(named[n] for n in sorted(named)))
    ev = BatchEvaluator(draft)
    results = [(ev.evaluate(t["src"], t["dst"], t["proto"], t["port"], process=t["process"]),
                ctx.triples_base() == BLOCKED_BY_DENY) for t in [ctx.triples] if t["tested"]]
    for edges, ok in ((ctx.train, ctx.train_ok), (ctx.test, ctx.test_ok)):
        denied = edges.take(~ok)
        if len(denied):
            results.append((ctx.evaluate(ev, denied), np.ones(len(denied), np.bool_)))
    rid = {r: i for i, r in enumerate(evidence)}
    out: set[int] = set()
    for res, was_denied in results:
        hit = was_denied & (res.decision == ACROSS)
        for pat in np.unique(res.pattern[hit]).tolist():
            out.update(rid[r] for r in res.patterns[pat] if r in rid)
    return out


def _exact_edges(ctx: Context, gran: str, finals: list[Final], edge_final: np.ndarray,
                 inv: np.ndarray, bad: set[int], services: _Services
                 ) -> tuple[list[Final], np.ndarray]:
    """`bad` finals replaced by one rule per (named consumer, named provider) over the exact
    services of the edges they stood for."""
    g, sv, ent_w = ctx.gen, ctx.enc.services, ctx.enc.entities.workload

    def named(ent: int) -> Atom:
        w = int(ent_w[ent])
        return ("workload", ctx.workloads[w].name) if w >= 0 else ("ip_list", ctx.ext_name[ent])

    keep = [r for r in range(len(finals)) if r not in bad]
    remap = np.full(len(finals), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    out = [finals[r] for r in keep]
    new_final = remap[edge_final]
    groups: dict[tuple[Atom, Atom], tuple[list[int], set[SvcAtom]]] = {}
    for j in np.flatnonzero(np.isin(edge_final, list(bad))).tolist():
        s = int(g.svc[j])
        proc = sv.process[s]
        a: SvcAtom = (_spec(int(sv.proto[s]), int(sv.port[s])),
                      exe_name(proc) if gran == "process" and proc else None)
        ids, svcs = groups.setdefault((named(int(g.src[j])), named(int(g.dst[j]))), ([], set()))
        ids.append(j)
        svcs.add(a)
    for (c, p), (edges, svcs) in sorted(groups.items(), key=repr):
        refs = tuple(sorted({r for a in sorted(svcs, key=repr) for r in services.refs([a])}))
        new_final[edges] = len(out)
        out.append((False, [c], [p], refs, Rec(sorted({int(inv[j]) for j in edges}), 0.0)))
    return out, new_final


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


def _assemble(ctx: Context, finals: list[Final], final: np.ndarray
              ) -> tuple[tuple[Ruleset, ...], dict[str, dict[str, object]]]:
    """Rulesets and evidence; `final` maps each generated edge to its final rule."""
    g = ctx.gen
    n_r = len(finals)
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

