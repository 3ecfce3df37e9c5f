"""`bulkhead.policy.diff`: semantic changes between two policies, checked by example and
against the reference evaluator (every flow whose raw verdict changes is covered exactly)."""

from __future__ import annotations

import copy
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bulkhead.domain.errors import PolicyError
from bulkhead.domain.model import Actor, Policy, Rule, Ruleset, Selector, Workload
from bulkhead.domain.ports import PortSpec
from bulkhead.policy.diff import Change, PolicyDiff, diff
from bulkhead.policy.evaluate import Evaluator, Flow, raw_verdict
from bulkhead.policy.fileformat import load_policy, loads_policy, policy_from_data
from bulkhead.policy.resolve import exe_name
from tests.strategies import policy_data

ROOT = Path(__file__).resolve().parents[2]
SHOP = load_policy(str(ROOT / "examples" / "policies" / "shop.yaml"))
SHOP2 = load_policy(str(ROOT / "examples" / "policies" / "shop-v2.yaml"))

BASE = """
version: 1
ip_lists:
  - {name: internet, cidrs: ["0.0.0.0/0"], exclude: ["10.0.0.0/8"]}
services:
  - {name: api, ports: ["tcp/8080-8081"]}
  - {name: mysql, ports: ["tcp/3306"], process: mysqld}
workloads:
  - {name: web-1, ips: [10.0.0.1, "fd00::1"], labels: {role: web, env: prod}, managed: true,
     enforcement: full}
  - {name: api-1, ips: [10.0.0.2, "fd00::2"], labels: {role: api, env: prod}, managed: true}
  - {name: db-1, ips: [10.0.0.3], labels: {role: db, env: prod}, managed: true,
     enforcement: selective}
  - {name: dev-1, ips: [10.0.0.9], labels: {role: web, env: dev}, managed: true}
rulesets:
  - name: app
    rules:
      - {id: web-api, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: api}}], services: [api]}
      - {id: api-db, action: allow, consumers: [{labels: {role: api}}],
         providers: [{labels: {role: db}}], services: [mysql]}
      - {id: in, action: allow, consumers: [{ip_list: internet}],
         providers: [{labels: {role: web, env: prod}}], services: ["tcp/443"]}
"""


def base() -> Policy:
    return loads_policy(BASE)


def edit(text: str, old: str, new: str) -> Policy:
    assert old in text
    return loads_policy(text.replace(old, new))


def triples(changes: tuple[Change, ...]) -> set[tuple[str, str, str, str, str]]:
    return {(c.consumer, c.provider, c.service, c.before, c.after) for c in changes}


# -- examples ----------------------------------------------------------------------------------

def test_identical_policies_have_no_diff() -> None:
    for p in (SHOP, SHOP2, base()):
        d = diff(p, p)
        assert d.is_empty() and d == PolicyDiff()
        assert d.to_text() == "no semantic changes\n"


def test_shop_to_v2() -> None:
    d = diff(SHOP, SHOP2)
    assert triples(d.newly_allowed) == {
        ("web-1", "api-1", "tcp/9090", "blocked_no_rule", "allowed"),
        ("web-2", "api-1", "tcp/9090", "blocked_no_rule", "allowed")}
    ssh = {(c.consumer, c.provider) for c in d.newly_blocked if c.service == "tcp/22"}
    assert len(ssh) == len(d.newly_blocked) == 12
    # admin SSH came from the admins IP list: the jump host (inside it) and the rest of it
    assert ("jump", "db-1") in ssh and ("ip_list:admins", "db-1") in ssh
    assert {c.after for c in d.newly_blocked} == {"blocked_no_rule"}
    assert d.enforcement == (("db-1", "selective", "full"),)
    assert not d.changed and not d.workloads_added and not d.workloads_removed
    reverse = diff(SHOP2, SHOP)
    assert triples(reverse.newly_blocked) == {
        (c, p, s, a, b) for c, p, s, b, a in triples(d.newly_allowed)}


def test_adding_a_rule() -> None:
    new = edit(BASE, "rulesets:\n", """rulesets:
  - name: extra
    rules:
      - {action: allow, consumers: [{workload: dev-1}], providers: [{labels: {role: db}}],
         services: ["tcp/5432"]}
""")
    d = diff(base(), new)
    assert triples(d.newly_allowed) == {
        ("dev-1", "db-1", "tcp/5432", "blocked_no_rule", "allowed")}
    assert not d.newly_blocked and not d.changed and not d.enforcement


def test_widening_a_port_range_lists_only_the_new_ports() -> None:
    new = edit(BASE, '"tcp/8080-8081"', '"tcp/8080-8099"')
    d = diff(base(), new)
    assert {c.service for c in d.newly_allowed} == {"tcp/8082-8099"}
    assert {(c.consumer, c.provider) for c in d.newly_allowed} == {
        ("web-1", "api-1"), ("dev-1", "api-1")}


def test_override_deny_and_deny() -> None:
    fence = edit(BASE, "rulesets:\n", """rulesets:
  - name: fence
    rules:
      - {action: override_deny, consumers: [{labels: {env: dev}}],
         providers: [{labels: {env: prod}}], services: [any]}
      - {action: deny, consumers: [{labels: {role: web}}], providers: [{labels: {role: api}}],
         services: ["tcp/8081"]}
""")
    d = diff(base(), fence)
    assert triples(d.newly_blocked) == {
        ("dev-1", "api-1", "tcp/8080-8081", "allowed", "blocked_by_override_deny")}
    assert triples(d.changed) == {
        ("dev-1", "api-1", "any except tcp", "blocked_no_rule", "blocked_by_override_deny"),
        # the rest of tcp, exactly: ports around the allowed range, and port-less flows
        ("dev-1", "api-1", "tcp (no port)", "blocked_no_rule", "blocked_by_override_deny"),
        ("dev-1", "api-1", "tcp/0-8079", "blocked_no_rule", "blocked_by_override_deny"),
        ("dev-1", "api-1", "tcp/8082-65535", "blocked_no_rule", "blocked_by_override_deny"),
        ("dev-1", "db-1", "any", "blocked_no_rule", "blocked_by_override_deny"),
        ("dev-1", "web-1", "any", "blocked_no_rule", "blocked_by_override_deny"),
        ("web-1", "api-1", "tcp/8081", "allowed", "allowed_across_boundary")}
    assert not d.newly_allowed


def test_removing_a_workload() -> None:
    old = base()
    new = replace(old, workloads=tuple(w for w in old.workloads if w.name != "db-1"))
    d = diff(old, new)
    assert d.workloads_removed == ("db-1",) and not d.workloads_added
    assert not (d.newly_allowed or d.newly_blocked or d.changed)
    assert diff(new, old).workloads_added == ("db-1",)


def test_enforcement_changes_are_listed_apart_from_flows() -> None:
    new = edit(BASE, "enforcement: selective", "enforcement: full")
    new = replace(new, workloads=tuple(
        replace(w, managed=False) if w.name == "dev-1" else w for w in new.workloads))
    d = diff(base(), new)
    assert d.enforcement == (("db-1", "selective", "full"), ("dev-1", "visibility", "unmanaged"))
    assert not (d.newly_allowed or d.newly_blocked or d.changed)
    assert not d.is_empty()


def test_ip_list_exclusion_change() -> None:
    new = edit(BASE, 'exclude: ["10.0.0.0/8"]', 'exclude: ["10.0.0.0/8", "192.168.0.0/16"]')
    d = diff(base(), new)
    assert triples(d.newly_blocked) == {
        ("192.168.0.0/16 [in internet]", "web-1", "tcp/443", "allowed", "blocked_no_rule")}
    assert not d.newly_allowed and not d.changed


def test_external_blocks_are_named_by_their_ip_list() -> None:
    new = edit(BASE, '"tcp/443"', '"tcp/443-444"')
    d = diff(base(), new)
    assert triples(d.newly_allowed) == {
        ("ip_list:internet", "web-1", "tcp/444", "blocked_no_rule", "allowed")}


def test_addresses_of_one_workload_that_differ_are_named() -> None:
    # an IP list holding only web-1's IPv4 address: its IPv6 flows do not change
    text = BASE.replace("ip_lists:\n", "ip_lists:\n  - {name: one, cidrs: [10.0.0.1/32]}\n")
    new = edit(text, "rulesets:\n", """rulesets:
  - name: x
    rules:
      - {action: allow, consumers: [{ip_list: one}], providers: [{labels: {role: api}}],
         services: ["tcp/22"]}
""")
    d = diff(loads_policy(text), new)
    assert triples(d.newly_allowed) == {
        ("web-1 (10.0.0.1)", "api-1 (10.0.0.2)", "tcp/22", "blocked_no_rule", "allowed")}


def test_process_bound_services() -> None:
    new = edit(BASE, "services: [mysql]", 'services: ["tcp/3306"]')
    d = diff(base(), new)
    assert triples(d.newly_allowed) == {
        ("api-1", "db-1", "tcp/3306 process!=mysqld", "blocked_no_rule", "allowed")}


def test_user_groups() -> None:
    text = BASE.replace("workloads:\n", "user_groups:\n  - {name: dba, members: [ann]}\n"
                        "workloads:\n")
    new = edit(text, "rulesets:\n", """rulesets:
  - name: people
    rules:
      - {action: allow, consumers: [{user_group: dba}], providers: [{labels: {role: db}}],
         services: ["tcp/22"]}
""")
    d = diff(loads_policy(text), new)
    assert triples(d.newly_allowed) == {
        ("user_group:dba", "db-1", "tcp/22", "blocked_no_rule", "allowed")}


def test_output_formats() -> None:
    d = diff(SHOP, SHOP2)
    data = d.to_data()
    assert json.loads(json.dumps(data)) == data
    assert data["newly_allowed"][0] == {"consumer": "web-1", "provider": "api-1",
                                        "service": "tcp/9090", "before": "blocked_no_rule",
                                        "after": "allowed"}
    assert data["enforcement"] == [["db-1", "selective", "full"]]
    lines = d.to_text().splitlines()
    assert lines[0] == "+ web-1 -> api-1 tcp/9090 (blocked_no_rule -> allowed)"
    assert "- jump -> db-1 tcp/22 (allowed -> blocked_no_rule)" in lines
    assert "~ enforcement db-1: selective -> full" in lines
    assert lines[-1].startswith("2 newly allowed, 12 newly blocked")


# -- exactness against the evaluator -----------------------------------------------------------

def _service_matcher(text: str) -> Callable[[Flow], bool]:
    """The flows a rendered service covers (the grammar of `_Space.render`)."""
    head, *quals = re.split(r" (?=(?:process|unit)(?:=|!=| not in ))", text)

    def head_ok(proto: int, port: int | None) -> bool:
        if head == "any":
            return True
        if head.startswith("any except "):
            named = {PortSpec.parse(n).proto for n in head[len("any except "):].split(", ")}
            return proto not in named
        m = re.match(r"^(\S+) \(no (?:port|type)\)$", head)
        if m:
            p = PortSpec.parse(m.group(1)).proto
            top = 255 if p in (1, 58) else 65535
            return proto == p and (port is None or not 0 <= port <= top)
        m = re.match(r"^([a-z0-9]+)/(\d+)(?:-(\d+))?$", head)
        if m and m.group(1) != "proto":
            lo = int(m.group(2))
            hi = int(m.group(3) or lo)
            return (proto == PortSpec.parse(m.group(1)).proto and port is not None
                    and lo <= port <= hi)
        return proto == PortSpec.parse(head).proto

    def qual_ok(process: str | None, unit: str | None) -> bool:
        for q in quals:
            m = re.match(r"^(process|unit)(=|!=| not in )(.*)$", q)
            assert m, q
            value = (exe_name(process) if process else None) if m.group(1) == "process" else unit
            op, arg = m.group(2), m.group(3)
            if (op == "=" and value != arg) or (op == "!=" and value == arg):
                return False
            if op == " not in " and value in arg.strip("{}").split(","):
                return False
        return True

    return lambda f: head_ok(f.proto, f.dst_port) and qual_ok(f.process, f.unit)


def _raw(ev: Evaluator, f: Flow) -> str:
    actions = {i.action for i in ev.matching(f, ev.workload_for(f.src_ip),
                                             ev.workload_for(f.dst_ip))}
    return raw_verdict("override_deny" in actions, "allow" in actions, "deny" in actions)


def _probes(*ps: Policy) -> tuple[list[tuple[int, int | None]],
                                  tuple[list[str | None], list[str | None], list[str | None]]]:
    """(proto, port) at, inside and around every service of the policies (and no port, other
    protocols); processes, units and users to go with them."""
    probes: set[tuple[int, int | None]] = {(6, 443), (17, 53), (1, 8), (47, None), (99, None),
                                           (6, None), (6, 0), (1, 300)}
    processes: set[str | None] = {None, "/usr/bin/other"}
    units: set[str | None] = {None, "other.service"}
    users: set[str | None] = {None, "nobody"}
    for p in ps:
        for svc in p.services:
            processes.add(f"/usr/sbin/{svc.process}" if svc.process else None)
            units.add(svc.unit)
        for g in p.user_groups:
            users.update(g.members)
        specs = [PortSpec.parse(x) for svc in p.services for x in svc.ports] + [
            PortSpec.parse(x) for rs in p.rulesets for r in rs.rules for x in r.services
            if x not in {svc.name for svc in p.services}]
        for spec in specs:
            if spec.proto is None:
                continue
            probes.update({(spec.proto, None), (spec.proto, 7)})
            if spec.lo is not None and spec.hi is not None:
                probes.update((spec.proto, v) for v in (spec.lo - 1, spec.lo, spec.hi,
                                                        spec.hi + 1))
    return sorted(probes, key=str), (sorted(processes, key=str), sorted(units, key=str),
                                     sorted(users, key=str))


@st.composite
def policy_pairs(draw: st.DrawFn) -> tuple[Policy, Policy]:
    """An old policy and a new one: either an edit of it (rules dropped, actions flipped) or
    another policy over the same workloads; workloads relabelled, re-enforced, dropped."""
    old: dict[str, Any] = draw(policy_data(max_workloads=6))
    old["label_keys"] = ["role", "app", "env", "loc", "team"]
    if draw(st.booleans()):
        new = copy.deepcopy(draw(policy_data(max_workloads=6)))
        new["workloads"] = copy.deepcopy(old.get("workloads", []))
    else:
        new = copy.deepcopy(old)
        for rs in new.get("rulesets", []):
            if rs["rules"] and draw(st.booleans()):
                rule = rs["rules"][draw(st.integers(0, len(rs["rules"]) - 1))]
                if draw(st.booleans()):
                    rs["rules"].remove(rule)
                else:
                    rule["action"] = draw(st.sampled_from(["allow", "deny", "override_deny"]))
    new["label_keys"] = old["label_keys"]
    workloads = new.get("workloads", [])
    for w in list(workloads):
        choice = draw(st.integers(0, 7))
        if choice == 0:
            w["labels"] = {"role": draw(st.sampled_from(["web", "api", "db"]))}
        elif choice == 1:
            w["enforcement"] = "full"
        elif choice == 2 and len(workloads) > 1:
            workloads.remove(w)
    try:
        return policy_from_data(old), policy_from_data(new)
    except PolicyError:  # e.g. a rule naming a workload that was dropped
        assume(False)
        raise


def _covering(d: PolicyDiff, f: Flow, cons: str, prov: str, src_ip: str, dst_ip: str,
              ) -> list[Change]:
    cl, pl = {cons, f"{cons} ({src_ip})"}, {prov, f"{prov} ({dst_ip})"}
    return [c for c in (*d.newly_allowed, *d.newly_blocked, *d.changed)
            if c.consumer in cl and c.provider in pl and _service_matcher(c.service)(f)]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_every_changed_flow_between_common_workloads_is_listed(data: st.DataObject) -> None:
    """For flows between workloads present in both policies: a raw verdict that changes is
    listed with its exact before/after (newly_allowed when it went from blocked to allowed,
    newly_blocked the other way round), and a flow listed under a workload name did change
    (flows by users of a user group may instead be listed under `user_group:`)."""
    old, new = data.draw(policy_pairs())
    d = diff(old, new)
    assert diff(old, old).is_empty()
    eo, en = Evaluator(old), Evaluator(new)
    # address pairs of two different workloads, each address belonging to it in both policies
    ends = [(w.name, ip) for w in old.workloads for ip in w.ips
            if (x := en.workload_for(ip)) is not None and x.name == w.name]
    pairs = [(a, b) for a in ends for b in ends if a[0] != b[0] and (":" in a[1]) == (":" in b[1])]
    assume(pairs)
    probes, extras = _probes(old, new)
    for _ in range(30):
        (so, s), (to, t) = data.draw(st.sampled_from(pairs))
        proto, port = data.draw(st.sampled_from(probes))
        process, unit, user = (data.draw(st.sampled_from(x)) for x in extras)
        f = Flow(s, t, proto, port, process, unit, user)
        before, after = _raw(eo, f), _raw(en, f)
        cover = _covering(d, f, so, to, s, t)
        in_group = f.user is not None and any(
            f.user in g.members for p in (old, new) for g in p.user_groups)
        if before != after:
            hit = [c for c in cover if (c.before, c.after) == (before, after)]
            if not hit and in_group:
                hit = [c for c in (*d.newly_allowed, *d.newly_blocked, *d.changed)
                       if c.consumer.startswith("user_group:") and (c.before, c.after) == (
                           before, after) and c.provider in {to, f"{to} ({t})"}
                       and c.consumer.split("@", 1)[-1] in {c.consumer, so}
                       and _service_matcher(c.service)(f)]
            assert hit, (f, before, after, cover)
            was, now = before.startswith("allowed"), after.startswith("allowed")
            lists = (d.newly_allowed if now and not was else
                     d.newly_blocked if was and not now else d.changed)
            assert any(c in lists for c in hit)
        if not in_group:
            for c in cover:
                assert (c.before, c.after) == (before, after), (f, c)


# -- scale -------------------------------------------------------------------------------------

def estate(n_workloads: int, n_rules: int, seed: int = 0) -> Policy:
    rnd = random.Random(seed)
    apps = [f"app{i}" for i in range(max(1, n_workloads // 20))]
    roles = ["web", "api", "db", "cache", "worker"]
    workloads = []
    for i in range(n_workloads):
        labels = (("app", rnd.choice(apps)), ("env", rnd.choice(["prod", "dev"])),
                  ("role", rnd.choice(roles)))
        ips: tuple[str, ...] = (f"10.{i // 256}.{i % 256}.1",)
        if i % 10 == 0:
            ips += (f"fd00::{i:x}",)
        workloads.append(Workload(f"w{i}", ips, labels, managed=rnd.random() < 0.9,
                                  enforcement=rnd.choice(["full", "selective", "visibility"])))
    rules = []
    for j in range(n_rules):
        lo = rnd.randint(1, 9000)
        rules.append(Rule(
            rnd.choice(["allow"] * 6 + ["deny", "override_deny"]),
            (Actor("labels", selector=Selector.of({"role": rnd.choice(roles)})),),
            (Actor("labels", selector=Selector.of({"role": rnd.choice(roles)})),),
            (f"tcp/{lo}-{lo + rnd.randint(0, 100)}",), id=f"r{j}"))
    per_app = [Ruleset(a, tuple(rules[k::len(apps)]), (Selector.of({"app": a}),))
               for k, a in enumerate(apps)]
    return Policy(workloads=tuple(workloads), rulesets=tuple(per_app))


def test_two_hundred_workloads_and_a_hundred_rules_diff_in_seconds() -> None:
    old = estate(200, 100)
    rulesets = list(old.rulesets)
    rulesets[0] = replace(rulesets[0], rules=rulesets[0].rules[1:])
    wide = Rule("allow", (Actor("all_workloads"),), (Actor("labels", selector=Selector.of(
        {"role": "db"})),), ("tcp/5000-5100",), id="wide")
    new = replace(old, rulesets=(*rulesets, Ruleset("wide", (wide,))))
    start = time.perf_counter()
    d = diff(old, new)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, elapsed
    assert len(d.newly_allowed) > 1000
    start = time.perf_counter()
    assert diff(old, old).is_empty()
    assert time.perf_counter() - start < 5
