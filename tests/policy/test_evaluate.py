"""The reference evaluator against docs/policy-semantics.md, one clause at a time.

Each test builds a tiny policy through the file format and checks `Evaluator.decide` on flows
chosen to tell the clause apart from its plausible misreadings.
"""

from __future__ import annotations

from typing import Any

import pytest

from bulkhead.domain.model import Policy
from bulkhead.domain.ports import PortSpec
from bulkhead.policy.evaluate import Decision, Evaluator, Flow
from bulkhead.policy.fileformat import policy_from_data


def wl(name: str, ip: str | list[str], *, managed: bool = True, enforcement: str = "full",
       **labels: str) -> dict[str, Any]:
    return {"name": name, "ips": [ip] if isinstance(ip, str) else ip, "labels": labels,
            "managed": managed, "enforcement": enforcement}


def rule(action: str, consumers: list[dict[str, Any]], providers: list[dict[str, Any]],
         services: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"action": action, "consumers": consumers, "providers": providers,
            "services": services or ["tcp/80"], **extra}


def make(workloads: list[dict[str, Any]], rulesets: list[dict[str, Any]],
         **extra: Any) -> Policy:
    return policy_from_data({"version": 1, "workloads": workloads, "rulesets": rulesets,
                             **extra})


def decide(policy: Policy, src: str, dst: str, port: str = "tcp/80", **kw: Any) -> Decision:
    spec = PortSpec.parse(port)
    assert spec.proto is not None
    return Evaluator(policy).decide(Flow(src, dst, spec.proto, spec.lo, **kw))


def labels(**sel: Any) -> dict[str, Any]:
    return {"labels": sel}


# Two apps, each with a web and an api workload, all managed in full enforcement.
TWO_APPS = [
    wl("a-web", "10.0.0.1", role="web", app="a", env="prod"),
    wl("a-api", "10.0.0.2", role="api", app="a", env="prod"),
    wl("b-web", "10.0.0.3", role="web", app="b", env="prod"),
    wl("b-api", "10.0.0.4", role="api", app="b", env="dev"),
]


# -- §2 scope -------------------------------------------------------------------------------

def test_scope_instantiates_each_rule_once_per_scope() -> None:
    p = make(TWO_APPS, [{"name": "apps", "scopes": [{"app": "a"}, {"app": "b"}], "rules": [
        rule("allow", [labels(role="web")], [labels(role="api")], id="web-api")]}])
    # inside each scope
    assert decide(p, "10.0.0.1", "10.0.0.2") == Decision("allowed", "provider", ("web-api",))
    assert decide(p, "10.0.0.3", "10.0.0.4") == Decision("allowed", "provider", ("web-api",))
    # across scopes: consumer from scope a, provider from scope b
    assert decide(p, "10.0.0.1", "10.0.0.4") == Decision("blocked_no_rule", "provider", ())


def test_global_ruleset_is_unrestricted() -> None:
    p = make(TWO_APPS, [{"name": "g", "rules": [
        rule("allow", [labels(role="web")], [labels(role="api")], id="web-api")]}])
    assert decide(p, "10.0.0.1", "10.0.0.4").decision == "allowed"


def test_scope_restricts_workload_and_all_workloads_actors() -> None:
    p = make(TWO_APPS, [{"name": "a", "scopes": [{"app": "a"}], "rules": [
        rule("allow", [{"all_workloads": True}], [{"workload": "b-api"}], id="to-b-api"),
        rule("allow", [{"all_workloads": True}], [{"workload": "a-api"}], id="to-a-api")]}])
    # b-api is named but outside the scope: the actor never matches it
    assert decide(p, "10.0.0.1", "10.0.0.4").decision == "blocked_no_rule"
    assert decide(p, "10.0.0.1", "10.0.0.2").rules == ("to-a-api",)
    # all_workloads in scope = the scope: b-web is not a consumer
    assert decide(p, "10.0.0.3", "10.0.0.2").decision == "blocked_no_rule"


def test_extra_scope_frees_the_consumers_only() -> None:
    rs = [{"name": "a", "scopes": [{"app": "a"}], "rules": [
        rule("allow", [labels(role="web")], [labels(role="api")], id="in-scope"),
        rule("allow", [labels(role="web")], [labels(role="api")], ["tcp/81"], id="extra",
             extra_scope=True)]}]
    p = make(TWO_APPS, rs)
    # b-web -> a-api: only the extra_scope rule admits a consumer outside the scope
    assert decide(p, "10.0.0.3", "10.0.0.2", "tcp/80").decision == "blocked_no_rule"
    assert decide(p, "10.0.0.3", "10.0.0.2", "tcp/81") == Decision(
        "allowed", "provider", ("extra",))
    # providers stay in scope: a-web -> b-api is not admitted even with extra_scope
    assert decide(p, "10.0.0.1", "10.0.0.4", "tcp/81").decision == "blocked_no_rule"


def test_ip_list_actors_ignore_scope_and_match_by_address() -> None:
    p = make(TWO_APPS, [{"name": "a", "scopes": [{"app": "a"}], "rules": [
        rule("allow", [{"ip_list": "lan"}], [labels(role="api")], id="lan-api"),
        rule("allow", [labels(role="web")], [{"ip_list": "lan"}], ["tcp/81"], id="web-lan")]}],
        ip_lists=[{"name": "lan", "cidrs": ["10.0.0.0/29"]}])
    # b-web (outside the scope, and a workload) is in the list: it matches by address
    assert decide(p, "10.0.0.3", "10.0.0.2").rules == ("lan-api",)
    # an external address in the list matches too
    assert decide(p, "10.0.0.6", "10.0.0.2").decision == "allowed"
    # as a provider: b-api is outside the scope but inside the list
    assert decide(p, "10.0.0.1", "10.0.0.4", "tcp/81") == Decision(
        "allowed", "provider", ("web-lan",))
    # the provider side stays in scope for label actors
    assert decide(p, "10.0.0.3", "10.0.0.4").decision == "blocked_no_rule"


def test_user_groups_match_the_user_and_ignore_scope() -> None:
    wls = [*TWO_APPS, wl("ext-api", "10.0.0.5", managed=False, role="api", app="a")]
    p = make(wls, [{"name": "a", "scopes": [{"app": "a"}], "rules": [
        rule("allow", [{"user_group": "ops"}], [labels(role="api")], ["tcp/22"], id="ops")]}],
        user_groups=[{"name": "ops", "members": ["alice"]}])
    # b-web is outside the scope; alice behind it is still a consumer (the provider, ext-api, is
    # unmanaged: the consumer side decides)
    assert decide(p, "10.0.0.3", "10.0.0.5", "tcp/22", user="alice") == Decision(
        "allowed", "consumer", ("ops",))
    assert decide(p, "10.0.0.3", "10.0.0.5", "tcp/22", user="bob") == Decision(
        "blocked_no_rule", "consumer", ())
    assert decide(p, "10.0.0.3", "10.0.0.5", "tcp/22").decision == "blocked_no_rule"
    # from an external address too (no side can see the user: unknown, but the rule matches)
    assert decide(p, "192.0.2.1", "10.0.0.5", "tcp/22", user="alice") == Decision(
        "unknown", "", ("ops",))


def test_user_group_match_is_seen_by_the_consumer_host_only() -> None:
    """docs/policy-format.md: a firewall sees users only on the consumer host. The provider
    side decides without the user-group match; the rule is still reported."""
    p = make(TWO_APPS, [{"name": "g", "rules": [
        rule("allow", [{"user_group": "ops"}], [labels(role="api")], ["tcp/22"], id="ops"),
        rule("allow", [labels(role="web")], [labels(app="b")], ["tcp/22"], id="addr")]}],
        user_groups=[{"name": "ops", "members": ["alice"]}])
    # a-web -> a-api (managed, full): the consumer side allows, the provider side cannot
    assert decide(p, "10.0.0.1", "10.0.0.2", "tcp/22", user="alice") == Decision(
        "blocked_no_rule", "provider", ("ops",))
    # an address-based rule lets the provider allow it as well
    assert decide(p, "10.0.0.1", "10.0.0.4", "tcp/22", user="alice") == Decision(
        "allowed", "provider", ("ops", "addr"))


def test_user_group_match_is_seen_on_the_consumer_side_only() -> None:
    """docs/policy-semantics.md §3.3: a user-group match is visible to the consumer's host
    only; the provider side decides without it."""
    p = make(TWO_APPS, [{"name": "g", "rules": [
        rule("allow", [{"user_group": "ops"}], [labels(role="api")], ["tcp/22"], id="ops")]}],
        user_groups=[{"name": "ops", "members": ["alice"]}])
    d = decide(p, "10.0.0.1", "10.0.0.2", "tcp/22", user="alice")
    assert d.rules == ("ops",) and d.side == "provider" and d.decision.endswith("no_rule")


# -- §1 selectors and label groups ------------------------------------------------------------

def test_selector_keys_and_values() -> None:
    p = make(TWO_APPS, [{"name": "g", "rules": [
        rule("allow", [labels(role="web", app=["a", "b"])], [labels(env="prod", role="api")],
             id="r"),
        rule("allow", [labels()], [labels(app="b")], ["tcp/81"], id="empty-selector")]}])
    assert decide(p, "10.0.0.3", "10.0.0.2").decision == "allowed"  # list = OR
    assert decide(p, "10.0.0.3", "10.0.0.4").decision == "blocked_no_rule"  # keys ANDed
    assert decide(p, "10.0.0.2", "10.0.0.4", "tcp/81").decision == "allowed"  # {} = everything
    # no workload: an external address is never matched by labels, even by {}
    assert decide(p, "192.0.2.1", "10.0.0.4", "tcp/81").decision == "blocked_no_rule"


def test_label_groups_including_nested_groups() -> None:
    wls = [wl("c", "10.0.0.1", env="dev"), wl("p", "10.0.0.2", env="prod"),
           wl("s", "10.0.0.3", env="staging"), wl("q", "10.0.0.4", env="qa"),
           wl("dst", "10.0.0.9", role="api")]
    groups = [{"name": "prod-like", "key": "env", "values": ["prod", "staging"]},
              {"name": "not-dev", "key": "env", "values": ["qa"], "groups": ["prod-like"]}]
    p = make(wls, [{"name": "g", "rules": [
        rule("allow", [labels(env={"group": "not-dev"})], [labels(role="api")], id="r")]}],
        label_groups=groups)
    got = {src: decide(p, src, "10.0.0.9").decision
           for src in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4")}
    assert got == {"10.0.0.1": "blocked_no_rule", "10.0.0.2": "allowed",
                   "10.0.0.3": "allowed", "10.0.0.4": "allowed"}


# -- §3 precedence ------------------------------------------------------------------------------

@pytest.mark.parametrize(("actions", "want"), [
    ((), "blocked_no_rule"),
    (("deny",), "blocked_by_deny"),
    (("allow",), "allowed"),
    (("allow", "deny"), "allowed_across_boundary"),
    (("deny", "allow"), "allowed_across_boundary"),
    (("override_deny",), "blocked_by_override_deny"),
    (("allow", "override_deny"), "blocked_by_override_deny"),
    (("override_deny", "allow", "deny"), "blocked_by_override_deny"),
])
def test_precedence_is_order_free(actions: tuple[str, ...], want: str) -> None:
    rules = [rule(a, [{"all_workloads": True}], [{"all_workloads": True}], id=f"r{i}")
             for i, a in enumerate(actions)]
    p = make(TWO_APPS, [{"name": "g", "rules": rules}])
    d = decide(p, "10.0.0.1", "10.0.0.2")
    assert d.decision == want
    assert d.side == "provider"
    assert d.rules == tuple(f"r{i}" for i in range(len(actions)))  # every matching rule


def test_rules_are_reported_once_in_policy_order() -> None:
    p = make(TWO_APPS, [
        {"name": "s", "scopes": [{"env": "prod"}, {"app": "a"}], "rules": [
            rule("deny", [labels(role="web")], [labels(role="api")], id="twice")]},
        {"name": "g", "rules": [rule("allow", [{"all_workloads": True}],
                                    [{"all_workloads": True}])]}])
    # a-web -> a-api matches both scope instances of "twice"; the default id is ruleset/index
    assert decide(p, "10.0.0.1", "10.0.0.2").rules == ("twice", "g/0")


# -- §3.4 enforcement states --------------------------------------------------------------------

@pytest.mark.parametrize(("enforcement", "raw", "want"), [
    ("full", "allowed", "allowed"),
    ("full", "blocked_by_override_deny", "blocked_by_override_deny"),
    ("full", "blocked_by_deny", "blocked_by_deny"),
    ("full", "blocked_no_rule", "blocked_no_rule"),
    ("selective", "allowed_across_boundary", "allowed_across_boundary"),
    ("selective", "blocked_by_override_deny", "blocked_by_override_deny"),
    ("selective", "blocked_by_deny", "blocked_by_deny"),
    ("selective", "blocked_no_rule", "potentially_blocked_no_rule"),
    ("visibility", "allowed", "allowed"),
    ("visibility", "blocked_by_override_deny", "potentially_blocked_by_override_deny"),
    ("visibility", "blocked_by_deny", "potentially_blocked_by_deny"),
    ("visibility", "blocked_no_rule", "potentially_blocked_no_rule"),
    ("idle", "allowed_across_boundary", "allowed_across_boundary"),
    ("idle", "blocked_by_override_deny", "potentially_blocked_by_override_deny"),
    ("idle", "blocked_by_deny", "potentially_blocked_by_deny"),
    ("idle", "blocked_no_rule", "potentially_blocked_no_rule"),
])
def test_enforcement_state_softens_the_verdict(enforcement: str, raw: str, want: str) -> None:
    actions = {"allowed": ["allow"], "allowed_across_boundary": ["allow", "deny"],
               "blocked_by_override_deny": ["override_deny", "allow"],
               "blocked_by_deny": ["deny"], "blocked_no_rule": []}[raw]
    rules = [rule(a, [{"all_workloads": True}], [{"all_workloads": True}]) for a in actions]
    # the consumer is unmanaged, so only the provider side decides
    p = make([wl("src", "10.0.0.1", managed=False),
              wl("dst", "10.0.0.2", enforcement=enforcement)], [{"name": "g", "rules": rules}])
    assert decide(p, "10.0.0.1", "10.0.0.2") == Decision(
        want, "provider", tuple(f"g/{i}" for i in range(len(actions))))


# -- §3.3 outbound, §3.5 combination ----------------------------------------------------------

def test_outbound_enforce_decides_like_the_provider_side() -> None:
    wls = [wl("src", "10.0.0.1"), wl("dst", "10.0.0.2", managed=False)]
    deny = [rule("deny", [{"all_workloads": True}], [{"all_workloads": True}], id="d")]
    enforce = make(wls, [{"name": "g", "rules": deny}])
    assert decide(enforce, "10.0.0.1", "10.0.0.2") == Decision(
        "blocked_by_deny", "consumer", ("d",))
    assert decide(enforce, "10.0.0.1", "192.0.2.1") == Decision(
        "blocked_no_rule", "consumer", ())


def test_outbound_allow_always_allows_on_the_consumer_side() -> None:
    wls = [wl("src", "10.0.0.1"), wl("dst", "10.0.0.2", managed=False),
           wl("soft", "10.0.0.3", enforcement="visibility")]
    fence = [rule("override_deny", [{"all_workloads": True}], [{"all_workloads": True}],
                  id="fence")]
    p = make(wls, [{"name": "g", "rules": fence}], settings={"outbound": "allow"})
    # the consumer side alone: allowed, whatever matched
    assert decide(p, "10.0.0.1", "10.0.0.2") == Decision("allowed", "consumer", ("fence",))
    assert decide(p, "10.0.0.1", "192.0.2.1") == Decision("allowed", "consumer", ())
    # the provider side still decides inbound
    assert decide(p, "10.0.0.3", "10.0.0.1") == Decision(
        "blocked_by_override_deny", "provider", ("fence",))
    # worst side: the provider's potentially_blocked beats the consumer's allowed
    assert decide(p, "10.0.0.1", "10.0.0.3").decision == "potentially_blocked_by_override_deny"


@pytest.mark.parametrize(("provider", "consumer", "want"), [
    ("full", "full", ("blocked_no_rule", "provider")),  # tie: the provider side is named
    ("visibility", "full", ("blocked_no_rule", "consumer")),
    ("full", "visibility", ("blocked_no_rule", "provider")),
    ("selective", "idle", ("potentially_blocked_no_rule", "provider")),
    ("idle", "selective", ("potentially_blocked_no_rule", "provider")),
    ("visibility", "visibility", ("potentially_blocked_no_rule", "provider")),
])
def test_worst_side_wins_and_is_named(provider: str, consumer: str,
                                      want: tuple[str, str]) -> None:
    p = make([wl("src", "10.0.0.1", enforcement=consumer),
              wl("dst", "10.0.0.2", enforcement=provider)], [])
    d = decide(p, "10.0.0.1", "10.0.0.2")
    assert (d.decision, d.side) == want


def test_across_boundary_is_worse_than_allowed() -> None:
    # The provider sees allow+deny; with outbound allow the consumer says allowed.
    p = make([wl("src", "10.0.0.1"), wl("dst", "10.0.0.2")], [{"name": "g", "rules": [
        rule("allow", [{"all_workloads": True}], [{"all_workloads": True}]),
        rule("deny", [{"all_workloads": True}], [{"all_workloads": True}])]}],
        settings={"outbound": "allow"})
    d = decide(p, "10.0.0.1", "10.0.0.2")
    assert (d.decision, d.side) == ("allowed_across_boundary", "provider")


def test_unknown_when_neither_end_has_a_side() -> None:
    p = make([wl("u1", "10.0.0.1", managed=False), wl("u2", "10.0.0.2", managed=False)],
             [{"name": "g", "rules": [
                 rule("allow", [{"all_workloads": True}], [{"all_workloads": True}], id="a")]}])
    # the rules still match and are reported; there is just nobody to enforce them
    assert decide(p, "10.0.0.1", "10.0.0.2") == Decision("unknown", "", ("a",))
    assert decide(p, "192.0.2.1", "198.51.100.1") == Decision("unknown", "", ())
    assert decide(p, "10.0.0.1", "198.51.100.1") == Decision("unknown", "", ())


def test_external_ends() -> None:
    p = make([wl("web", ["10.0.0.1", "2001:db8::1"], role="web")], [{"name": "g", "rules": [
        rule("allow", [{"ip_list": "internet"}], [labels(role="web")], ["tcp/443"], id="in"),
        rule("allow", [labels(role="web")], [{"ip_list": "internet"}], ["tcp/443"], id="out"),
    ]}], ip_lists=[{"name": "internet", "cidrs": ["0.0.0.0/0", "::/0"],
                    "exclude": ["10.0.0.0/8", "2001:db8::/64"]}])
    # external -> workload: the provider side decides
    assert decide(p, "192.0.2.1", "10.0.0.1", "tcp/443") == Decision(
        "allowed", "provider", ("in",))
    assert decide(p, "2001:db8:1::5", "2001:db8::1", "tcp/443") == Decision(
        "allowed", "provider", ("in",))
    # excluded from the list: an external address with no rule
    assert decide(p, "10.1.1.1", "10.0.0.1", "tcp/443") == Decision(
        "blocked_no_rule", "provider", ())
    assert decide(p, "2001:db8::7", "2001:db8::1", "tcp/443").decision == "blocked_no_rule"
    # workload -> external: the consumer side decides
    assert decide(p, "10.0.0.1", "192.0.2.1", "tcp/443") == Decision(
        "allowed", "consumer", ("out",))
    assert decide(p, "10.0.0.1", "192.0.2.1", "tcp/80") == Decision(
        "blocked_no_rule", "consumer", ())


# -- §3.2 services -------------------------------------------------------------------------------

def test_services_ports_ranges_icmp_and_any() -> None:
    p = make([wl("a", "10.0.0.1"), wl("b", "10.0.0.2")], [{"name": "g", "rules": [
        rule("allow", [{"all_workloads": True}], [{"all_workloads": True}],
             ["web", "icmp/8", "udp"], id="svc"),
        rule("deny", [{"all_workloads": True}], [{"all_workloads": True}], ["any"], id="any"),
    ]}], services=[{"name": "web", "ports": ["tcp/443", "tcp/8000-8099"]}])

    def d(port: str) -> str:
        return decide(p, "10.0.0.1", "10.0.0.2", port).decision

    assert d("tcp/443") == d("tcp/8000") == d("tcp/8099") == "allowed_across_boundary"
    assert d("tcp/7999") == d("tcp/8100") == d("tcp/80") == "blocked_by_deny"
    assert d("icmp/8") == "allowed_across_boundary"
    assert d("icmp/0") == "blocked_by_deny"  # the ICMP type is the port
    assert d("udp/1") == d("udp/65535") == "allowed_across_boundary"  # udp = every udp port
    assert d("gre") == "blocked_by_deny"  # any matches other protocols too


def test_process_and_unit_bound_services() -> None:
    p = make([wl("a", "10.0.0.1"), wl("db", "10.0.0.2")], [{"name": "g", "rules": [
        rule("allow", [{"all_workloads": True}], [{"all_workloads": True}], ["mysql"], id="m"),
        rule("allow", [{"all_workloads": True}], [{"all_workloads": True}], ["pg"], id="p"),
    ]}], services=[{"name": "mysql", "ports": ["tcp/3306"], "process": "mysqld"},
                   {"name": "pg", "ports": ["tcp/5432"], "unit": "postgresql.service"}])

    def d(port: str, **kw: Any) -> str:
        return decide(p, "10.0.0.1", "10.0.0.2", port, **kw).decision

    assert d("tcp/3306", process="mysqld") == "allowed"
    assert d("tcp/3306", process="/usr/sbin/mysqld") == "allowed"  # the executable's name
    assert d("tcp/3306", process="C:\\mysql\\bin\\mysqld") == "allowed"
    assert d("tcp/3306", process="mariadbd") == "blocked_no_rule"
    assert d("tcp/3306") == "blocked_no_rule"  # no process known: a bound service does not match
    assert d("tcp/3307", process="mysqld") == "blocked_no_rule"
    assert d("tcp/5432", unit="postgresql.service") == "allowed"
    assert d("tcp/5432", unit="postgresql@15.service") == "blocked_no_rule"
    assert d("tcp/5432") == "blocked_no_rule"


def test_disabled_ruleset_matches_nothing() -> None:
    rs: list[dict[str, Any]] = [
        {"name": "off", "enabled": False, "rules": [
            rule("override_deny", [{"all_workloads": True}], [{"all_workloads": True}], id="x")]},
        {"name": "on", "rules": [
            rule("allow", [{"all_workloads": True}], [{"all_workloads": True}], id="y")]}]
    p = make(TWO_APPS, rs)
    assert decide(p, "10.0.0.1", "10.0.0.2") == Decision("allowed", "provider", ("y",))


def test_addresses_resolve_in_any_spelling() -> None:
    p = make([wl("v6", "2001:db8::10"), wl("v4", "10.0.0.1")], [{"name": "g", "rules": [
        rule("allow", [{"all_workloads": True}], [{"all_workloads": True}], id="a")]}])
    assert decide(p, "10.0.0.1", "2001:DB8:0:0:0:0:0:10") == Decision(
        "allowed", "provider", ("a",))
