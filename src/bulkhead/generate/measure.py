"""Measuring a candidate draft, generating its policy tests, choosing the recommended one,
and suggesting labels for unlabelled workloads.

- coverage_train / coverage_test: flow-weighted share of the window's in-scope, non-noise
  flows (minus those an existing deny or override_deny blocks) that the draft allows, every workload
  taken as fully enforced (as policy tests are);
- over_permission: share of the (consumer workload, provider workload, service) triples the
  draft admits that were never observed; services: every one seen in either window;
- compiled entries: the rules `Compiler` gives each workload (inbound + outbound).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from bulkhead.domain.model import Actor, PolicyTest, Ruleset, Selector, Service
from bulkhead.generate.encode import Edges
from bulkhead.generate.generator import (
    ALLOWED_CODES,
    Candidate,
    Context,
    _spec,
    external_lists,
)
from bulkhead.policy.batch import BatchEvaluator


def _coverage(ctx: Context, ev: BatchEvaluator, edges: Edges, ok: npt.NDArray[np.bool_]
              ) -> tuple[float | None, npt.NDArray[np.bool_]]:
    allowed = np.isin(ctx.decide(ev, edges), ALLOWED_CODES)
    total = float(edges.flows[ok].sum())
    if total == 0:
        return None, allowed
    return round(float(edges.flows[ok & allowed].sum()) / total, 6), allowed


def _over_permission(ctx: Context, ev: BatchEvaluator) -> dict[str, Any]:
    t = ctx.triples
    if not t["tested"]:
        return {"over_permission": 0.0, "over_permission_count": 0, "admitted_triples": 0,
                "over_permission_sampled": False}
    dec = ev.evaluate(t["src"], t["dst"], t["proto"], t["port"], process=t["process"]).decision
    admitted = np.isin(dec, ALLOWED_CODES)
    over = admitted & ~t["seen"]
    n_adm, n_over = int(admitted.sum()), int(over.sum())
    scale = t["universe"] / t["tested"] if t["sampled"] else 1.0
    return {"over_permission": round(n_over / n_adm, 6) if n_adm else 0.0,
            "over_permission_count": round(n_over * scale),
            "admitted_triples": round(n_adm * scale),
            "over_permission_sampled": bool(t["sampled"])}


def _compiled(ctx: Context, draft: Any) -> dict[str, Any]:
    if len(draft.workloads) > ctx.opts.compile_limit:
        return {"skipped": f"more than {ctx.opts.compile_limit} workloads"}
    from bulkhead.policy.compile import Compiler

    compiled = Compiler(draft).compiled
    per = {n: len(cw.inbound) + len(cw.outbound) for n, cw in compiled.items()}
    vals = list(per.values()) or [0]
    out: dict[str, Any] = {"total": sum(vals), "max": max(vals),
                           "mean": round(sum(vals) / len(vals), 2)}
    if len(per) <= 200:
        out["per_host"] = dict(sorted(per.items()))
    return out


def _observed_tests(ctx: Context, allowed: npt.NDArray[np.bool_]) -> list[PolicyTest]:
    e = ctx.train
    ent_w = ctx.enc.entities.workload
    sv = ctx.enc.services
    ok = allowed & ctx.train_ok & (ent_w[e.src] >= 0) & (ent_w[e.dst] >= 0) & (
        e.src != e.dst)
    tests: list[PolicyTest] = []
    seen: set[tuple[int, int, str]] = set()
    for j in np.flatnonzero(ok)[np.argsort(-e.flows[ok], kind="stable")].tolist():
        s, d = int(ent_w[e.src[j]]), int(ent_w[e.dst[j]])
        spec = _spec(int(sv.proto[e.svc[j]]), int(sv.port[e.svc[j]]))
        if (s, d, spec) in seen or ctx.workloads[s].ips[0] != ctx.enc.entities.ips[e.src[j]] \
                or ctx.workloads[d].ips[0] != ctx.enc.entities.ips[e.dst[j]]:
            continue
        seen.add((s, d, spec))
        tests.append(PolicyTest(ctx.workloads[s].name, ctx.workloads[d].name, spec, "allowed",
                                name=f"{ctx.opts.prefix}-observed-{len(tests) + 1}",
                                process=sv.process[e.svc[j]]))
        if len(tests) >= ctx.opts.top_tests:
            break
    return tests


def _crown_tests(ctx: Context) -> list[PolicyTest]:
    """Per declared crown jewel: consumers never seen reaching it stay denied."""
    out: list[PolicyTest] = []
    e = _concat_all(ctx)
    ent_w = ctx.enc.entities.workload
    sv = ctx.enc.services
    for sel in ctx.opts.crown_jewels:
        jewels = {i for i, lab in enumerate(ctx.labels) if all(lab.get(k) == v for k, v in sel)}
        if not jewels:
            continue
        cw, pw = ent_w[e.src], ent_w[e.dst]
        hit = np.isin(pw, list(jewels))
        reached = set(cw[hit & (cw >= 0)].tolist())
        ports = Counter(_spec(int(sv.proto[s]), int(sv.port[s])) for s in e.svc[hit].tolist())
        port = ports.most_common(1)[0][0] if ports else "tcp/22"
        idents: dict[tuple[tuple[str, str], ...], set[int]] = defaultdict(set)
        for i, w in enumerate(ctx.workloads):
            if w.ips and i not in jewels:
                idents[w.labels].add(i)
        picked = 0
        for ident, members in sorted(idents.items()):
            if members & reached or not ident:
                continue
            out.append(PolicyTest(Actor("labels", Selector.of(dict(ident))),
                                  Actor("labels", Selector.of(dict(sel))), port, "blocked",
                                  name=f"{ctx.opts.prefix}-crown-jewel-{len(out) + 1}"))
            picked += 1
            if picked >= 3:
                break
    return out


def _concat_all(ctx: Context) -> Edges:
    from bulkhead.generate.generator import _concat

    return _concat(ctx.train, ctx.test)


def measure(ctx: Context, gran: str, tol: float, rulesets: tuple[Ruleset, ...],
            evidence: dict[str, dict[str, object]], named: dict[str, Service],
            ip_list_names: list[str]) -> Candidate:
    from bulkhead.policy.intent import run_tests

    policy = ctx.policy
    ip_lists = external_lists(ctx, ip_list_names)
    services = tuple(named[n] for n in sorted(named))
    draft = replace(policy, ip_lists=policy.ip_lists + ip_lists,
                    services=policy.services + services, rulesets=policy.rulesets + rulesets)
    ev = BatchEvaluator(replace(draft, workloads=ctx.base.workloads))
    cov_train, allowed = _coverage(ctx, ev, ctx.train, ctx.train_ok)
    cov_test, _ = _coverage(ctx, ev, ctx.test, ctx.test_ok)
    report: dict[str, Any] = {
        "granularity": gran, "tolerance": tol,
        "coverage_train": 1.0 if cov_train is None else cov_train, "coverage_test": cov_test,
        **_over_permission(ctx, ev),
        "rules": sum(len(rs.rules) for rs in rulesets), "rulesets": len(rulesets),
    }
    tests = _observed_tests(ctx, allowed) + _crown_tests(ctx)
    trial = replace(draft, tests=policy.tests + tuple(tests))
    outcomes = run_tests(trial)
    n_old = len(policy.tests)
    failing = [o for o in outcomes[n_old:] if not o.passed]
    kept = tuple(o.test for o in outcomes[n_old:] if o.passed)
    report["tests"] = {"generated": len(kept),
                       "crown_jewel_exposed": [o.test.name for o in failing
                                               if o.test.expect == "blocked"],
                       "dropped": [o.test.name for o in failing if o.test.expect != "blocked"],
                       "existing_failing": [o.test.name or f"tests[{o.index}]"
                                            for o in outcomes[:n_old] if not o.passed],
                       "existing_broken": [o.test.name or f"tests[{o.index}]"
                                           for o in outcomes[:n_old]
                                           if not o.passed and o.index in ctx.tests_before]}
    draft = replace(draft, tests=policy.tests + kept)
    report["compiled_entries"] = _compiled(ctx, draft)
    report["evidence"] = evidence
    name = f"{gran}-t{tol:.2f}"
    return Candidate(name, gran, tol, ip_lists, services, rulesets, kept, draft, report)


def recommend(cands: list[Candidate], max_over: float) -> int:
    """Within the over-permission budget: best held-out coverage (training coverage without a
    held-out window), then fewest rules; outside it, least over-permission."""
    def score(i: int) -> tuple[float, ...]:
        r = cands[i].report
        cov = r["coverage_test"] if r["coverage_test"] is not None else r["coverage_train"]
        # ties go to label-based candidates: they keep holding as workloads come and go
        return (-cov, r["rules"], r["over_permission"], cands[i].granularity == "workload", i)

    ok = [i for i, c in enumerate(cands) if c.report["over_permission"] <= max_over]
    if ok:
        return min(ok, key=score)
    return min(range(len(cands)), key=lambda i: (cands[i].report["over_permission"],
                                                   cands[i].report["rules"], i))


def label_suggestions(ctx: Context, limit: int = 500) -> list[dict[str, Any]]:
    """For in-scope workloads lacking role/app that talk: the values of the labelled
    workloads whose peers and services are most alike (Jaccard), with a confidence."""
    keys = [k for k in ("role", "app") if k in ctx.policy.label_keys]
    e = ctx.train
    ent_w = ctx.enc.entities.workload.astype(np.int64)
    if not keys or len(e) == 0:
        return []
    n_w = len(ctx.workloads)
    lacking = [i for i in range(n_w) if ctx.in_scope_w[i] or not ctx.opts.scope
               if any(k not in ctx.labels[i] for k in keys)]
    if not lacking or len(lacking) > limit:
        return []
    # a feature: (direction, peer's full label set or address, service)
    ident: dict[object, int] = {}
    ent_id = np.fromiter(
        (ident.setdefault(ctx.workloads[w].labels if w >= 0 and ctx.workloads[w].labels
                          else ("addr", i), len(ident))
         for i, w in enumerate(ent_w.tolist())), np.int64, len(ent_w))
    n_i, n_s = len(ident), len(ctx.enc.services.process)
    out_w, in_w = ent_w[e.src], ent_w[e.dst]
    f_out = (ent_id[e.dst] * n_s + e.svc) * 2
    f_in = (ent_id[e.src] * n_s + e.svc) * 2 + 1
    w_all = np.concatenate([out_w, in_w])
    f_all = np.concatenate([f_out, f_in])
    ok = w_all >= 0
    pairs = np.unique(w_all[ok] * (n_i * n_s * 2) + f_all[ok])
    pw, pf = pairs // (n_i * n_s * 2), pairs % (n_i * n_s * 2)
    feats: dict[int, set[int]] = defaultdict(set)
    holders: dict[int, set[int]] = defaultdict(set)
    for w, f in zip(pw.tolist(), pf.tolist(), strict=True):
        feats[w].add(f)
        holders[f].add(w)
    out: list[dict[str, Any]] = []
    for u in lacking:
        mine = feats.get(u)
        if not mine:
            continue
        near = {v for f in mine for v in holders[f]} - {u}
        sims = sorted(((len(mine & feats[v]) / len(mine | feats[v]), v) for v in near),
                      key=lambda x: (-x[0], ctx.workloads[x[1]].name))
        for k in keys:
            if k in ctx.labels[u]:
                continue
            voters = [(s, v) for s, v in sims if k in ctx.labels[v]][:5]
            if not voters:
                continue
            votes: dict[str, float] = defaultdict(float)
            for s, v in voters:
                votes[ctx.labels[v][k]] += s
            value, weight = max(votes.items(), key=lambda kv: (kv[1], kv[0]))
            best = max(s for s, v in voters if ctx.labels[v][k] == value)
            out.append({"workload": ctx.workloads[u].name, "key": k, "value": value,
                        "confidence": round(weight / sum(votes.values()) * best, 3),
                        "like": [ctx.workloads[v].name for s, v in voters
                                 if ctx.labels[v][k] == value][:3]})
    return out


def measure_draft(ctx: Context, draft: Any) -> dict[str, Any]:
    """The coverage and over-permission figures of any draft over the context's flows (for
    comparing with another generator, e.g. an exact-replay baseline)."""
    ev = BatchEvaluator(replace(draft, workloads=ctx.base.workloads))
    cov_train, _ = _coverage(ctx, ev, ctx.train, ctx.train_ok)
    cov_test, _ = _coverage(ctx, ev, ctx.test, ctx.test_ok)
    return {"coverage_train": cov_train, "coverage_test": cov_test,
            **_over_permission(ctx, ev)}
