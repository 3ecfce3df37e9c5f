"""The policy file: all-or-nothing loading with path- and line-named errors; dump round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from bulkhead.domain.errors import PolicyError
from bulkhead.domain.model import Actor, GroupRef
from bulkhead.policy.fileformat import dump_policy, load_policy, loads_policy, policy_to_data
from bulkhead.policy.schema import policy_schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "policies").glob("*.yaml"))

SPEC_EXAMPLE = """\
version: 1
label_keys: [role, app, env, loc]
label_groups:
  - {name: prod-like, key: env, values: [prod, staging]}
ip_lists:
  - {name: internet, cidrs: ["0.0.0.0/0", "::/0"], exclude: ["10.0.0.0/8"]}
services:
  - {name: https, ports: ["tcp/443"]}
  - {name: mysql, ports: ["tcp/3306"], unit: mysql.service}
workloads:
  - name: web-1
    ips: [10.0.1.10]
    labels: {role: web, app: shop, env: prod, loc: eu}
    managed: true
    enforcement: full
rulesets:
  - name: shop-prod
    scopes: [{app: shop, env: prod}]
    rules:
      - {id: web-api, action: allow, consumers: [{labels: {role: web}}], providers: [{labels: {role: api}}], services: ["tcp/8080"]}
      - {action: allow, consumers: [{ip_list: internet}], providers: [{labels: {role: web}}], services: [https]}
      - {action: deny, consumers: [{all_workloads: true}], providers: [{labels: {role: db}}], services: ["any"], extra_scope: true}
settings:
  outbound: enforce
tests:
  - {from: web-1, to: "10.0.1.99", port: tcp/3306, expect: blocked}
  - {from: {labels: {role: web, env: prod}}, to: {labels: {role: api, env: prod}}, port: tcp/8080, expect: allowed}
  - {from: "203.0.113.7", to: web-1, port: tcp/443, expect: allowed}
"""  # noqa: E501


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        loads_policy(text, "p.yaml")
    return [str(i) for i in info.value.issues]


def test_spec_example_loads_with_every_object() -> None:
    p = loads_policy(SPEC_EXAMPLE)
    assert p.label_groups[0].values == ("prod", "staging")
    assert p.services[1].unit == "mysql.service"
    w = p.workloads[0]
    assert (w.managed, w.enforcement, w.label("app")) == (True, "full", "shop")
    rules = p.rulesets[0].rules
    assert rules[0].id == "web-api" and rules[1].id is None
    assert rules[2].extra_scope and rules[2].consumers == (Actor("all_workloads"),)
    assert isinstance(p.tests[1].source, Actor)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip_is_exact_and_deterministic(fmt: str) -> None:
    p = loads_policy(SPEC_EXAMPLE)
    text = dump_policy(p, fmt)
    again = loads_policy(text, f"x.{fmt}")
    assert again == p
    assert dump_policy(again, fmt) == text


def test_selector_forms_survive_round_trip() -> None:
    p = loads_policy("""
label_groups: [{name: g, key: env, values: [a]}]
workloads: [{name: w, ips: [10.0.0.1], labels: {env: a}}]
rulesets:
  - name: r
    scopes: [{env: {group: g}}, {env: [a, b]}, {env: a}]
    rules: [{action: allow, consumers: [{workload: w}], providers: [{all_workloads: true}],
             services: [any]}]
""")
    values = [s.terms[0][1] for s in p.rulesets[0].scopes]
    assert values == [GroupRef("g"), ("a", "b"), "a"]
    assert loads_policy(dump_policy(p)) == p


def test_error_names_path_and_line() -> None:
    bad = SPEC_EXAMPLE.replace("{ip_list: internet}", "{ip_list: corp}")
    assert errors_of(bad) == [
        "p.yaml:21: rulesets[0].rules[1].consumers[0].ip_list: unknown ip_list 'corp'"]


@pytest.mark.parametrize(("text", "expected"), [
    ("versoin: 1", "versoin: unknown field 'versoin'"),
    ("version: 2", "version: unsupported version 2"),
    ("workloads: [{name: a, ips: [10.0.0.1]}, {name: a}]", "workloads[1].name: duplicate "
     "workload name 'a'"),
    ("workloads: [{name: a, ips: [10.0.0.1]}, {name: b, ips: [10.0.0.1]}]",
     "workloads[1].ips[0]: address 10.0.0.1 already belongs to 'a'"),
    ("workloads: [{name: a, ips: [10.0.0.300]}]", "workloads[0].ips[0]: not an IP address"),
    ("workloads: [{name: a, labels: {colour: red}}]", "workloads[0].labels.colour: unknown "
     "field"),
    ("workloads: [{name: a, labels: {env: yes}}]", "quote it"),
    ("workloads: [{name: a, enforcement: strict}]", "workloads[0].enforcement: expected one of"),
    ("ip_lists: [{name: x, cidrs: [10.0.0.0/33]}]", "ip_lists[0].cidrs[0]: not an address"),
    ("ip_lists: [{name: x, cidrs: [10.0.0.9-10.0.0.1]}]", "range is reversed"),
    ("services: [{name: s, ports: [tcp/70000]}]", "services[0].ports[0]: port out of range"),
    ("services: [{name: s, ports: [xyz/1]}]", "unknown protocol"),
    ("services: [{name: tcp/80, ports: [tcp/80]}]", "reads as a port spec"),
    ("label_groups: [{name: a, key: env, groups: [b]}, {name: b, key: env, groups: [a]}]",
     "groups include each other"),
    ("label_groups: [{name: a, key: env}, {name: b, key: app, groups: [a]}]",
     "label_groups[1].groups[0]: group 'a' is of key 'env', not 'app'"),
    ("user_groups: [{name: u}]\nrulesets: [{name: r, rules: [{action: allow, consumers: "
     "[{all_workloads: true}], providers: [{user_group: u}], services: [any]}]}]",
     "rulesets[0].rules[0].providers[0].user_group: user_group actors are consumers only"),
    ("rulesets: [{name: r, rules: [{id: x, action: allow, consumers: [{all_workloads: true}], "
     "providers: [{all_workloads: true}], services: [any]}, {id: x, action: deny, consumers: "
     "[{all_workloads: true}], providers: [{all_workloads: true}], services: [any]}]}]",
     "rulesets[0].rules[1].id: duplicate rule id 'x'"),
    ("rulesets: [{name: r, rules: [{action: permit, consumers: [], providers: [], "
     "services: []}]}]", "rulesets[0].rules[0].action: expected one of allow, deny"),
    ("rulesets: [{name: r, rules: [{action: allow, consumers: [{labels: {env: a}, "
     "workload: b}], providers: [{all_workloads: true}], services: [any]}]}]",
     "exactly one of"),
    ("rulesets: [{name: r, scopes: [{env: {group: nope}}], rules: []}]",
     "rulesets[0].scopes[0].env.group: unknown label group 'nope'"),
    ("tests: [{from: nowhere, to: 10.0.0.1, port: tcp/1, expect: allowed}]",
     "tests[0].from: 'nowhere' is neither a workload nor an address"),
    ("tests: [{from: 10.0.0.2, to: 10.0.0.1, port: any, expect: allowed}]",
     "tests[0].port: a test names one protocol and port"),
    ("a: [1, 2\n", "invalid YAML"),
    ("version: 1\nversion: 1\n", "version: duplicate key 'version'"),
])
def test_bad_input_is_named(text: str, expected: str) -> None:
    errs = errors_of(text)
    assert any(expected in e for e in errs), errs


def test_every_error_is_reported_at_once() -> None:
    errs = errors_of("workloads: [{name: a, ips: [x]}, {name: b, enforcement: z}]\n"
                     "ip_lists: [{name: l, cidrs: [y]}]\n")
    assert len(errs) == 3
    assert [e.split(":")[1] for e in errs] == ["1", "1", "2"]


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text('{\n  "version": 1,\n  "workloads": [\n}\n')
    with pytest.raises(PolicyError) as info:
        load_policy(str(f))
    assert str(info.value).startswith(f"{f}:4:")


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load_round_trip_and_match_schema(path: Path) -> None:
    p = load_policy(str(path))
    assert loads_policy(dump_policy(p)) == p
    schema = policy_schema()
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    jsonschema.validate(policy_to_data(p), schema)


def test_published_schema_is_current() -> None:
    published = json.loads((ROOT / "docs" / "policy.schema.json").read_text())
    assert published == policy_schema()
