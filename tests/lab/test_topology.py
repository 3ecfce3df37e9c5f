"""The topology loader: resolution, allocation, and every error kind with its path and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bulkhead.domain.errors import PolicyError
from bulkhead.lab.topology import Topology, load_topology, loads_topology, parse_duration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "topologies"

BASE = """\
version: 1
name: t
network: 10.50.0.0/24
hosts:
  - name: web-1
    labels: {role: web, app: shop}
    serve: [tcp/443, {port: tcp/3306, process: mysqld, unit: mysql.service}]
  - name: web-2
    replicas_of: web-1
  - name: api-1
    labels: {role: api, app: shop}
    serve: [tcp/8080]
    enforcement: full
  - name: dns
    labels: {role: dns}
    serve: [udp/53]
    managed: false
traffic:
  - {from: {role: web}, to: {role: api}, port: tcp/8080, every: 2s}
  - {from: web-1, to: "external:203.0.113.10", port: tcp/443, every: 500ms}
noise:
  - {from: {}, to: {role: dns}, port: udp/53, every: 1m}
attacks:
  - {name: lateral, from: web-1, probe: {to: {}, ports: [tcp/22, tcp/3306, icmp]}}
"""


def load(text: str) -> Topology:
    return loads_topology(textwrap.dedent(text), source="t.yaml")


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(text)
    return [str(i) for i in info.value.issues]


def test_resolves_replicas_addresses_selectors_and_durations() -> None:
    t = load(BASE)
    assert [h.name for h in t.hosts] == ["web-1", "web-2", "api-1", "dns"]
    assert [h.ip for h in t.hosts] == ["10.50.0.2", "10.50.0.3", "10.50.0.4", "10.50.0.5"]
    assert (t.gateway_ip, t.internet_ip) == ("10.50.0.1", "10.50.0.254")
    web2 = t.host("web-2")
    assert web2.labels == t.host("web-1").labels and web2.serve == t.host("web-1").serve
    assert web2.replicas_of == "web-1"
    mysql = t.host("web-1").serving("tcp", 3306)
    assert mysql is not None and mysql.process == "mysqld" and mysql.unit == "mysql.service"
    assert t.traffic[0].sources == ("web-1", "web-2") and t.traffic[0].targets == ("api-1",)
    assert t.traffic[1].external == "203.0.113.10" and t.traffic[1].every_s == 0.5
    assert t.noise[0].sources == ("web-1", "web-2", "api-1", "dns")
    assert t.noise[0].targets_for("dns") == () and t.noise[0].every_s == 60.0
    assert t.attacks[0].ports == (("tcp", 22), ("tcp", 3306), ("icmp", 0))
    assert t.externals == ("203.0.113.10",)


def test_to_policy_and_labels_csv() -> None:
    t = load(BASE)
    p = t.to_policy()
    assert p.rulesets == ()
    w = {w.name: w for w in p.workloads}
    assert w["api-1"].ips == ("10.50.0.4",) and w["api-1"].enforcement == "full"
    assert w["dns"].managed is False and w["web-1"].managed is True
    assert w["web-1"].label_dict == {"role": "web", "app": "shop"}
    assert all(not x.labels for x in t.to_policy(labels=False).workloads)
    lines = t.labels_csv().splitlines()
    assert lines[0] == "name,role,app,env,loc"
    assert lines[1] == "web-1,web,shop,,"


def test_explicit_address_is_kept_and_skipped_by_allocation() -> None:
    t = load(BASE.replace("    replicas_of: web-1", "    replicas_of: web-1\n"
                                                   "    address: 10.50.0.2"))
    assert t.host("web-2").ip == "10.50.0.2" and t.host("web-1").ip == "10.50.0.3"


def test_extra_label_keys_are_collected() -> None:
    t = load(BASE.replace("{role: dns}", "{role: dns, zone: core}"))
    assert t.label_keys[-1] == "zone" and "zone" in t.to_policy().label_keys


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("    enforcement: full", "    enforcment: full",
     "t.yaml:13: hosts[2].enforcment: unknown key 'enforcment'"),
    ("    enforcement: full", "    enforcement: strict",
     "t.yaml:13: hosts[2].enforcement: expected one of"),
    ("replicas_of: web-1", "replicas_of: web-9",
     "t.yaml:9: hosts[1].replicas_of: no host 'web-9' defined before this one"),
    ("to: {role: api}", "to: api-9", "t.yaml:19: traffic[0].to: unknown host 'api-9'"),
    ("to: {role: api}", "to: {role: nope}",
     "t.yaml:19: traffic[0].to: selector {'role': 'nope'} matches no host"),
    ("to: {role: api}", "to: {tier: api}",
     "t.yaml:19: traffic[0].to.tier: label key 'tier' is not used by any host"),
    ("to: {role: api}", "to: {role: []}",
     "t.yaml:19: traffic[0].to.role: an empty list of values matches nothing"),
    ("port: tcp/8080, every: 2s", "port: tcp/8081, every: 2s",
     "t.yaml:19: traffic[0].port: tcp/8081 is not served by api-1"),
    ("port: tcp/8080, every: 2s", "port: tcp/99999, every: 2s",
     "t.yaml:19: traffic[0].port: invalid port 'tcp/99999'"),
    ("every: 500ms", "every: 5 parsecs", "t.yaml:20: traffic[1].every: bad duration"),
    ("every: 500ms", "every: 1ms", "t.yaml:20: traffic[1].every: duration '1ms' is below"),
    ('"external:203.0.113.10"', '"external:10.50.0.9"',
     "t.yaml:20: traffic[1].to: external address 10.50.0.9 is inside the lab network"),
    ('"external:203.0.113.10"', '"external:nowhere"',
     "t.yaml:20: traffic[1].to: invalid external address 'nowhere'"),
    ("{from: web-1, to:", '{from: "external:1.2.3.4", to:',
     "t.yaml:20: traffic[1].from: an external address cannot be a source"),
    ("ports: [tcp/22, tcp/3306, icmp]", "ports: [tcp/22, sctp/9]",
     "t.yaml:24: attacks[0].probe.ports[1]: invalid port 'sctp/9'"),
    ("{name: lateral,", "{name: lateral, colour: red,",
     "t.yaml:24: attacks[0].colour: unknown key 'colour'"),
    ("serve: [udp/53]", "serve: [udp/53, udp/53]",
     "t.yaml:16: hosts[3].serve[1]: udp/53 is served twice"),
    ("process: mysqld,", "process: 'my sqld',",
     "t.yaml:7: hosts[0].serve[1].process: invalid process name 'my sqld'"),
    ("unit: mysql.service", "unit: mysql",
     "t.yaml:7: hosts[0].serve[1].unit: invalid unit"),
    ("managed: false", "managed: maybe", "t.yaml:17: hosts[3].managed: expected true or false"),
    ("  - name: dns", "  - name: web-1", "t.yaml:14: hosts[3].name: duplicate host name 'web-1'"),
    ("  - name: dns", "  - name: internet", "t.yaml:14: hosts[3].name: host name 'internet' is"),
    ("network: 10.50.0.0/24", "network: 10.50.0.1/24", "t.yaml:3: network: invalid IPv4"),
    ("version: 1", "version: 2", "t.yaml:1: version: unsupported version 2"),
    ("  - {from: {}, to: {role: dns}, port: udp/53, every: 1m}",
     "  - {from: dns, to: {role: dns}, port: udp/53, every: 1m}",
     "t.yaml:22: noise[0].to: every source would only connect to itself"),
])
def test_errors_name_line_and_path(old: str, new: str, expected: str) -> None:
    assert old in BASE
    found = errors(BASE.replace(old, new, 1))
    assert any(e.startswith(expected) for e in found), found


def test_all_errors_reported_at_once_and_missing_keys() -> None:
    found = errors(BASE.replace("port: tcp/8080, every: 2s", "every: 2s")
                   .replace("to: api-9", "").replace("replicas_of: web-1", "replicas_of: x"))
    assert any("traffic[0]: missing required key 'port'" in e for e in found)
    assert any("hosts[1].replicas_of" in e for e in found)


def test_network_exhaustion_and_bad_address() -> None:
    text = "network: 10.1.0.0/28\nhosts:\n" + "".join(
        f"  - {{name: h{i}}}\n" for i in range(14))
    found = errors(text)
    assert any("hosts[12]: network 10.1.0.0/28 has no free address left" in e for e in found)
    found = errors("hosts:\n  - {name: a, address: 10.77.0.1}\n  - {name: b, address: 1.2.3.4}\n")
    assert any("hosts[0].address: address 10.77.0.1 is already the lab gateway" in e
               for e in found)
    assert any("hosts[1].address: address 1.2.3.4 is not a host address" in e for e in found)


def test_not_a_mapping_and_yaml_syntax() -> None:
    assert errors("- 1\n") == ["t.yaml:1: expected a mapping, got a list"]
    assert errors("hosts: [\n")[0].startswith("t.yaml:")


def test_durations() -> None:
    assert parse_duration("2s") == 2.0 and parse_duration("500ms") == 0.5
    assert parse_duration("1m") == 60.0 and parse_duration(3) == 3.0
    for bad in ("2", "fast", True, None, "0s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize("name", ["shop", "microservices", "office"])
def test_examples_load(name: str) -> None:
    t = load_topology(str(EXAMPLES / f"{name}.yaml"))
    assert t.traffic and t.noise and t.attacks
    assert len({h.ip for h in t.hosts}) == len(t.hosts)
    if name == "microservices":
        assert len([h for h in t.hosts if h.label_dict.get("app") == "boutique"]) >= 15


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_topology(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  - {name: a, colour: red}\n")
    with pytest.raises(PolicyError, match=r"bad.yaml:2: hosts\[0\].colour: unknown key"):
        load_topology(str(bad))


def test_host_names_are_lower_case() -> None:
    found = errors(BASE.replace("  - name: dns", "  - name: DNS").replace("to: {role: dns}",
                                                                          "to: DNS"))
    assert any("hosts[3].name: invalid host name 'DNS'" in e for e in found)
