"""The evaluator is the oracle: compiled nftables and iptables rules, applied in real network
namespaces, let through exactly the connections the evaluator allows.

One lab is built per module; each check re-applies every host's firewall atomically (so the
update path is exercised too) and probes the whole matrix: TCP, UDP and ICMP echo, IPv4 and
IPv6, every served port and one beyond each range.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from bulkhead.domain.model import Policy
from bulkhead.lab.conformance import Conformance, Report, Scenario, with_enforcement
from bulkhead.lab.netns import HostSpec, NetnsLab
from bulkhead.policy.fileformat import loads_policy

pytestmark = pytest.mark.privileged

POLICY = """
version: 1
ip_lists:
  - {name: internet, cidrs: ["10.0.0.0/8", "fd00::/16"], exclude: ["10.0.0.0/12", "fd00::/20"]}
  - {name: admins, cidrs: ["10.9.0.0/24"]}
services:
  - {name: api, ports: ["tcp/8080-8081"]}
  - {name: mysql, ports: ["tcp/3306"], process: mysqld}
  - {name: web, ports: ["tcp/443", "icmp/8", "icmpv6/128"]}
workloads:
  - {name: web-1, ips: [10.1.0.11, "fd00:1::11"], labels: {role: web, app: shop, env: prod}, managed: true}
  - {name: web-2, ips: [10.1.0.12], labels: {role: web, app: shop, env: prod}, managed: true}
  - {name: api-1, ips: [10.1.0.21, "fd00:1::21"], labels: {role: api, app: shop, env: prod}, managed: true}
  - {name: db-1, ips: [10.1.0.31, "fd00:1::31"], labels: {role: db, app: shop, env: prod}, managed: true}
  - {name: db-2, ips: [10.1.0.32], labels: {role: db, app: shop, env: prod}, managed: true}
  - {name: web-dev, ips: [10.2.0.11], labels: {role: web, app: shop, env: dev}, managed: true}
  - {name: mon, ips: [10.3.0.5, "fd00:3::5"], labels: {role: monitor, app: ops, env: prod}}
rulesets:
  - name: shop
    scopes: [{app: shop, env: prod}, {app: shop, env: dev}]
    rules:
      - {id: web-api, action: allow, consumers: [{labels: {role: web}}], providers: [{labels: {role: api}}], services: [api]}
      - {id: api-db, action: allow, consumers: [{labels: {role: api}}], providers: [{labels: {role: db}}], services: [mysql, "udp/5353"]}
      - {id: internet-web, action: allow, consumers: [{ip_list: internet}], providers: [{labels: {role: web}}], services: [web]}
      - {id: admin-ssh, action: allow, consumers: [{ip_list: admins}], providers: [{all_workloads: true}], services: ["tcp/22"]}
      - {id: mon-scrape, action: allow, consumers: [{labels: {app: ops}}], providers: [{all_workloads: true}], services: ["tcp/9100"], extra_scope: true}
      - {id: web-db-dns, action: allow, consumers: [{labels: {role: web}}], providers: [{labels: {role: db}}], services: ["udp/5353"]}
  - name: guards
    rules:
      - {id: dev-fence, action: override_deny, consumers: [{labels: {env: dev}}], providers: [{labels: {env: prod}}], services: [any]}
      - {id: web-db-deny, action: deny, consumers: [{labels: {role: web}}], providers: [{labels: {role: db}}], services: [any]}
"""  # noqa: E501

EXTRA = (HostSpec("ext-a", "10.200.0.7", "fd00:f000::7"),  # in "internet"
         HostSpec("ext-b", "10.9.0.5"),                    # an admin, not "internet"
         HostSpec("cp", "10.250.0.1", "fd00:fa::1"))       # the control plane
SCENARIO = Scenario(loads_policy(POLICY), EXTRA, ("cp", 8443),
                    bound_hosts=frozenset({"db-1", "api-1"}))


@pytest.fixture(scope="module")
def conformance() -> Iterator[Conformance]:
    hosts = Conformance.hosts_of(SCENARIO)
    with NetnsLab(hosts, v4_net=SCENARIO.v4_net, v6_net=SCENARIO.v6_net) as lab:
        c = Conformance(lab, SCENARIO)
        c.serve()
        yield c


def unbound(policy: Policy) -> Policy:
    """The policy with process/unit bindings dropped (ports only)."""
    return replace(policy, services=tuple(replace(s, process=None, unit=None)
                                          for s in policy.services))


def check(c: Conformance, target: str, policy: Policy) -> Report:
    c.clear("iptables" if target == "nftables" else "nftables")
    if target == "iptables":
        # xt_cgroup cannot see the listener of a new inbound connection, so iptables cannot
        # enforce process-bound allows (they fail closed: test_iptables_process_binding_*);
        # the oracle comparison runs on the same policy with ports only.
        policy = unbound(policy)
    report = c.check(policy, target)
    assert report.ok, report.summary()
    return report


TARGETS = ["nftables", "iptables"]


@pytest.mark.parametrize("target", TARGETS)
def test_full_enforcement(conformance: Conformance, target: str) -> None:
    report = check(conformance, target, with_enforcement(SCENARIO.policy, "full"))
    seen = report.counts()
    for d in ("allowed", "allowed_across_boundary", "blocked_by_override_deny",
              "blocked_by_deny", "blocked_no_rule", "unknown"):
        assert seen.get(d), f"scenario never produced {d}: {seen}"
    by = {(o.probe.src, o.probe.dst, o.probe.port, o.probe.dst_ip): o for o in report.outcomes}
    if target == "nftables":
        # process binding: only the mysqld socket on a db host accepts api -> 3306
        assert by[("api-1", "db-1", 3306, "10.1.0.31")].result == "open"
        assert by[("api-1", "db-2", 3306, "10.1.0.32")].result == "timeout"
        assert by[("api-1", "db-1", 3306, "fd00:1::31")].result == "open"
    # IP list with exclusion: ext-a is "internet", ext-b (inside the exclusion) is not
    assert by[("ext-a", "web-1", 443, "10.1.0.11")].result == "open"
    assert by[("ext-b", "web-1", 443, "10.1.0.11")].result == "timeout"
    assert by[("ext-a", "web-1", 443, "fd00:1::11")].result == "open"
    # port range ends and just beyond
    assert by[("web-1", "api-1", 8081, "10.1.0.21")].result == "open"
    assert by[("web-1", "api-1", 8082, "10.1.0.21")].result == "timeout"
    # extra-scope consumer from outside the scope
    assert by[("mon", "db-2", 9100, "10.1.0.32")].result == "open"


@pytest.mark.parametrize("target", TARGETS)
def test_selective_enforcement(conformance: Conformance, target: str) -> None:
    report = check(conformance, target, with_enforcement(SCENARIO.policy, "selective"))
    seen = report.counts()
    assert seen.get("potentially_blocked_no_rule") and seen.get("blocked_by_override_deny")
    assert seen.get("blocked_by_deny")


@pytest.mark.parametrize("target", TARGETS)
def test_visibility_drops_nothing(conformance: Conformance, target: str) -> None:
    report = check(conformance, target, with_enforcement(SCENARIO.policy, "visibility"))
    assert all(o.result == "open" for o in report.outcomes)
    assert report.counts().get("potentially_blocked_by_override_deny")


@pytest.mark.parametrize("target", TARGETS)
def test_mixed_states_and_idle(conformance: Conformance, target: str) -> None:
    policy = with_enforcement(SCENARIO.policy, ["full", "idle", "selective", "visibility"])
    report = check(conformance, target, policy)
    assert len({o.decision.decision for o in report.outcomes}) >= 6


@pytest.mark.parametrize("target", TARGETS)
def test_outbound_allow(conformance: Conformance, target: str) -> None:
    base = with_enforcement(SCENARIO.policy, "full")
    policy = replace(base, settings=replace(base.settings, outbound="allow"))
    check(conformance, target, policy)


def test_iptables_process_binding_fails_closed(conformance: Conformance) -> None:
    """Documented limit: under iptables a process-bound allow admits nothing (never more)."""
    conformance.clear("nftables")
    policy = with_enforcement(SCENARIO.policy, "full")
    report = conformance.check(policy, "iptables")
    wrong = [o for o in report.disagreements
             if not (o.expected_open and o.result == "timeout" and o.probe.port == 3306
                     and o.probe.process == "mysqld")]
    assert not wrong, "\n".join(map(str, wrong))
    assert any(o.probe.process == "mysqld" and o.probe.src == "api-1"
               and o.result == "timeout" for o in report.outcomes)
