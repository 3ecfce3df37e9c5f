"""The compiler: per-workload rules, and incremental == naive after any update sequence."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.domain.model import Policy, Workload
from bulkhead.policy.compile import Compiler, compile_naive
from bulkhead.policy.fileformat import load_policy, loads_policy
from tests.strategies import policies

SHOP = Path(__file__).resolve().parents[2] / "examples" / "policies" / "shop.yaml"


def rules(cw_rules: tuple) -> list[tuple[str, str, list[str], list[str]]]:  # type: ignore[type-arg]
    return [(r.action, r.rule_id, r.peers.describe(), [str(s.spec) for s in r.services])
            for r in cw_rules]


def test_db_inbound_and_web_outbound() -> None:
    c = Compiler(load_policy(str(SHOP))).compiled
    assert rules(c["db-1"].inbound) == [
        ("allow", "api-db", ["10.0.1.20", "fd00:1::20"], ["tcp/3306"]),
        ("allow", "web-dev-db", [], ["tcp/3306"]),
        ("allow", "admin-ssh", ["10.9.0.0-10.9.0.255"], ["tcp/22"]),
        ("deny", "no-db-from-web", ["10.0.1.10", "10.0.1.11", "10.0.5.10", "fd00:1::10"],
         ["any"]),
    ]
    assert rules(c["web-1"].outbound) == [
        ("allow", "web-api", ["10.0.1.20", "fd00:1::20"], ["tcp/8080-8081"]),
        ("deny", "no-db-from-web", ["10.0.1.30", "10.0.5.30"], ["any"]),
    ]
    assert c["db-1"].inbound[0].services[0].process == "mysqld"
    assert c["db-1"].enforcement == "selective"


def test_ip_list_provider_narrows_to_local_addresses() -> None:
    p = loads_policy("""
ip_lists: [{name: dmz, cidrs: [10.1.0.0/24]}]
workloads:
  - {name: a, ips: [10.1.0.5, 10.2.0.5], managed: true}
  - {name: b, ips: [10.3.0.1], managed: true}
rulesets:
  - name: r
    rules: [{id: to-dmz, action: allow, consumers: [{workload: b}], providers: [{ip_list: dmz}],
             services: [tcp/80]}]
""")
    c = Compiler(p).compiled
    (rule,) = c["a"].inbound
    assert rule.local is not None and rule.local.describe() == ["10.1.0.5"]
    assert rule.peers.describe() == ["10.3.0.1"]
    (out,) = c["b"].outbound
    assert out.peers.describe() == ["10.1.0.0-10.1.0.255"] and out.local is None


def test_user_group_rules_go_outbound_on_every_host() -> None:
    p = loads_policy("""
user_groups: [{name: fin, members: [alice]}]
workloads:
  - {name: ledger, ips: [10.0.0.1], labels: {app: ledger}, managed: true}
  - {name: desk, ips: [10.0.0.2], managed: true}
rulesets:
  - name: r
    rules: [{id: fin, action: allow, consumers: [{user_group: fin}],
             providers: [{labels: {app: ledger}}], services: [tcp/443]}]
""")
    c = Compiler(p).compiled
    (out,) = c["desk"].outbound
    assert out.users == frozenset({"alice"}) and out.peers.describe() == ["10.0.0.1"]
    assert c["ledger"].inbound[0].peers.describe() == []


def test_full_compiler_equals_naive_on_examples() -> None:
    for path in sorted(SHOP.parent.glob("*.yaml")):
        p = load_policy(str(path))
        assert Compiler(p).compiled == compile_naive(p), path.name


def _mutate(rng: random.Random, p: Policy, w: Workload) -> Workload:
    keys = {"role": ["web", "api", "db", "payment", "jump"], "app": ["shop", "pay", "ops"],
            "env": ["prod", "dev", "staging"], "loc": ["eu", "us"]}
    labels = w.label_dict
    k = rng.choice(sorted(keys))
    if rng.random() < 0.2:
        labels.pop(k, None)
    else:
        labels[k] = rng.choice(keys[k])
    ips = w.ips
    if rng.random() < 0.3:
        ips = (f"10.0.{rng.randrange(1, 9)}.{rng.randrange(100, 250)}",)
    used = {ip for x in p.workloads if x.name != w.name for ip in x.ips}
    ips = tuple(ip for ip in ips if ip not in used)
    return replace(w, labels=tuple(sorted(labels.items())), ips=ips)


@pytest.mark.parametrize("seed", range(12))
def test_incremental_equals_naive_after_random_updates(seed: int) -> None:
    rng = random.Random(seed)
    policy = load_policy(str(SHOP))
    compiler = Compiler(policy)
    current = {w.name: w for w in policy.workloads}
    for step in range(25):
        before = dict(compiler.compiled)
        r = rng.random()
        if r < 0.15 and len(current) > 2:
            name = rng.choice(sorted(current))
            del current[name]
            changed = compiler.remove_workload(name)
        else:
            if r < 0.3:
                base = Workload(f"new-{step}", (), ())
            else:
                base = current[rng.choice(sorted(current))]
            snapshot = replace(policy, workloads=tuple(current.values()))
            w = _mutate(rng, snapshot, base)
            current[w.name] = w
            changed = compiler.update_workload(w)
        expected = compile_naive(replace(policy, workloads=tuple(current.values())))
        assert compiler.compiled == expected, f"seed {seed} step {step}"
        assert changed == {n for n in expected if before.get(n) != expected[n]}


def test_update_reports_only_affected_workloads() -> None:
    p = load_policy(str(SHOP))
    compiler = Compiler(p)
    before = dict(compiler.compiled)
    w = p.workload("web-dev")
    assert w is not None
    changed = compiler.update_workload(replace(w, enforcement="full"))
    assert changed == {"web-dev"}
    assert {n for n in before if before[n] != compiler.compiled[n]} == changed
    assert compiler.update_workload(replace(w, enforcement="full")) == set()


@st.composite
def _update_plan(draw: st.DrawFn) -> tuple[Policy, list[tuple[str, Workload | str]]]:
    policy = draw(policies(max_workloads=7, max_rulesets=3, max_rules=4))
    steps: list[tuple[str, Workload | str]] = []
    current = {w.name: w for w in policy.workloads}
    value_pool = {k: sorted({v for w in policy.workloads for kk, v in w.labels if kk == k}
                            | {"x"}) for k in policy.label_keys}
    for n in range(draw(st.integers(1, 6))):
        names = sorted(current)
        if names and draw(st.booleans()) and len(names) > 1 and draw(st.booleans()):
            name = draw(st.sampled_from(names))
            del current[name]
            steps.append(("remove", name))
            continue
        base = current[draw(st.sampled_from(names))] if names and draw(st.booleans()) else (
            Workload(f"added-{n}", ()))
        labels = dict(base.labels)
        key = draw(st.sampled_from(list(policy.label_keys)))
        if draw(st.booleans()):
            labels[key] = draw(st.sampled_from(value_pool[key]))
        else:
            labels.pop(key, None)
        used = {ip for w in current.values() if w.name != base.name for ip in w.ips}
        ips = base.ips
        if draw(st.booleans()):
            ips = tuple(ip for ip in (f"10.0.9.{n + 1}", *base.ips[:1]) if ip not in used)
        w = replace(base, labels=tuple(sorted(labels.items())), ips=ips,
                    enforcement=draw(st.sampled_from(["full", "visibility"])))
        current[w.name] = w
        steps.append(("update", w))
    return policy, steps


@settings(max_examples=120, deadline=None)
@given(_update_plan())
def test_property_incremental_equals_naive(plan: tuple[Policy, list[tuple[str, object]]]
                                           ) -> None:
    policy, steps = plan
    compiler = Compiler(policy)
    assert compiler.compiled == compile_naive(policy)
    current = {w.name: w for w in policy.workloads}
    for kind, arg in steps:
        before = dict(compiler.compiled)
        if kind == "remove":
            assert isinstance(arg, str)
            del current[arg]
            changed = compiler.remove_workload(arg)
        else:
            assert isinstance(arg, Workload)
            current[arg.name] = arg
            changed = compiler.update_workload(arg)
        expected = compile_naive(replace(policy, workloads=tuple(current.values())))
        assert compiler.compiled == expected
        assert changed == {n for n in expected if before.get(n) != expected[n]}
