"""`bulkhead.policy.lint`: every check positive and negative, with its path; API-built policies
with dangling references; soundness properties against the evaluator; scale."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.domain.model import (
    Actor,
    GroupRef,
    IPList,
    LabelGroup,
    Policy,
    PolicyTest,
    Rule,
    Ruleset,
    Selector,
    Service,
    Workload,
)
from bulkhead.policy.evaluate import Evaluator
from bulkhead.policy.fileformat import policy_from_document
from bulkhead.policy.lint import Finding, has_errors, lint
from bulkhead.policy.source import Document, parse_text, read_file
from tests.strategies import flows_for, policies

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "policies" / "shop.yaml"

HEADER = """
version: 1
workloads:
  - {name: web-1, ips: [10.0.0.1], labels: {role: web, app: a, env: prod}, managed: true}
  - {name: api-1, ips: [10.0.0.2], labels: {role: api, app: a, env: prod}, managed: true}
  - {name: db-1, ips: [10.0.0.3], labels: {role: db, app: a, env: prod}, managed: true}
  - {name: web-2, ips: [10.0.1.1], labels: {role: web, app: b, env: dev}, managed: true}
  - {name: db-2, ips: [10.0.1.3], labels: {role: db, app: b, env: dev}}
"""


def load(text: str) -> tuple[Policy, Document]:
    doc = parse_text(text, "p.yaml")
    return policy_from_document(doc), doc


def run(body: str) -> list[Finding]:
    policy, doc = load(HEADER + body)
    return lint(policy, doc)


def found(findings: list[Finding], code: str) -> list[tuple[str, str]]:
    return [(f.severity, f.path) for f in findings if f.code == code]


def one(findings: list[Finding], code: str) -> Finding:
    hits = [f for f in findings if f.code == code]
    assert len(hits) == 1, findings
    return hits[0]


# -- the example policy ------------------------------------------------------------------------

def test_shop_example() -> None:
    doc = read_file(str(SHOP))
    findings = lint(policy_from_document(doc), doc)
    assert not has_errors(findings)
    scoped = one(findings, "never-matches-in-scope")
    assert scoped.path == "rulesets[0].rules[2]" and scoped.severity == "warning"
    assert "rulesets[0].scopes[0]" in scoped.message and "'web-dev-db'" in scoped.message
    assert scoped.line == 28
    assert str(scoped).startswith(f"{SHOP}:28: rulesets[0].rules[2]: rule 'web-dev-db' never")
    assert found(findings, "unused") == [("info", "label_groups[0]")]
    assert {f.code for f in findings} == {"never-matches-in-scope", "unused"}


# -- never-matches -----------------------------------------------------------------------------

def test_never_matches_in_every_scope_is_an_error() -> None:
    findings = run("""
rulesets:
  - name: rs
    scopes: [{app: b}]
    rules:
      - {id: x, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {app: a}}], services: [tcp/80]}
      - {id: ok, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: db}}], services: [tcp/80]}
""")
    f = one(findings, "never-matches")
    assert (f.severity, f.path) == ("error", "rulesets[0].rules[0]")
    assert "providers[0]" in f.message and "contradicts scope {app: b} on 'app'" in f.message
    assert f.line is not None and has_errors(findings)
    assert not [g for g in findings if g.path == "rulesets[0].rules[1]"]


def test_never_matches_consumer_side_and_extra_scope() -> None:
    body = """
rulesets:
  - name: rs
    scopes: [{app: b}]
    rules:
      - {action: allow, consumers: [{labels: {app: a}}], providers: [{labels: {role: db}}],
         services: [tcp/80]EXTRA}
"""
    findings = run(body.replace("EXTRA", ""))
    f = one(findings, "never-matches")
    assert f.path == "rulesets[0].rules[0]" and "consumers[0]" in f.message
    # extra_scope frees the consumers from the scope: the rule can match
    assert not found(run(body.replace("EXTRA", ", extra_scope: true")), "never-matches")


def test_never_matches_in_some_scopes_is_a_warning_naming_the_scope() -> None:
    findings = run("""
rulesets:
  - name: rs
    scopes: [{app: a}, {app: b}]
    rules:
      - {id: x, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {app: a, role: db}}], services: [tcp/80]}
""")
    assert not has_errors(findings)
    f = one(findings, "never-matches-in-scope")
    assert f.path == "rulesets[0].rules[0]" and "rulesets[0].scopes[1] {app: b}" in f.message
    assert "rulesets[0].scopes[0]" not in f.message


def test_one_dead_actor_among_live_ones_is_a_warning_on_the_actor() -> None:
    findings = run("""
rulesets:
  - name: rs
    scopes: [{app: a}]
    rules:
      - {action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {app: b}}, {labels: {role: db}}], services: [tcp/80]}
""")
    assert not has_errors(findings)
    f = one(findings, "unmatchable-actor")
    assert (f.severity, f.path) == ("warning", "rulesets[0].rules[0].providers[0]")
    assert not found(findings, "never-matches-in-scope")


def test_empty_label_group_makes_actors_unmatchable() -> None:
    findings = run("""
label_groups:
  - {name: nothing, key: env, values: []}
  - {name: outer, key: env, groups: [nothing]}
rulesets:
  - name: rs
    rules:
      - {action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {env: {group: outer}}}], services: [tcp/80]}
""")
    assert found(findings, "empty-label-group") == [("warning", "label_groups[0]"),
                                                     ("warning", "label_groups[1]")]
    f = one(findings, "never-matches")
    assert f.path == "rulesets[0].rules[0]" and "label group 'outer' has no values" in f.message
    assert not found(findings, "unused")  # 'nothing' is used through 'outer'


def test_workload_actor_outside_its_scope_never_matches() -> None:
    findings = run("""
rulesets:
  - name: rs
    scopes: [{app: a}]
    rules:
      - {action: allow, consumers: [{labels: {role: web}}], providers: [{workload: db-2}],
         services: [tcp/80]}
      - {action: allow, consumers: [{labels: {role: web}}], providers: [{workload: db-1}],
         services: [tcp/80]}
""")
    f = one(findings, "never-matches")
    assert f.path == "rulesets[0].rules[0]" and "workload 'db-2' is not in scope" in f.message


def test_empty_ip_list_and_empty_user_group() -> None:
    findings = run("""
ip_lists:
  - {name: none, cidrs: [10.0.0.0/8], exclude: [10.0.0.0/8]}
  - {name: some, cidrs: [192.0.2.0/24]}
user_groups:
  - {name: nobody, members: []}
rulesets:
  - name: rs
    rules:
      - {action: allow, consumers: [{ip_list: none}], providers: [{labels: {role: web}}],
         services: [tcp/443]}
      - {action: allow, consumers: [{user_group: nobody}, {ip_list: some}],
         providers: [{labels: {role: db}}], services: [tcp/443]}
""")
    assert found(findings, "empty-ip-list") == [("warning", "ip_lists[0]")]
    assert found(findings, "never-matches") == [("error", "rulesets[0].rules[0]")]
    assert found(findings, "unmatchable-actor") == [
        ("warning", "rulesets[0].rules[1].consumers[0]")]
    assert not found(run("""
ip_lists:
  - {name: some, cidrs: [192.0.2.0/24]}
rulesets:
  - name: rs
    rules:
      - {action: allow, consumers: [{ip_list: some}], providers: [{labels: {role: web}}],
         services: [tcp/443]}
"""), "empty-ip-list")


# -- dangling references on a Policy built in Python -------------------------------------------

def test_dangling_references_in_an_api_built_policy() -> None:
    rule = Rule(
        "allow",
        consumers=(Actor("ip_list", name="corp"), Actor("user_group", name="ops"),
                   Actor("labels", selector=Selector.of({"env": GroupRef("nope")}))),
        providers=(Actor("workload", name="ghost"), Actor("labels", selector=None)),
        services=("web", "tcp/443"))
    policy = Policy(
        label_groups=(LabelGroup("g", "env", ("prod",), ("missing",)),),
        ip_lists=(IPList("bad", ("10.0.0.0/33",)),),
        services=(Service("svc", ("tcp/99999",)),),
        workloads=(Workload("w", ("10.0.0.1",), (("env", "prod"),)),
                   Workload("v", ("not-an-ip",))),
        rulesets=(Ruleset("rs", (rule,), (Selector.of({"app": GroupRef("gone")}),)),
                  Ruleset("ok", (Rule("allow", (Actor("workload", name="w"),),
                                      (Actor("user_group", name="ops"),), ("tcp/22",)),))),
        tests=(PolicyTest("nobody", "w", "tcp/22", "blocked"),))
    findings = lint(policy)
    dangling = found(findings, "dangling-reference")
    assert dangling == [(
        "error", p) for p in (
        "label_groups[0].groups[0]",
        "rulesets[0].rules[0].consumers[0]",
        "rulesets[0].rules[0].consumers[1]",
        "rulesets[0].rules[0].consumers[2].labels.env",
        "rulesets[0].rules[0].providers[0]",
        "rulesets[0].rules[0].services[0]",
        "rulesets[0].scopes[0].app",
        "rulesets[1].rules[0].providers[0]",
        "tests[0].from")]
    messages = {f.path: f.message for f in findings if f.code == "dangling-reference"}
    assert messages["rulesets[0].rules[0].consumers[0]"] == "unknown ip_list 'corp'"
    assert messages["rulesets[0].rules[0].services[0]"].startswith("unknown service 'web'")
    invalid = found(findings, "invalid")
    assert ("error", "ip_lists[0].cidrs[0]") in invalid
    assert ("error", "services[0].ports[0]") in invalid
    assert ("error", "workloads[1].ips[0]") in invalid
    assert ("error", "rulesets[0].rules[0].providers[1]") in invalid  # labels without selector
    assert ("error", "rulesets[1].rules[0].providers[0]") in invalid  # user group as provider
    # rules with broken references get no further (misleading) findings
    assert not found(findings, "never-matches")
    assert has_errors(findings)
    assert str(findings[0]) == f"{findings[0].path}: {findings[0].message}"


def test_malformed_values_in_an_api_built_policy() -> None:
    rule = Rule("allow",
                (Actor("labels", selector=Selector((("role", ["web", "api"]),))),),  # type: ignore[arg-type]
                (Actor("labels", selector=Selector((("role", 5),))),),  # type: ignore[arg-type]
                ("svc",))
    policy = Policy(services=(Service("svc"),),
                    workloads=(Workload("w", ("10.0.0.1",), (("role", "web"),)),),
                    rulesets=(Ruleset("rs", (rule,)),))
    findings = lint(policy)
    assert [(f.code, f.path) for f in findings] == [
        ("invalid", "rulesets[0].rules[0].providers[0].labels.role"),
        ("invalid", "services[0].ports")]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(policies(), st.sets(st.sampled_from(
    ["label_groups", "ip_lists", "services", "user_groups", "workloads"]), min_size=1))
def test_stripped_sections_are_dangling_references_not_crashes(
        policy: Policy, sections: set[str]) -> None:
    """A policy whose referenced objects were removed in Python lints without crashing, and
    every kind of removed object that a rule referred to is reported as dangling."""
    findings = lint(replace(policy, **{s: () for s in sections}))  # type: ignore[arg-type]
    referenced: set[str] = set()
    service_names = {svc.name for svc in policy.services}
    for rs in policy.rulesets:
        for sel in rs.scopes:
            if any(isinstance(v, GroupRef) for _, v in sel.terms):
                referenced.add("label_groups")
        for r in rs.rules:
            for a in (*r.consumers, *r.providers):
                kind = {"ip_list": "ip_lists", "user_group": "user_groups",
                        "workload": "workloads"}.get(a.kind)
                if kind:
                    referenced.add(kind)
                if a.selector and any(isinstance(v, GroupRef) for _, v in a.selector.terms):
                    referenced.add("label_groups")
            if any(x in service_names for x in r.services):
                referenced.add("services")
    for t in policy.tests:
        for e in (t.source, t.target):
            if isinstance(e, str) and policy.workload(e) is not None:
                referenced.add("workloads")
    dangling = [f for f in findings if f.code == "dangling-reference"]
    assert bool(dangling) == bool(referenced & sections)
    assert all(f.severity == "error" for f in dangling)


def test_lint_accepts_a_bare_policy() -> None:
    assert lint(Policy()) == []
    assert has_errors([]) is False


# -- shadowed ----------------------------------------------------------------------------------

SHADOW = """
rulesets:
  - name: rs
    rules:
      - {id: wide, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: api}}], services: ["tcp/8000-8099"]}
      - {id: narrow, action: allow, consumers: [{workload: web-1}],
         providers: [{labels: {role: api, env: prod}}], services: [SERVICE]}
"""


def test_shadowed_by_a_rule_of_the_same_action() -> None:
    f = one(run(SHADOW.replace("SERVICE", "tcp/8080")), "shadowed")
    assert (f.severity, f.path) == ("warning", "rulesets[0].rules[1]")
    assert "redundant" in f.message and "'wide'" in f.message
    assert not found(run(SHADOW.replace("SERVICE", "tcp/9000")), "shadowed")
    assert not found(run(SHADOW.replace("SERVICE", "tcp/8080-8100")), "shadowed")


def test_identical_rules_only_the_later_is_redundant() -> None:
    rule = ("      - {id: IDENT, action: deny, consumers: [{labels: {role: web}}],"
            " providers: [{labels: {role: db}}], services: [tcp/5432]}\n")
    findings = run("rulesets:\n  - name: rs\n    rules:\n" + rule.replace("IDENT", "first")
                   + rule.replace("IDENT", "second"))
    f = one(findings, "shadowed")
    assert f.path == "rulesets[0].rules[1]" and "'first'" in f.message


def test_allow_covered_by_override_deny_never_takes_effect() -> None:
    body = """
rulesets:
  - name: rs
    rules:
      - {id: allow-it, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: db}}], services: [tcp/5432]}
  - name: fence
    rules:
      - {id: fence, action: override_deny, consumers: [{labels: {CONS}}],
         providers: [{all_workloads: true}], services: [any]}
"""
    f = one(run(body.replace("CONS", "env: [prod, dev]")), "shadowed")
    assert f.path == "rulesets[0].rules[0]" and "never takes effect" in f.message
    assert "override_deny rule 'fence'" in f.message
    assert not found(run(body.replace("CONS", "env: dev")), "shadowed")


def test_deny_covered_by_allow_never_blocks() -> None:
    f = one(run("""
rulesets:
  - name: rs
    rules:
      - {id: allow-all-db, action: allow, consumers: [{all_workloads: true}],
         providers: [{labels: {role: db}}], services: [tcp]}
      - {id: no-web-db, action: deny, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: db}}], services: [tcp/5432]}
"""), "shadowed")
    assert f.path == "rulesets[0].rules[1]" and "never blocks" in f.message


def test_shadowing_uses_concrete_sets_ip_lists_and_port_unions() -> None:
    findings = run("""
ip_lists:
  - {name: apps, cidrs: [10.0.0.0/24]}
rulesets:
  - name: global
    rules:
      - {id: by-address, action: allow, consumers: [{labels: {env: prod}}],
         providers: [{ip_list: apps}], services: ["tcp/1-50", "tcp/51-100"]}
  - name: scoped
    scopes: [{app: a}]
    rules:
      - {id: by-label, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: db}}], services: ["tcp/10-90"]}
""")
    f = one(findings, "shadowed")
    assert f.path == "rulesets[1].rules[0]" and "'by-address'" in f.message


def test_process_bound_rule_covers_only_its_process() -> None:
    body = """
services:
  - {name: pg, ports: [tcp/5432], BINDING}
rulesets:
  - name: rs
    rules:
      - {id: bound, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: db}}], services: [pg]}
      - {id: other, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: db}}], services: [tcp/5432]}
"""
    for binding in ("process: postgres", "unit: pg.service"):
        # the bound rule is covered by the unbound one, never the other way round
        f = one(run(body.replace("BINDING", binding)), "shadowed")
        assert f.path == "rulesets[0].rules[0]" and "'other'" in f.message


def test_user_group_coverage() -> None:
    body = """
user_groups:
  - {name: ops, members: [alice, bob]}
  - {name: admins, members: [alice]}
rulesets:
  - name: rs
    rules:
      - {id: ops, action: allow, consumers: [{user_group: ops}], providers: [{labels: {role: db}}],
         services: [tcp/22]}
      - {id: admins, action: allow, consumers: [{user_group: GROUP}],
         providers: [{labels: {role: db}}], services: [tcp/22]}
"""
    assert found(run(body.replace("GROUP", "admins")), "shadowed") == [
        ("warning", "rulesets[0].rules[1]")]
    assert not found(run(body.replace("GROUP", "admins").replace("[alice, bob]", "[bob]")),
                     "shadowed")


# -- over-broad, no-workloads, user groups -----------------------------------------------------

def test_over_broad() -> None:
    body = """
ip_lists:
  - {name: everything, cidrs: [0.0.0.0/0]}
rulesets:
  - name: rs
    SCOPE
    rules:
      - {action: ACTION, consumers: [CONS], providers: [{all_workloads: true}],
         services: [SERVICE]}
"""

    def go(action: str = "allow", cons: str = "{all_workloads: true}", service: str = "any",
           scope: str = "") -> list[tuple[str, str]]:
        return found(run(body.replace("ACTION", action).replace("CONS", cons)
                         .replace("SERVICE", service).replace("SCOPE", scope)), "over-broad")

    assert go() == [("warning", "rulesets[0].rules[0]")]
    assert go(cons="{ip_list: everything}") == [("warning", "rulesets[0].rules[0]")]
    assert go(action="deny") == [("info", "rulesets[0].rules[0]")]
    assert go(service="tcp/443") == []
    assert go(cons="{labels: {role: web}}") == []
    assert go(scope="scopes: [{app: a}]") == []


def test_no_workloads() -> None:
    body = """
rulesets:
  - name: rs
    rules:
      - {action: allow, consumers: [{labels: {role: web}}], providers: [{labels: {role: ROLE}}],
         services: [tcp/80]}
"""
    f = one(run(body.replace("ROLE", "cache")), "no-workloads")
    assert (f.severity, f.path) == ("warning", "rulesets[0].rules[0]")
    assert "providers" in f.message
    assert not found(run(body.replace("ROLE", "db")), "no-workloads")


def test_user_group_consumer_with_managed_providers() -> None:
    body = """
user_groups:
  - {name: ops, members: [alice]}
rulesets:
  - name: rs
    rules:
      - {action: allow, consumers: [{labels: {role: web}}, {user_group: ops}],
         providers: [{workload: PROVIDER}], services: [tcp/22]}
"""
    f = one(run(body.replace("PROVIDER", "db-1")), "user-group-provider-side")
    assert (f.severity, f.path) == ("warning", "rulesets[0].rules[0].consumers[1]")
    assert "'db-1'" in f.message and "address-based rule" in f.message
    assert not found(run(body.replace("PROVIDER", "db-2")), "user-group-provider-side")


def test_unused_objects() -> None:
    findings = run("""
label_groups:
  - {name: prod-ish, key: env, values: [prod]}
  - {name: used, key: env, values: [prod]}
ip_lists:
  - {name: spare, cidrs: [192.0.2.0/24]}
  - {name: tested, cidrs: [198.51.100.0/24]}
services:
  - {name: idle, ports: [tcp/1]}
user_groups:
  - {name: nobody-uses, members: [x]}
rulesets:
  - name: rs
    scopes: [{env: {group: used}}]
    rules:
      - {action: allow, consumers: [{labels: {role: web}}], providers: [{labels: {role: db}}],
         services: [tcp/80]}
tests:
  - {from: {ip_list: tested}, to: db-1, port: tcp/80, expect: blocked}
""")
    assert found(findings, "unused") == [("info", p) for p in (
        "ip_lists[0]", "label_groups[0]", "services[0]", "user_groups[0]")]


def test_findings_are_sorted_by_severity_then_natural_path() -> None:
    rules = "".join(
        f"      - {{action: allow, consumers: [{{labels: {{role: web}}}}], "
        f"providers: [{{labels: {{role: {'cache' if i in (2, 10) else 'db'}}}}}], "
        f"services: [tcp/{1000 + i}]}}\n" for i in range(12))
    findings = run("ip_lists:\n  - {name: spare, cidrs: [192.0.2.0/24]}\n"
                   "rulesets:\n  - name: rs\n    rules:\n" + rules)
    assert [(f.severity, f.path) for f in findings] == [
        ("warning", "rulesets[0].rules[2]"), ("warning", "rulesets[0].rules[10]"),
        ("info", "ip_lists[0]")]


# -- properties --------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_lint_is_sound_against_the_evaluator(data: st.DataObject) -> None:
    """Loaded policies have no reference errors; a rule lint calls never-matching never shows
    up in a decision; a rule shadowed by a rule of the same action never matches a flow
    without its coverer(s); an allow/deny shadowed by an override_deny never decides."""
    policy = data.draw(policies())
    candidates = [(rs, r) for rs in policy.rulesets if rs.enabled for r in rs.rules]
    if candidates and data.draw(st.booleans()):
        # plant a copy (same action, or an override_deny) so that shadowing is common
        rs, r = data.draw(st.sampled_from(candidates))
        action = data.draw(st.sampled_from([r.action, "override_deny"]))
        copy = replace(r, id="planted", action=action)  # type: ignore[arg-type]
        policy = replace(policy, rulesets=(
            *policy.rulesets, Ruleset("planted", (copy,), rs.scopes)))
    findings = lint(policy)
    assert not found(findings, "dangling-reference") and not found(findings, "invalid")
    never = {f.path for f in findings if f.code == "never-matches"}
    shadowed = {f.path: f for f in findings if f.code == "shadowed"}
    if not (never or shadowed) or not policy.workloads:
        return
    ev = Evaluator(policy)
    ids = {i.rule_path: i.rule_id for i in ev.instances}
    for _ in range(20):
        flow = data.draw(flows_for(policy))
        d = ev.decide(flow)
        for path in never:
            assert ids.get(path) not in d.rules
        for path, f in shadowed.items():
            if ids.get(path) not in d.rules:
                continue
            coverers = [c for c in ids.values() if f"'{c}'" in f.message.split(":", 1)[1]]
            assert any(c in d.rules for c in coverers), (flow, d, f)
            if "never takes effect" in f.message:
                src, dst = ev.workload_for(flow.src_ip), ev.workload_for(flow.dst_ip)
                actions = {i.action for i in ev.matching(flow, src, dst)}
                assert "override_deny" in actions


# -- scale -------------------------------------------------------------------------------------

def big_policy(n_workloads: int = 10_000, n_rules: int = 1_000, seed: int = 1) -> Policy:
    rnd = random.Random(seed)
    roles = [f"r{i}" for i in range(20)]
    apps = [f"a{i}" for i in range(50)]
    envs = ["prod", "staging", "dev", "test"]
    workloads = []
    for i in range(n_workloads):
        labels = (("app", rnd.choice(apps)), ("env", rnd.choice(envs)),
                  ("loc", rnd.choice(["eu", "us"])), ("role", rnd.choice(roles)))
        workloads.append(Workload(f"w{i}", (f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",),
                                  labels, managed=True, enforcement="full"))
    rulesets = []
    for a in apps:
        rules = []
        for j in range(n_rules // len(apps)):
            rules.append(Rule(
                rnd.choice(["allow"] * 8 + ["deny", "override_deny"]),
                (Actor("labels", selector=Selector.of({"role": rnd.choice(roles)})),),
                (Actor("labels", selector=Selector.of({"role": rnd.choice(roles[:5])})),),
                (f"tcp/{rnd.randint(1, 100)}-{rnd.randint(100, 200)}",), id=f"{a}-{j}"))
        rulesets.append(Ruleset(a, tuple(rules), (Selector.of({"app": a, "env": "prod"}),
                                                  Selector.of({"app": a, "env": "dev"}))))
    return Policy(workloads=tuple(workloads), rulesets=tuple(rulesets),
                  ip_lists=(IPList("internet", ("0.0.0.0/0",), ("10.0.0.0/8",)),))


def test_a_thousand_rules_over_ten_thousand_workloads_lint_in_seconds() -> None:
    policy = big_policy()
    start = time.perf_counter()
    findings = lint(policy)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed
    assert found(findings, "shadowed")  # the search ran and found something
    assert not has_errors(findings)


def test_rules_of_a_disabled_ruleset_are_not_checked() -> None:
    policy, _ = load(HEADER + """
rulesets:
  - name: rs
    enabled: false
    scopes: [{app: b}]
    rules:
      - {action: allow, consumers: [{labels: {role: web}}], providers: [{labels: {app: a}}],
         services: [tcp/80]}
""")
    assert lint(policy) == []
    assert lint(replace(policy, rulesets=(replace(policy.rulesets[0], enabled=True),)))
