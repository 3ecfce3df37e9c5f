"""Candidate policies from observed flows (docs/design/generator.md).

Theory of operation
-------------------
`generate(policy, flows, options)` prepares once (`Context`): flows are encoded into edges
(`encode`), split into a training and a held-out window, filtered by scope and noise, and
decided against the existing policy (fully enforced, `BatchEvaluator`), so only what it does
not already allow is generated. Then, for each point of the curve (granularity, tolerance):

1. every address becomes an *atom*: its label tuple at the granularity's keys, a named
   workload when it lacks one of them, or an external IP list (a /24, or "internet");
2. edges collapse into exact rules (consumer atom, provider atom, service at the granularity);
3. a provider service reached from most application groups becomes one shared core-service
   rule (consumers: all workloads);
4. consumers, then providers, are generalised over the label lattice (`lattice.generalise`,
   bounded by the tolerance), ports merge into ranges (`lattice.port_ranges`);
5. rules with equal providers and services merge their consumers, then the reverse;
6. the draft (input + generated IP lists, services, rulesets, tests) is measured
   (`measure`): coverage of both windows, over-permission, compiled entries.

Invariant: every training flow in scope that no noise filter removed and that no existing
`deny` or `override_deny` blocks is allowed by every candidate's draft (coverage_train == 1
over them).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from bulkhead.domain.addresses import parse_ip
from bulkhead.domain.model import (
    Actor,
    IPList,
    Policy,
    PolicyTest,
    Rule,
    Ruleset,
    Selector,
    Service,
)
from bulkhead.domain.ports import ICMP_PROTOS, PORTED, PROTO_NAMES
from bulkhead.generate.encode import Edges, Encoded, FlowColumns, aggregate, encode
from bulkhead.generate.lattice import Atom, LabelIndex, Sel
from bulkhead.generate.noise import DEFAULT_NOISE, NOISE_FILTERS, check_names, service_filter
from bulkhead.policy.batch import BatchEvaluator, BatchResult
from bulkhead.policy.evaluate import DECISIONS, as_fully_enforced
from bulkhead.policy.intent import run_tests

GRANULARITIES: tuple[str, ...] = ("env", "app", "tier", "service", "process")
GRANULARITY_KEYS: dict[str, tuple[str, ...]] = {
    "env": ("env",), "app": ("app", "env"), "tier": ("role", "app", "env"),
    "service": ("role", "app", "env"), "process": ("role", "app", "env"),
    "workload": ()}  # the finest point of the default curve: named workloads, exact ports
EXTERNAL_MODES: tuple[str, ...] = ("cidr", "internet")
ALLOWED_CODES = np.array([DECISIONS.index("allowed"), DECISIONS.index("allowed_across_boundary")])
DENY_CODES = np.array([DECISIONS.index("blocked_by_override_deny"),
                       DECISIONS.index("blocked_by_deny")])
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
           "fc00::/7", "fe80::/10", "::1/128")
ALL: Atom = ("all", "")
_BAD_NAME = re.compile(r"[^A-Za-z0-9_.:@/+-]+")


@dataclass(frozen=True)
class Options:
    granularity: str | None = None  # None: the default curve over several granularities
    scope: Sel = ()  # label selector; () = everything
    train_until: float | None = None  # flows after it are held out
    external: str = "cidr"  # cidr: one IP list per /24 (/64); internet: one list
    noise: tuple[str, ...] = DEFAULT_NOISE
    tolerances: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)
    core_share: float = 0.5  # share of application groups that makes a core service
    core_min_groups: int = 3
    max_over_permission: float = 0.05  # the recommended candidate stays at or under it
    crown_jewels: tuple[Sel, ...] = ()
    top_tests: int = 10
    prefix: str = "gen"
    triple_limit: int = 1_000_000  # over-permission is sampled above this many triples
    compile_limit: int = 2_000  # compiled entries are reported up to this many workloads
    workload_limit: int = 500  # the named-workload point joins the default curve up to here
    seed: int = 0

    def check(self) -> None:
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity: expected one of {', '.join(GRANULARITIES)}, "
                             f"got {self.granularity!r}")
        if self.external not in EXTERNAL_MODES:
            raise ValueError(f"external: expected cidr or internet, got {self.external!r}")
        check_names(self.noise)
        for t in self.tolerances:
            if not 0.0 <= t < 1.0:
                raise ValueError(f"tolerances: {t} is not in [0, 1)")
        if not _BAD_NAME.sub("", self.prefix) == self.prefix or not self.prefix:
            raise ValueError(f"prefix: not usable in a name: {self.prefix!r}")


@dataclass
class Candidate:
    name: str
    granularity: str
    tolerance: float
    ip_lists: tuple[IPList, ...]
    services: tuple[Service, ...]
    rulesets: tuple[Ruleset, ...]
    tests: tuple[PolicyTest, ...]
    draft: Policy
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    candidates: list[Candidate]
    recommended: int
    report: dict[str, Any]  # facts shared by every candidate (flows, noise, core, labels)

    def full_report(self, index: int | None = None) -> dict[str, Any]:
        """The shared report plus one candidate's figures at the top level (default: the
        recommended one) and a summary line per candidate."""
        i = self.recommended if index is None else index
        c = self.candidates[i]
        summary = [{"name": x.name, "granularity": x.granularity, "tolerance": x.tolerance,
                    **{k: x.report[k] for k in SUMMARY_KEYS}} for x in self.candidates]
        return {"candidate": c.name, "recommended": self.candidates[self.recommended].name,
                **c.report, **self.report, "candidates": summary}


SUMMARY_KEYS = ("coverage_train", "coverage_test", "over_permission", "over_permission_count",
                "rules")


# -- preparation ------------------------------------------------------------------------------

def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _match(labels: dict[str, str], sel: Sel) -> bool:
    return all(labels.get(k) == v for k, v in sel)


def _spec(proto: int, port: int) -> str:
    name = PROTO_NAMES.get(proto, None)
    if name is None:
        return f"proto/{proto}"
    if proto in PORTED and port > 0:
        return f"{name}/{port}"
    if proto in ICMP_PROTOS and 0 <= port <= 255:
        return f"{name}/{port}"
    return name


def _name(text: str) -> str:
    return _BAD_NAME.sub("-", text).strip("-")[:120] or "x"


class Context:
    """Everything the candidates share: encoded flows, windows, the existing policy's view."""

    def __init__(self, policy: Policy, flows: FlowColumns, opts: Options) -> None:
        opts.check()
        self.policy = policy
        self.opts = opts
        self.enc: Encoded = encode(policy, flows)
        self.has_ts = flows.ts is not None
        enc = self.enc
        self.workloads = policy.workloads
        self.by_name = {w.name: i for i, w in enumerate(policy.workloads)}
        self.labels = [w.label_dict for w in policy.workloads]
        ent_w = enc.entities.workload
        n_w = len(policy.workloads)
        in_scope_w = np.fromiter((_match(lab, opts.scope) for lab in self.labels), np.bool_, n_w)
        self.in_scope_w = in_scope_w
        ent_scope = (ent_w >= 0) & in_scope_w[np.maximum(ent_w, 0)] if n_w else (
            np.zeros(len(ent_w), np.bool_))
        if not opts.scope:
            ent_scope = np.ones(len(ent_w), np.bool_)
        # a flow between two external addresses is no workload's business
        internal = ent_w >= 0
        scoped = (ent_scope[enc.src] | ent_scope[enc.dst]) & (internal[enc.src] |
                                                              internal[enc.dst])
        sv = enc.services
        self.svc_noise = service_filter(opts.noise, sv.proto, sv.port)
        noise = self.svc_noise[enc.svc] >= 0
        if opts.train_until is None:
            train = np.ones(len(enc.src), np.bool_)
        else:
            train = enc.ts <= opts.train_until
        self.flow_counts = {"total": len(enc.src), "train": int(train.sum()),
                            "test": int((~train).sum()), "in_scope": int(scoped.sum()),
                            "noise": int((noise & scoped).sum())}
        self.noise_report = self._noise_report(scoped & noise)
        self.train = aggregate(enc, train & scoped & ~noise)
        self.test = aggregate(enc, ~train & scoped & ~noise)
        self.ent_v4 = _v4_ints(enc.entities.ips)
        self.base = as_fully_enforced(policy)
        base_ev = BatchEvaluator(self.base)
        dec = self.decide(base_ev, self.train)
        allowed = np.isin(dec, ALLOWED_CODES)
        # an existing deny is the operator's intent: what it blocks is reported, not allowed
        denied = np.isin(dec, DENY_CODES)
        self.flow_counts["already_allowed"] = int(self.train.flows[allowed].sum())
        for code in DENY_CODES.tolist():
            self.flow_counts[DECISIONS[code]] = int(self.train.flows[dec == code].sum())
        self.train_ok = ~denied
        self.gen = self.train.take(~allowed & ~denied)
        self.test_ok = ~np.isin(self.decide(base_ev, self.test), DENY_CODES)
        self.tests_before = {o.index for o in run_tests(policy) if o.passed} if (
            policy.tests) else set()
        self.ext_lists: dict[str, IPList] = {}
        self.ext_name = self._externals()
        self._atoms: dict[tuple[str, ...], tuple[list[Atom], npt.NDArray[np.int64]]] = {}
        self._indexes: dict[tuple[str, ...], LabelIndex] = {}
        self.triples = self._triples()
        self.has_deny = any(r.action == "deny" for rs in policy.rulesets for r in rs.rules)
        self._triples_base: npt.NDArray[np.uint8] | None = None

    # -- helpers ---------------------------------------------------------------------------
    def decide(self, ev: BatchEvaluator, edges: Edges) -> npt.NDArray[np.uint8]:
        if len(edges) == 0:
            return np.zeros(0, np.uint8)
        return self.evaluate(ev, edges).decision

    def evaluate(self, ev: BatchEvaluator, edges: Edges) -> BatchResult:
        sv = self.enc.services
        procs = np.asarray(sv.process, dtype=object)[edges.svc].tolist()
        v4 = self.ent_v4
        if v4 is not None:  # IPv4 as integers: the evaluator's fast path
            src: Any = v4[edges.src]
            dst: Any = v4[edges.dst]
        else:
            ips = np.asarray(self.enc.entities.ips, dtype=object)
            src, dst = ips[edges.src].tolist(), ips[edges.dst].tolist()
        return ev.evaluate(src, dst, sv.proto[edges.svc], sv.port[edges.svc],
                           process=procs if any(p is not None for p in sv.process) else None)

    def _noise_report(self, mask: npt.NDArray[np.bool_]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        edges = aggregate(self.enc, mask)
        idx = self.svc_noise[edges.svc] if len(edges) else np.zeros(0, np.int16)
        ips = self.enc.entities.ips
        sv = self.enc.services
        flows_by = np.bincount(self.svc_noise[self.enc.svc[mask]] + 1,
                               weights=self.enc.weight[mask], minlength=len(self.opts.noise) + 1)
        for i, name in enumerate(self.opts.noise):
            sel = np.flatnonzero(idx == i)
            top = sel[np.argsort(-edges.flows[sel], kind="stable")[:5]]
            out[name] = {
                "ports": [_spec(p, q) if q != -2 else PROTO_NAMES.get(p, str(p))
                          for p, q in NOISE_FILTERS[name]],
                "flows": int(flows_by[i + 1]),
                "pairs": len({(int(a), int(b)) for a, b in zip(edges.src[sel], edges.dst[sel],
                                                               strict=True)}),
                "examples": [f"{ips[edges.src[j]]} -> {ips[edges.dst[j]]} "
                             f"{_spec(int(sv.proto[edges.svc[j]]), int(sv.port[edges.svc[j]]))}"
                             f" ({int(edges.flows[j])} flows)" for j in top]}
        return out

    def _externals(self) -> dict[int, str]:
        """Entity → IP-list name for external addresses (and the lists themselves)."""
        names: dict[int, str] = {}
        ent_w = self.enc.entities.workload
        taken = {x.name for x in self.policy.ip_lists}
        workload_ips = [ip for w in self.workloads for ip in w.ips]
        wl_addrs = [parse_ip(ip) for ip in workload_ips]
        nets: dict[str, list[str]] = defaultdict(list)
        p = self.opts.prefix
        for i in np.flatnonzero(ent_w < 0).tolist():
            ip = self.enc.entities.ips[i]
            addr = parse_ip(ip)
            if self.opts.external == "internet":
                names[i] = f"{p}-internet"
                continue
            bits = 24 if addr.version == 4 else 64
            mask = (1 << addr.max_prefixlen) - (1 << (addr.max_prefixlen - bits))
            net = type(addr)(int(addr) & mask)
            cidr = f"{net}/{bits}"
            names[i] = _name(f"{p}-net-{cidr}".replace(".", "-").replace(":", "-")
                             .replace("/", "-"))
            nets[cidr].append(ip)
        if self.opts.external == "internet" and names:
            private = [ipaddress.ip_network(b) for b in PRIVATE]
            outside = [str(a) for a in wl_addrs if not any(
                a.version == n.version and a in n for n in private)]
            self.ext_lists[f"{p}-internet"] = IPList(
                f"{p}-internet", ("0.0.0.0/0", "::/0"), PRIVATE + tuple(outside))
        for cidr in sorted(nets):
            name = names[self.enc.entities.ips.index(nets[cidr][0])]
            block = ipaddress.ip_network(cidr)
            inside = tuple(sorted(str(a) for a in wl_addrs
                                  if a.version == block.version and a in block))
            self.ext_lists[name] = IPList(name, (cidr,), inside)
        # a list the policy already has with the same blocks is reused; else a fresh name
        existing = {x.name: x for x in self.policy.ip_lists}
        rename: dict[str, str] = {}
        for name, lst in list(self.ext_lists.items()):
            if name not in taken or existing[name] == lst:
                continue
            fresh = name
            while fresh in taken or fresh in self.ext_lists:
                fresh += "-g"
            rename[name] = fresh
            self.ext_lists[fresh] = replace(lst, name=fresh)
            del self.ext_lists[name]
        self.reused_lists = {n for n in self.ext_lists if n in existing}
        return {i: rename.get(n, n) for i, n in names.items()}

    def atoms(self, keys: tuple[str, ...]) -> tuple[list[Atom], npt.NDArray[np.int64]]:
        """(atom table, entity → atom id) at these label keys."""
        if keys in self._atoms:
            return self._atoms[keys]
        table: dict[Atom, int] = {}
        ent_w = self.enc.entities.workload.tolist()
        ids = np.empty(len(ent_w), np.int64)
        for i, w in enumerate(ent_w):
            if w < 0:
                atom: Atom = ("ip_list", self.ext_name[i])
            else:
                lab = self.labels[w]
                if keys and all(k in lab for k in keys):
                    atom = ("labels", tuple((k, lab[k]) for k in keys))
                else:
                    atom = ("workload", self.workloads[w].name)
            ids[i] = table.setdefault(atom, len(table))
        self._atoms[keys] = (list(table), ids)
        return self._atoms[keys]

    def index(self, keys: tuple[str, ...]) -> LabelIndex:
        if keys not in self._indexes:
            self._indexes[keys] = LabelIndex(self.workloads, keys)
        return self._indexes[keys]

    def app_groups(self) -> npt.NDArray[np.int64]:
        """Entity → application group (app, env) id, -1 when unknown or external."""
        table: dict[tuple[str, str], int] = {}
        out = np.full(len(self.enc.entities.ips), -1, np.int64)
        for i, w in enumerate(self.enc.entities.workload.tolist()):
            if w >= 0 and "app" in self.labels[w]:
                key = (self.labels[w]["app"], self.labels[w].get("env", ""))
                out[i] = table.setdefault(key, len(table))
        return out

    def triples_base(self) -> npt.NDArray[np.uint8]:
        """The input policy's decisions over the over-permission triples (computed once)."""
        if self._triples_base is None:
            t = self.triples
            self._triples_base = BatchEvaluator(self.base).evaluate(
                t["src"], t["dst"], t["proto"], t["port"], process=t["process"]).decision
        return self._triples_base

    # -- over-permission universe -----------------------------------------------------------
    def _triples(self) -> dict[str, Any]:
        """(consumer, provider, service) triples to test: every workload x every workload in
        scope x every service seen in either window (noise aside); sampled above
        `triple_limit`; each marked observed or not."""
        enc = self.enc
        ent_w = enc.entities.workload.astype(np.int64)
        both = _concat(self.train, self.test)
        cw, pw, s = ent_w[both.src], ent_w[both.dst], both.svc
        internal = (cw >= 0) & (pw >= 0)
        n_w = len(self.workloads)
        n_s = len(enc.services.process)
        has_ip = np.fromiter((bool(w.ips) for w in self.workloads), np.bool_, n_w)
        observed = np.unique((cw[internal] * n_w + pw[internal]) * n_s + s[internal])
        # services: every one observed anywhere (so "any" and ranges are charged for what
        # they admit beyond each provider's own), providers: workloads in scope
        svcs = np.unique(s)
        prov = np.flatnonzero(has_ip & (self.in_scope_w if self.opts.scope else True))
        pairs = (prov[:, None] * n_s + svcs[None, :]).reshape(-1)
        consumers = np.flatnonzero(has_ip)
        m, k = int(pairs.shape[0]), int(consumers.shape[0])
        universe = m * max(k - 1, 0)
        rng = np.random.default_rng(self.opts.seed)
        if universe <= self.opts.triple_limit:
            c = np.tile(consumers, m)
            ps = np.repeat(pairs, k)
        else:
            ps = pairs[rng.integers(0, m, self.opts.triple_limit)]
            c = consumers[rng.integers(0, k, self.opts.triple_limit)]
        p, sv = ps // n_s, ps % n_s
        ok = c != p
        c, p, sv = c[ok], p[ok], sv[ok]
        key = (c * n_w + p) * n_s + sv
        seen = np.isin(key, observed, assume_unique=False)
        firsts = [w.ips[0] if w.ips else "0.0.0.0" for w in self.workloads]
        v4 = _v4_ints(firsts)
        first_ip: Any = v4 if v4 is not None else np.asarray(firsts, dtype=object)
        procs = np.asarray(enc.services.process, dtype=object)[sv].tolist()
        return {"src": first_ip[c] if v4 is not None else first_ip[c].tolist(),
                "dst": first_ip[p] if v4 is not None else first_ip[p].tolist(),
                "proto": enc.services.proto[sv], "port": enc.services.port[sv],
                "process": procs if any(x is not None for x in enc.services.process) else None,
                "seen": seen, "universe": universe, "sampled": universe > self.opts.triple_limit,
                "tested": int(c.shape[0])}


def _v4_ints(ips: list[str]) -> npt.NDArray[np.uint32] | None:
    """Canonical dotted quads as uint32, or None when any address is something else."""
    out = np.empty(len(ips), np.uint32)
    for i, ip in enumerate(ips):
        parts = ip.split(".")
        if len(parts) != 4 or not all(p.isdigit() and str(int(p)) == p and int(p) < 256
                                      for p in parts):
            return None
        out[i] = (int(parts[0]) << 24) | (int(parts[1]) << 16) | (int(parts[2]) << 8) | int(
            parts[3])
    return out


def _concat(a: Edges, b: Edges) -> Edges:
    return Edges(*(np.concatenate([getattr(a, f), getattr(b, f)])
                   for f in ("src", "dst", "svc", "flows", "first", "last")))


def label_selector(text: str, where: str = "scope") -> Sel:
    """`app=shop,env=prod` → selector; '' → everything."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        k, eq, v = part.partition("=")
        if not eq or not k.strip() or not v.strip():
            raise ValueError(f"{where}: expected KEY=VALUE[,KEY=VALUE], got {part!r}")
        out[k.strip()] = v.strip()
    return tuple(sorted(out.items()))


def curve(opts: Options, workloads: int = 0) -> list[tuple[str, float]]:
    """The candidates: one granularity along the tolerances, or the default curve from named
    workloads (small estates only: thousands of per-workload rules help nobody) through
    service, tier and app."""
    if opts.granularity is not None:
        return [(opts.granularity, t) for t in opts.tolerances]
    finest = [("workload", 0.0)] if workloads <= opts.workload_limit else []
    return finest + [("service", t) for t in opts.tolerances] + [("tier", 0.0), ("app", 0.0)]


def generate(policy: Policy, flows: FlowColumns, opts: Options | None = None) -> Result:
    from bulkhead.generate.build import build_candidate
    from bulkhead.generate.measure import label_suggestions, recommend

    opts = opts or Options()
    named = [("scope", opts.scope)] + [(f"crown_jewels[{i}]", c)
                                       for i, c in enumerate(opts.crown_jewels)]
    for where, sel in named:
        bad = [k for k, _ in sel if k not in policy.label_keys]
        if bad:
            raise ValueError(f"{where}: unknown label key(s) {', '.join(bad)} (declared: "
                             f"{', '.join(policy.label_keys)})")
    ctx = Context(policy, flows, opts)
    in_scope = int(ctx.in_scope_w.sum()) if opts.scope else len(policy.workloads)
    cands = [build_candidate(ctx, g, t) for g, t in curve(opts, in_scope)]
    best = recommend(cands, opts.max_over_permission)
    shared = {"flows": ctx.flow_counts, "noise": ctx.noise_report,
              "label_suggestions": label_suggestions(ctx),
              "options": {"granularity": opts.granularity, "scope": dict(opts.scope),
                          "train_until": opts.train_until, "external": opts.external,
                          "noise": list(opts.noise)}}
    return Result(cands, best, shared)


def external_lists(ctx: Context, names: Iterable[str]) -> tuple[IPList, ...]:
    """The new IP lists these names need (lists the policy already has are not repeated)."""
    return tuple(ctx.ext_lists[n] for n in sorted(set(names)) if n not in ctx.reused_lists)


def actor(atom: Atom) -> Actor:
    kind, val = atom
    if kind == "labels":
        assert isinstance(val, tuple)
        return Actor("labels", Selector.of(dict(val)))
    if kind == "all":
        return Actor("all_workloads")
    assert isinstance(val, str)
    return Actor("workload" if kind == "workload" else "ip_list", name=val)


def rule(rule_id: str, consumers: list[Atom], providers: list[Atom], services: list[str],
         description: str) -> Rule:
    return Rule("allow", tuple(actor(a) for a in consumers), tuple(actor(a) for a in providers),
                tuple(services), id=rule_id, description=description)


def confidence(sources: int, unobserved_share: float) -> float:
    return round((1 - 0.5 ** sources) * (1 - unobserved_share), 3)


def ceil_share(share: float, total: int) -> int:
    return math.ceil(share * total)


__all__ = ["GRANULARITIES", "Candidate", "Context", "FlowColumns", "Options", "Result",
           "generate", "label_selector"]
