"""The generator on traffic drawn from a known intended policy: it recovers that policy at the
right granularity, noise filters and core services behave as reported, what the existing policy
allows is not generated again, and every training flow in scope is allowed (property)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.domain.model import Actor, Policy, PolicyTest, Rule, Ruleset, Selector
from bulkhead.generate import FlowColumns, Options, generate
from bulkhead.generate import synthetic as syn
from bulkhead.generate.lattice import LabelIndex, generalise, port_ranges
from bulkhead.policy.evaluate import Evaluator, Flow, as_fully_enforced
from bulkhead.policy.fileformat import dump_policy, loads_policy
from tests.generate.helpers import DAY, T0, estate, two_days

POLICY, INTENTS = estate(apps=4)
FLOWS = two_days(POLICY, INTENTS)


@pytest.fixture(scope="module")
def result():  # type: ignore[no-untyped-def]
    return generate(POLICY, FLOWS, Options(train_until=T0 + DAY, crown_jewels=((
        ("role", "db"),),)))


def _ip(name: str) -> str:
    w = POLICY.workload(name)
    assert w is not None
    return w.ips[0]


def _allowed(policy: Policy, src: str, dst: str, port: int, proto: int = 6) -> bool:
    d = Evaluator(as_fully_enforced(policy)).decide(Flow(src, dst, proto, port))
    return not d.blocked


def test_recovers_the_intended_policy_at_service_granularity(result) -> None:  # type: ignore[no-untyped-def]
    c = next(c for c in result.candidates if c.name == "service-t0.00")
    p = c.draft
    intended = [("app1-prod-web-0", "app1-prod-api-1", 8080), ("app1-prod-api-0", "app1-prod-db-1",
                5432), ("app1-prod-api-1", "app1-prod-worker-0", 9002),
                ("app1-prod-worker-1", "app1-prod-api-x", 8080),
                ("app3-prod-api-0", "app2-prod-api-0", 8080)]
    for s, d, port in intended:
        assert _allowed(p, _ip(s), _ip(d), port), (s, d, port)
    assert _allowed(p, "198.51.100.7", _ip("app2-prod-web-1"), 443)
    assert _allowed(p, _ip("app0-prod-api-0"), syn.PARTNER, 443)
    never = [("app1-prod-web-0", "app1-prod-db-0", 5432), ("app1-prod-db-0", "app1-prod-api-0",
             8080), ("app0-prod-web-0", "app1-prod-api-0", 8080),
             ("app1-prod-web-0", "app1-prod-worker-0", 9001),
             ("app0-prod-api-0", "app1-prod-db-0", 5432), ("app1-prod-web-0", "app1-prod-api-0",
                                                          5432)]
    for s, d, port in never:
        assert not _allowed(p, _ip(s), _ip(d), port), (s, d, port)
    assert not _allowed(p, "198.51.100.7", _ip("app2-prod-api-1"), 8080)
    # the worker ports were merged into one range; selectors lost the redundant env key
    services = {s for rs in c.rulesets for r in rs.rules for s in r.services}
    assert "tcp/9000-9003" in services
    web_api = [r for rs in c.rulesets for r in rs.rules if "tcp/8080" in r.services]
    assert all("env" not in dict(a.selector.terms) for r in web_api for a in r.consumers
               if a.selector is not None)


def test_coarser_granularities_are_ring_fences(result) -> None:  # type: ignore[no-untyped-def]
    app = next(c for c in result.candidates if c.name == "app-t0.00")
    assert all(r.services == ("any",) for rs in app.rulesets for r in rs.rules)
    # within an app anything goes, across apps only what was seen
    assert _allowed(app.draft, _ip("app1-prod-web-0"), _ip("app1-prod-db-0"), 5432)
    assert not _allowed(app.draft, _ip("app0-prod-web-0"), _ip("app1-prod-db-0"), 5432)
    svc = next(c for c in result.candidates if c.name == "service-t0.00")
    assert app.report["rules"] < svc.report["rules"]
    assert app.report["over_permission"] > svc.report["over_permission"]


def test_report_figures_and_recommendation(result) -> None:  # type: ignore[no-untyped-def]
    rep = result.full_report()
    assert rep["recommended"] == result.candidates[result.recommended].name
    assert rep["coverage_train"] == 1.0 and rep["coverage_test"] >= 0.99
    assert rep["over_permission"] <= 0.05
    assert rep["compiled_entries"]["max"] > 0
    assert set(rep["evidence"]) == {r.id for rs in result.candidates[result.recommended].rulesets
                                    for r in rs.rules}
    ev = next(iter(rep["evidence"].values()))
    assert ev["flows"] > 0 and ev["sources"] > 0 and 0 < ev["confidence"] <= 1
    assert ev["first_seen"] <= ev["last_seen"] and ev["last_seen"].endswith("Z")
    c = result.candidates[result.recommended]
    assert all(r.description and "flows from" in r.description
               for rs in c.rulesets for r in rs.rules)
    # the draft round-trips through the file format; its tests include the crown jewel
    again = loads_policy(dump_policy(c.draft))
    assert again == c.draft
    assert any(t.expect == "blocked" for t in c.tests)
    assert rep["tests"]["crown_jewel_exposed"] == []


def test_noise_filters_report_what_they_removed(result) -> None:  # type: ignore[no-untyped-def]
    rep = result.report["noise"]
    proto = np.asarray(FLOWS.proto)
    port = np.asarray(FLOWS.dst_port)
    count = np.asarray(FLOWS.count)
    assert rep["dns"]["flows"] == int(count[(proto == 17) & (port == 53)].sum())
    assert rep["monitoring"]["flows"] == int(count[(proto == 6) & (port == 9100)].sum())
    assert rep["ntp"]["flows"] == 0 and rep["dns"]["examples"]
    for c in result.candidates:
        specs = {s for rs in c.rulesets for r in rs.rules for s in r.services}
        assert "udp/53" not in specs and "tcp/9100" not in specs


def test_core_services_become_one_shared_rule(result) -> None:  # type: ignore[no-untyped-def]
    c = next(c for c in result.candidates if c.name == "service-t0.00")
    core = [rs for rs in c.rulesets if rs.name == "gen-core-services"]
    assert len(core) == 1 and len(core[0].rules) == 1
    r = core[0].rules[0]
    assert r.services == ("tcp/636",)
    assert [a.selector for a in r.providers] == [Selector.of({"role": "ldap"})]
    # without the DNS filter, DNS is a core service too
    loud = generate(POLICY, FLOWS, Options(noise=(), granularity="service", tolerances=(0.0,)))
    core = next(rs for rs in loud.candidates[0].rulesets if rs.name == "gen-core-services")
    assert {s for r in core.rules for s in r.services} == {"tcp/636", "udp/53"}


def test_label_suggestions_for_unlabelled_workloads(result) -> None:  # type: ignore[no-untyped-def]
    sugg = {(s["workload"], s["key"]): s for s in result.report["label_suggestions"]}
    for a in range(4):
        s = sugg[(f"app{a}-prod-api-x", "role")]
        assert s["value"] == "api" and s["confidence"] >= 0.5


def test_only_what_the_existing_policy_does_not_allow(result) -> None:  # type: ignore[no-untyped-def]
    web = Selector.of({"role": "web"})
    api = Selector.of({"role": "api"})
    existing = Ruleset("hand-written", (Rule("allow", (Actor("labels", web),),
                                             (Actor("labels", api),), ("tcp/8080",),
                                             id="web-api"),))
    p = replace(POLICY, rulesets=(existing,))
    r = generate(p, FLOWS, Options(granularity="service", tolerances=(0.0,)))
    c = r.candidates[0]
    assert r.report["flows"]["already_allowed"] > 0
    assert c.draft.rulesets[0] == existing
    # web -> api on 8080 is generated only towards the unlabelled api replicas
    for rs in c.rulesets:
        for rule in rs.rules:
            webs = [a for a in rule.consumers if a.selector is not None
                    and ("role", "web") in a.selector.terms]
            if "tcp/8080" in rule.services and webs:
                assert {a.kind for a in rule.providers} == {"workload"}
    assert c.report["coverage_train"] == 1.0


def test_process_granularity_binds_services_to_processes() -> None:
    f = FlowColumns(["10.0.1.1", "10.0.1.1"], ["10.0.1.2", "10.0.1.2"], [6, 6], [5432, 5432],
                    ["postgres", "/usr/bin/postgres"], [T0, T0 + 1], None)
    p = Policy(workloads=(
        syn.Workload("a", ("10.0.1.1",), (("app", "x"), ("env", "e"), ("role", "api"))),
        syn.Workload("b", ("10.0.1.2",), (("app", "x"), ("env", "e"), ("role", "db")))))
    r = generate(p, f, Options(granularity="process", tolerances=(0.0,)))
    c = r.candidates[0]
    # one service bound to the executable name, which both spellings resolve to
    assert [(s.process, s.ports) for s in c.services] == [("postgres", ("tcp/5432",))]
    assert c.report["coverage_train"] == 1.0


def test_external_peers_as_one_internet_list() -> None:
    r = generate(POLICY, FLOWS, Options(external="internet", granularity="service",
                                        tolerances=(0.0,)))
    lists = r.candidates[0].ip_lists
    assert [x.name for x in lists] == ["gen-internet"]
    assert "10.0.0.0/8" in lists[0].exclude
    assert _allowed(r.candidates[0].draft, "8.8.8.8", _ip("app0-prod-web-0"), 443)


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="granularity"):
        generate(POLICY, FLOWS, Options(granularity="rack"))
    with pytest.raises(ValueError, match="unknown noise filter"):
        generate(POLICY, FLOWS, Options(noise=("gossip",)))
    with pytest.raises(ValueError, match="unknown label key"):
        generate(POLICY, FLOWS, Options(scope=(("team", "x"),)))


def test_port_ranges_and_lossless_lattice() -> None:
    assert port_ranges([8000, 8001, 8002, 9000], 0.0) == [(8000, 8002), (9000, 9000)]
    assert port_ranges([8000, 8002, 8004], 0.0) == [(8000, 8000), (8002, 8002), (8004, 8004)]
    assert port_ranges([8000, 8002, 8004], 0.5) == [(8000, 8004)]
    assert port_ranges([80, 443], 0.5) == [(80, 80), (443, 443)]
    idx = LabelIndex(POLICY.workloads, ("role", "app", "env"))
    web = ("labels", (("role", "web"), ("app", "app0"), ("env", "prod")))
    worker = ("labels", (("role", "worker"), ("app", "app0"), ("env", "prod")))
    got = generalise(idx, [web, worker], 0.0, {})
    # env is redundant (one env): dropped; app is not (other apps' web would get in)
    assert got[web] == (("labels", (("role", "web"), ("app", "app0"))), 2, 0)
    # with a tolerance, dropping app admits other apps' web servers: only at 0.9
    assert got == generalise(idx, [web, worker], 0.5, {})
    lifted = generalise(idx, [web], 0.9, {})
    (kind, sel), admitted, unobserved = lifted[web]
    assert kind == "labels" and len(sel) == 1 and unobserved == admitted - 2


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(apps=st.integers(1, 3), n=st.integers(20, 400), seed=st.integers(0, 10_000),
       gran=st.sampled_from(["env", "app", "tier", "service", "process"]),
       tol=st.sampled_from([0.0, 0.25, 0.5]), scoped=st.booleans())
def test_every_training_flow_in_scope_is_allowed(apps: int, n: int, seed: int, gran: str,
                                                 tol: float, scoped: bool) -> None:
    policy, intents = syn.estate(apps=apps, cross_app=seed % 2 == 0)
    f = syn.flows(policy, intents, n, start=T0, duration=DAY, seed=seed)
    scope = (("app", "app0"),) if scoped else ()
    r = generate(policy, f, Options(granularity=gran, tolerances=(tol,), scope=scope,
                                    noise=("dns",)))
    for c in r.candidates:
        assert c.report["coverage_train"] == 1.0, (c.name, c.report)
        ev = Evaluator(as_fully_enforced(c.draft))
        for i in range(0, len(f), max(1, len(f) // 25)):
            port = int(np.asarray(f.dst_port)[i])
            if port == 53:
                continue
            src, dst = f.src_ip[i], f.dst_ip[i]
            in_scope = not scoped or any(
                w.label("app") == "app0" and (src in w.ips or dst in w.ips)
                for w in policy.workloads)
            if in_scope:
                d = ev.decide(Flow(src, dst, int(np.asarray(f.proto)[i]), port))
                assert not d.blocked, (c.name, src, dst, port)


EDGE_POLICY = Policy(workloads=(
    syn.Workload("a", ("10.0.0.1", "fd00::1"), (("app", "x"), ("env", "p"), ("role", "web"))),
    syn.Workload("b", ("10.0.0.2", "fd00::2"), (("app", "x"), ("env", "p"), ("role", "db"))),
    syn.Workload("u", ("10.0.0.3",), ())))


@pytest.mark.parametrize(("flows", "rules"), [
    (FlowColumns([], [], [], [], None, None, None), 0),
    (FlowColumns(["fd00::1", "2001:db8::5"], ["fd00::2", "fd00::1"], [6, 6], [5432, 443], None,
                 [1.0, 2.0], None), 2),
    (FlowColumns(["10.0.0.1"], ["10.0.0.2"], [1], [-1], None, None, None), 1),
    (FlowColumns(["10.0.0.1"], ["10.0.0.2"], [47], [-1], None, None, None), 1),
    (FlowColumns(["10.0.0.3", "8.8.8.8", "8.8.8.8"], ["10.0.0.2", "10.0.0.3", "9.9.9.9"],
                 [6, 17, 6], [5432, 9999, 80], None, None, None), 2),
    (FlowColumns(["8.8.8.8"], ["10.0.0.1"], [6], [443], None, None, None), 1),
], ids=["empty", "ipv6", "icmp", "gre", "unlabelled-and-external", "inbound-only"])
def test_edge_cases_load_and_cover(flows: FlowColumns, rules: int) -> None:
    for g in (None, "process", "env"):
        r = generate(EDGE_POLICY, flows, Options(granularity=g, noise=()))
        c = r.candidates[r.recommended]
        assert loads_policy(dump_policy(c.draft)) == c.draft
        assert c.report["coverage_train"] == 1.0
        if g is None:
            assert c.report["rules"] == rules
            assert all((e["first_seen"] is None) == (flows.ts is None)
                       for e in c.report["evidence"].values())


def test_an_existing_deny_stays_the_operators_intent() -> None:
    deny = Ruleset("boundaries", (Rule("deny", (Actor("labels", Selector.of(
        {"role": "api", "app": "app0"})),), (Actor("labels", Selector.of(
            {"role": "db", "app": "app0"})),), ("tcp/5432",), id="no-api-db"),))
    intent = PolicyTest("app0-prod-api-0", "app0-prod-db-0", "tcp/5432", "blocked")
    p = replace(POLICY, rulesets=(deny,), tests=(intent,))
    r = generate(p, FLOWS, Options(granularity="service", tolerances=(0.0, 0.5)))
    assert r.report["flows"]["blocked_by_deny"] > 0
    for c in r.candidates:
        assert c.report["tests"]["existing_broken"] == []
        assert c.draft.tests[0] == intent
        assert not _allowed(c.draft, _ip("app0-prod-api-1"), _ip("app0-prod-db-1"), 5432)
        assert _allowed(c.draft, _ip("app1-prod-api-1"), _ip("app1-prod-db-1"), 5432)
        assert c.report["coverage_train"] == 1.0


def test_generalised_rules_never_override_an_existing_deny() -> None:
    # an allow beats a plain deny: an `app` ring-fence (service any) over app0 would let the
    # denied api -> db tcp/5432 through unless the rule falls back to its exact edges
    deny = Ruleset("boundaries", (Rule("deny", (Actor("labels", Selector.of(
        {"role": "api", "app": "app0"})),), (Actor("labels", Selector.of(
            {"role": "db", "app": "app0"})),), ("tcp/5432",), id="no-api-db"),))
    p = replace(POLICY, rulesets=(deny,))
    r = generate(p, FLOWS, Options(granularity="app", tolerances=(0.0, 0.5)))
    for c in r.candidates:
        d = Evaluator(as_fully_enforced(c.draft)).decide(
            Flow(_ip("app0-prod-api-1"), _ip("app0-prod-db-1"), 6, 5432))
        assert d.decision == "blocked_by_deny", (c.name, d)
        assert c.report["overrides_deny"] == []
        assert c.report["coverage_train"] == 1.0
        assert _allowed(c.draft, _ip("app1-prod-api-1"), _ip("app1-prod-db-1"), 5432)


def test_process_services_whose_names_sanitise_alike_stay_distinct() -> None:
    from types import SimpleNamespace

    from bulkhead.generate.build import _Services

    ctx = SimpleNamespace(opts=Options(), policy=Policy())
    svcs = _Services(ctx, 0.0)  # type: ignore[arg-type]
    a, b = svcs.refs([("tcp/80", "my app")]), svcs.refs([("tcp/80", "my-app")])
    assert a != b
    assert {svcs.named[a[0]].process, svcs.named[b[0]].process} == {"my app", "my-app"}


def test_env_granularity_recovers_the_environment_fence() -> None:
    policy, intents = syn.estate(apps=2, envs=("prod", "staging"))
    f = syn.flows(policy, intents, 6000, start=T0, duration=DAY, seed=5)
    c = generate(policy, f, Options(granularity="env", tolerances=(0.0,))).candidates[0]
    ip = {w.name: w.ips[0] for w in policy.workloads}
    p = c.draft
    assert _allowed(p, ip["app0-prod-web-0"], ip["app1-prod-db-1"], 22)  # inside the fence
    assert _allowed(p, ip["app1-staging-worker-0"], ip["app0-staging-api-0"], 8080)
    assert not _allowed(p, ip["app0-prod-web-0"], ip["app0-staging-db-0"], 5432)
    assert not _allowed(p, ip["app0-staging-api-0"], ip["app0-prod-db-0"], 5432)
    assert _allowed(p, ip["app0-staging-api-0"], ip["ldap-0"], 636)  # the shared service
    assert c.report["coverage_train"] == 1.0
