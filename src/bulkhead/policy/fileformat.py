"""The policy file: load (all-or-nothing, every error with its path and line) and dump
(deterministic key order, defaults omitted, so `load(dump(p)) == p` and files diff cleanly).

Loading checks structure and every reference (groups, IP lists, services, workloads, user
groups, rule ids). Semantic checks that need the whole policy (rules that can never match,
shadowing, over-broad rules) belong to `bulkhead.policy.lint`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from bulkhead.domain.addresses import canonical_ip, parse_block
from bulkhead.domain.errors import Issue, PolicyError
from bulkhead.domain.model import (
    ACTIONS,
    DEFAULT_LABEL_KEYS,
    ENFORCEMENT_STATES,
    Actor,
    Endpoint,
    GroupRef,
    IPList,
    LabelGroup,
    Policy,
    PolicyTest,
    Rule,
    Ruleset,
    Selector,
    SelectorValue,
    Service,
    Settings,
    UserGroup,
    Workload,
    effective_rule_id,
)
from bulkhead.domain.ports import PortSpec, PortSpecError
from bulkhead.policy.source import Document, join, parse_text, read_file

T = TypeVar("T")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,127}$")
KEY_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
ACTOR_KINDS = ("labels", "workload", "ip_list", "all_workloads", "user_group")


def is_port_spec(text: str) -> bool:
    try:
        PortSpec.parse(text)
    except (PortSpecError, AttributeError):
        return False
    return True


class Reader:
    """Builds model objects from plain data, collecting issues instead of stopping (also
    the base of other YAML formats' loaders, e.g. the lab's topology file)."""

    WORD = "field"  # what the format calls a mapping key in messages

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.issues: list[Issue] = []

    def err(self, path: str, message: str) -> None:
        self.issues.append(self.doc.issue(path, message))

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping, got {kind_of(value)}")
            return None
        for k in value:
            if k not in allowed:
                self.err(join(path, str(k)),
                         f"unknown {self.WORD} {k!r} (expected one of: {', '.join(allowed)})")
        for k in required:
            if k not in value:
                self.err(path, f"missing required {self.WORD} {k!r}")
        return value

    def seq(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.err(path, f"expected a list, got {kind_of(value)}")
            return []
        return value

    def string(self, value: Any, path: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "a string") -> str | None:
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
            hint = " (quote it: YAML reads yes/no/on/off as booleans)" if isinstance(
                value, bool) else ""
            self.err(path, f"expected {what}, got {kind_of(value)}{hint}")
            return None
        text = str(value)
        if pattern is not None and not pattern.match(text):
            self.err(path, f"invalid {what} {text!r}")
            return None
        return text

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.err(path, f"expected true or false, got {kind_of(value)}")
            return False
        return value

    def choice(self, value: Any, path: str, options: tuple[str, ...]) -> str | None:
        if value not in options:
            self.err(path, f"expected one of {', '.join(options)}, got {value!r}")
            return None
        return str(value)

    def strings(self, value: Any, path: str, *, what: str = "a string") -> tuple[str, ...]:
        out: list[str] = []
        for i, item in enumerate(self.seq(value, path)):
            s = self.string(item, join(path, i), what=what)
            if s is not None:
                out.append(s)
        return tuple(out)

    def unique_names(self, items: list[T], path: str, name: Callable[[T], str | None],
                     what: str) -> dict[str, int]:
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            n = name(item)
            if n is None:
                continue
            if n in seen:
                self.err(join(join(path, i), "name"),
                         f"duplicate {what} name {n!r} (first at {path}[{seen[n]}])")
            else:
                seen[n] = i
        return seen


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


TOP_KEYS = ("version", "label_keys", "label_groups", "ip_lists", "services", "user_groups",
            "workloads", "rulesets", "settings", "tests")


def policy_from_document(doc: Document) -> Policy:
    r = Reader(doc)
    data = doc.data if doc.data is not None else {}
    top = r.mapping(data, "", TOP_KEYS)
    if top is None:
        raise PolicyError(r.issues)
    if top.get("version", 1) != 1:
        r.err("version", f"unsupported version {top.get('version')!r} (this release reads 1)")
    keys = DEFAULT_LABEL_KEYS
    if "label_keys" in top:
        keys = r.strings(top["label_keys"], "label_keys", what="a label key")
        for i, k in enumerate(keys):
            if not KEY_RE.match(k):
                r.err(f"label_keys[{i}]", f"invalid label key {k!r} (lower case, digits, _.-)")
        if len(set(keys)) != len(keys):
            r.err("label_keys", "label keys repeat")
    ctx = _Context(r, keys)
    groups = ctx.label_groups(top.get("label_groups"))
    ip_lists = ctx.ip_lists(top.get("ip_lists"))
    services = ctx.services(top.get("services"))
    user_groups = ctx.user_groups(top.get("user_groups"))
    workloads = ctx.workloads(top.get("workloads"))
    rulesets = ctx.rulesets(top.get("rulesets"))
    settings = ctx.settings(top.get("settings"))
    tests = ctx.tests(top.get("tests"))
    if r.issues:
        raise PolicyError(r.issues)
    return Policy(version=1, label_keys=keys, label_groups=groups, ip_lists=ip_lists,
                  services=services, user_groups=user_groups, workloads=workloads,
                  rulesets=rulesets, settings=settings, tests=tests)


class _Context:
    def __init__(self, r: Reader, label_keys: tuple[str, ...]) -> None:
        self.r = r
        self.keys = label_keys
        self.group_keys: dict[str, str] = {}
        self.ip_list_names: set[str] = set()
        self.service_names: set[str] = set()
        self.user_group_names: set[str] = set()
        self.workload_names: set[str] = set()

    # -- sections ---------------------------------------------------------------------------
    def label_groups(self, value: Any) -> tuple[LabelGroup, ...]:
        r, out, raw = self.r, [], self.r.seq(value, "label_groups")
        for i, item in enumerate(raw):
            p = f"label_groups[{i}]"
            m = r.mapping(item, p, ("name", "key", "values", "groups", "description"),
                          ("name", "key"))
            if m is None:
                continue
            name = r.string(m.get("name"), join(p, "name"), pattern=NAME_RE, what="name")
            key = r.string(m.get("key"), join(p, "key"), what="label key")
            if key is not None and key not in self.keys:
                r.err(join(p, "key"), f"undeclared label key {key!r}")
            values = r.strings(m.get("values"), join(p, "values"), what="a label value")
            sub = r.strings(m.get("groups"), join(p, "groups"), what="a group name")
            if name is not None and key is not None:
                self.group_keys.setdefault(name, key)
                out.append(LabelGroup(name, key, values, sub))
        r.unique_names(out, "label_groups", lambda g: g.name, "label group")
        for i, g in enumerate(out):
            for j, s in enumerate(g.groups):
                if s not in self.group_keys:
                    r.err(f"label_groups[{i}].groups[{j}]", f"unknown label group {s!r}")
                elif self.group_keys[s] != g.key:
                    r.err(f"label_groups[{i}].groups[{j}]",
                          f"group {s!r} is of key {self.group_keys[s]!r}, not {g.key!r}")
        self._check_group_cycles(out)
        return tuple(out)

    def _check_group_cycles(self, groups: list[LabelGroup]) -> None:
        by_name = {g.name: g for g in groups}
        state: dict[str, int] = {}

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == 2 or name not in by_name:
                return
            if state.get(name) == 1:
                idx = next(i for i, g in enumerate(groups) if g.name == name)
                self.r.err(f"label_groups[{idx}].groups",
                           "groups include each other: " + " -> ".join([*trail, name]))
                return
            state[name] = 1
            for s in by_name[name].groups:
                visit(s, [*trail, name])
            state[name] = 2

        for g in groups:
            visit(g.name, [])

    def ip_lists(self, value: Any) -> tuple[IPList, ...]:
        r, out = self.r, []
        for i, item in enumerate(r.seq(value, "ip_lists")):
            p = f"ip_lists[{i}]"
            m = r.mapping(item, p, ("name", "cidrs", "exclude", "description"), ("name",))
            if m is None:
                continue
            name = r.string(m.get("name"), join(p, "name"), pattern=NAME_RE, what="name")
            cidrs = self._blocks(m.get("cidrs"), join(p, "cidrs"))
            exclude = self._blocks(m.get("exclude"), join(p, "exclude"))
            if name is not None:
                out.append(IPList(name, cidrs, exclude))
        r.unique_names(out, "ip_lists", lambda x: x.name, "IP list")
        self.ip_list_names = {x.name for x in out}
        return tuple(out)

    def _blocks(self, value: Any, path: str) -> tuple[str, ...]:
        out = []
        for i, s in enumerate(self.r.strings(value, path, what="a CIDR or range")):
            try:
                parse_block(s)
            except ValueError as exc:
                self.r.err(join(path, i), str(exc))
                continue
            out.append(s)
        return tuple(out)

    def services(self, value: Any) -> tuple[Service, ...]:
        r, out = self.r, []
        for i, item in enumerate(r.seq(value, "services")):
            p = f"services[{i}]"
            m = r.mapping(item, p, ("name", "ports", "process", "unit", "description"),
                          ("name", "ports"))
            if m is None:
                continue
            name = r.string(m.get("name"), join(p, "name"), pattern=NAME_RE, what="name")
            if name is not None and is_port_spec(name):
                r.err(join(p, "name"), f"service name {name!r} reads as a port spec")
            ports = []
            for j, spec in enumerate(r.strings(m.get("ports"), join(p, "ports"),
                                               what="a port spec")):
                try:
                    PortSpec.parse(spec)
                    ports.append(spec)
                except PortSpecError as exc:
                    r.err(f"{p}.ports[{j}]", str(exc))
            if "ports" in m and not m.get("ports"):
                r.err(join(p, "ports"), "a service needs at least one port spec")
            process = r.string(m["process"], join(p, "process")) if "process" in m else None
            unit = r.string(m["unit"], join(p, "unit")) if "unit" in m else None
            if process and unit:
                r.err(p, "bind a service to a process or a unit, not both")
            if name is not None:
                out.append(Service(name, tuple(ports), process, unit))
        r.unique_names(out, "services", lambda x: x.name, "service")
        self.service_names = {x.name for x in out}
        return tuple(out)

    def user_groups(self, value: Any) -> tuple[UserGroup, ...]:
        r, out = self.r, []
        for i, item in enumerate(r.seq(value, "user_groups")):
            p = f"user_groups[{i}]"
            m = r.mapping(item, p, ("name", "members", "sid", "description"), ("name",))
            if m is None:
                continue
            name = r.string(m.get("name"), join(p, "name"), pattern=NAME_RE, what="name")
            members = r.strings(m.get("members"), join(p, "members"), what="a user name")
            sid = r.string(m["sid"], join(p, "sid")) if "sid" in m else None
            if name is not None:
                out.append(UserGroup(name, members, sid))
        r.unique_names(out, "user_groups", lambda x: x.name, "user group")
        self.user_group_names = {x.name for x in out}
        return tuple(out)

    def labels(self, value: Any, path: str) -> tuple[tuple[str, str], ...]:
        if value is None:
            return ()
        m = self.r.mapping(value, path, tuple(self.keys))
        if m is None:
            return ()
        out = []
        for k, v in m.items():
            if k not in self.keys:
                continue
            s = self.r.string(v, join(path, str(k)), what="a label value")
            if s is not None:
                out.append((str(k), s))
        return tuple(sorted(out))

    def workloads(self, value: Any) -> tuple[Workload, ...]:
        r, out = self.r, []
        owner: dict[str, str] = {}
        fields = ("name", "hostname", "ips", "labels", "managed", "enforcement", "os",
                  "description")
        for i, item in enumerate(r.seq(value, "workloads")):
            p = f"workloads[{i}]"
            m = r.mapping(item, p, fields, ("name",))
            if m is None:
                continue
            name = r.string(m.get("name"), join(p, "name"), pattern=NAME_RE, what="name")
            hostname = r.string(m["hostname"], join(p, "hostname")) if "hostname" in m else None
            ips = []
            for j, ip in enumerate(r.strings(m.get("ips"), join(p, "ips"), what="an address")):
                try:
                    c = canonical_ip(ip)
                except ValueError as exc:
                    r.err(f"{p}.ips[{j}]", str(exc))
                    continue
                if c in owner:
                    r.err(f"{p}.ips[{j}]", f"address {c} already belongs to {owner[c]!r}")
                else:
                    owner[c] = name or p
                ips.append(c)
            labels = self.labels(m.get("labels"), join(p, "labels"))
            managed = r.boolean(m["managed"], join(p, "managed")) if "managed" in m else False
            enf = r.choice(m.get("enforcement", "visibility"), join(p, "enforcement"),
                           ENFORCEMENT_STATES) or "visibility"
            os_ = r.choice(m.get("os", "linux"), join(p, "os"), ("linux", "windows")) or "linux"
            if name is not None:
                out.append(Workload(name, tuple(ips), labels, hostname, managed,
                                    enf, os_))  # type: ignore[arg-type]
        r.unique_names(out, "workloads", lambda x: x.name, "workload")
        self.workload_names = {w.name for w in out}
        return tuple(out)

    def selector(self, value: Any, path: str) -> Selector | None:
        if not isinstance(value, dict):
            self.r.err(path, f"a selector is a mapping of label key to value(s), got "
                       f"{kind_of(value)}")
            return None
        terms: dict[str, SelectorValue] = {}
        ok = True
        for k, v in value.items():
            kp = join(path, str(k))
            if k not in self.keys:
                self.r.err(kp, f"undeclared label key {k!r}")
                ok = False
                continue
            sv = self._selector_value(str(k), v, kp)
            if sv is None:
                ok = False
            else:
                terms[str(k)] = sv
        return Selector.of(terms) if ok else None

    def _selector_value(self, key: str, v: Any, path: str) -> SelectorValue | None:
        if isinstance(v, dict):
            m = self.r.mapping(v, path, ("group",), ("group",))
            if m is None or "group" not in m:
                return None
            g = self.r.string(m["group"], join(path, "group"), what="a group name")
            if g is None:
                return None
            if g not in self.group_keys:
                self.r.err(join(path, "group"), f"unknown label group {g!r}")
                return None
            if self.group_keys[g] != key:
                self.r.err(join(path, "group"),
                           f"group {g!r} is of key {self.group_keys[g]!r}, not {key!r}")
                return None
            return GroupRef(g)
        if isinstance(v, list):
            vals = self.r.strings(v, path, what="a label value")
            if not v:
                self.r.err(path, "an empty list of values matches nothing")
                return None
            return vals if len(vals) == len(v) else None
        return self.r.string(v, path, what="a label value")

    def actor(self, value: Any, path: str, *, consumer: bool) -> Actor | None:
        r = self.r
        if not isinstance(value, dict) or len(value) != 1:
            r.err(path, "an actor is a mapping with exactly one of: " + ", ".join(ACTOR_KINDS))
            return None
        (kind, v), = value.items()
        kp = join(path, str(kind))
        if kind == "labels":
            sel = self.selector(v, kp)
            return Actor("labels", selector=sel) if sel is not None else None
        if kind == "all_workloads":
            if v is not True:
                r.err(kp, "all_workloads takes true")
                return None
            return Actor("all_workloads")
        if kind not in ("workload", "ip_list", "user_group"):
            r.err(kp, f"unknown actor kind {kind!r} (expected one of: {', '.join(ACTOR_KINDS)})")
            return None
        name = r.string(v, kp, what="a name")
        if name is None:
            return None
        known = {"workload": self.workload_names, "ip_list": self.ip_list_names,
                 "user_group": self.user_group_names}[kind]
        if name not in known:
            r.err(kp, f"unknown {kind} {name!r}")
            return None
        if kind == "user_group" and not consumer:
            r.err(kp, "user_group actors are consumers only")
            return None
        return Actor(kind, name=name)

    def actors(self, value: Any, path: str, *, consumer: bool) -> tuple[Actor, ...]:
        raw = self.r.seq(value, path)
        if not raw and value is not None:
            self.r.err(path, "needs at least one actor")
        out = []
        for i, a in enumerate(raw):
            act = self.actor(a, join(path, i), consumer=consumer)
            if act is not None:
                out.append(act)
        return tuple(out)

    def rulesets(self, value: Any) -> tuple[Ruleset, ...]:
        r, out = self.r, []
        ids: dict[str, str] = {}
        for i, item in enumerate(r.seq(value, "rulesets")):
            p = f"rulesets[{i}]"
            m = r.mapping(item, p, ("name", "scopes", "rules", "description", "enabled"),
                          ("name",))
            if m is None:
                continue
            name = r.string(m.get("name"), join(p, "name"), pattern=NAME_RE, what="name")
            scopes = []
            for j, s in enumerate(r.seq(m.get("scopes"), join(p, "scopes"))):
                sel = self.selector(s, f"{p}.scopes[{j}]")
                if sel is not None:
                    scopes.append(sel)
            rules = []
            for j, item2 in enumerate(r.seq(m.get("rules"), join(p, "rules"))):
                rule = self.rule(item2, f"{p}.rules[{j}]")
                if rule is None:
                    continue
                rid = effective_rule_id(Ruleset(name or p), j, rule)
                if rid in ids:
                    r.err(f"{p}.rules[{j}].id", f"duplicate rule id {rid!r} (also {ids[rid]})")
                ids[rid] = f"{p}.rules[{j}]"
                rules.append(rule)
            desc = r.string(m["description"], join(p, "description")) if (
                "description" in m) else None
            enabled = r.boolean(m["enabled"], join(p, "enabled")) if "enabled" in m else True
            if name is not None:
                out.append(Ruleset(name, tuple(rules), tuple(scopes), desc, enabled))
        r.unique_names(out, "rulesets", lambda x: x.name, "ruleset")
        return tuple(out)

    def rule(self, value: Any, p: str) -> Rule | None:
        r = self.r
        m = r.mapping(value, p, ("id", "action", "consumers", "providers", "services",
                                 "extra_scope", "description"),
                      ("action", "consumers", "providers", "services"))
        if m is None:
            return None
        n = len(r.issues)
        action = r.choice(m.get("action"), join(p, "action"), ACTIONS)
        consumers = self.actors(m.get("consumers"), join(p, "consumers"), consumer=True)
        providers = self.actors(m.get("providers"), join(p, "providers"), consumer=False)
        services = []
        for j, s in enumerate(r.strings(m.get("services"), join(p, "services"),
                                        what="a service name or port spec")):
            if s not in self.service_names and not is_port_spec(s):
                r.err(f"{p}.services[{j}]", f"unknown service {s!r} (not a name in services "
                      "nor a port spec like tcp/443)")
            services.append(s)
        if "services" in m and not m.get("services"):
            r.err(join(p, "services"), "needs at least one service (use 'any' for all)")
        extra = r.boolean(m["extra_scope"], join(p, "extra_scope")) if (
            "extra_scope" in m) else False
        rid = r.string(m["id"], join(p, "id"), pattern=NAME_RE, what="rule id") if (
            "id" in m) else None
        desc = r.string(m["description"], join(p, "description")) if (
            "description" in m) else None
        if len(r.issues) != n or action is None:
            return None
        return Rule(action, consumers, providers, tuple(services), extra,  # type: ignore[arg-type]
                    rid, desc)

    def settings(self, value: Any) -> Settings:
        if value is None:
            return Settings()
        m = self.r.mapping(value, "settings", ("outbound",))
        if m is None:
            return Settings()
        out = self.r.choice(m.get("outbound", "enforce"), "settings.outbound",
                            ("enforce", "allow"))
        return Settings(outbound=out or "enforce")  # type: ignore[arg-type]

    def endpoint(self, value: Any, path: str) -> Endpoint | None:
        if isinstance(value, dict):
            return self.actor(value, path, consumer=True)
        s = self.r.string(value, path, what="a workload name, address or actor")
        if s is None:
            return None
        if s in self.workload_names:
            return s
        try:
            return canonical_ip(s)
        except ValueError:
            self.r.err(path, f"{s!r} is neither a workload nor an address")
            return None

    def tests(self, value: Any) -> tuple[PolicyTest, ...]:
        r, out = self.r, []
        for i, item in enumerate(r.seq(value, "tests")):
            p = f"tests[{i}]"
            m = r.mapping(item, p, ("name", "from", "to", "port", "expect", "process", "user"),
                          ("from", "to", "port", "expect"))
            if m is None:
                continue
            n = len(r.issues)
            src = self.endpoint(m.get("from"), join(p, "from"))
            dst = self.endpoint(m.get("to"), join(p, "to"))
            port = r.string(m.get("port"), join(p, "port"), what="a port spec")
            if port is not None:
                try:
                    spec = PortSpec.parse(port)
                    if spec.proto is None:
                        r.err(join(p, "port"), "a test names one protocol and port")
                except PortSpecError as exc:
                    r.err(join(p, "port"), str(exc))
            expect = r.choice(m.get("expect"), join(p, "expect"), ("allowed", "blocked"))
            name = r.string(m["name"], join(p, "name")) if "name" in m else None
            process = r.string(m["process"], join(p, "process")) if "process" in m else None
            user = r.string(m["user"], join(p, "user")) if "user" in m else None
            if len(r.issues) == n and src is not None and dst is not None and port and expect:
                out.append(PolicyTest(src, dst, port, expect, name,  # type: ignore[arg-type]
                                      process, user))
        return tuple(out)


# -- public API -------------------------------------------------------------------------------

def load_policy(path: str) -> Policy:
    """Load a policy file (YAML or JSON). Raises PolicyError listing every problem."""
    return policy_from_document(read_file(path))


def loads_policy(text: str, source: str | None = None) -> Policy:
    return policy_from_document(parse_text(text, source))


def policy_from_data(data: Any) -> Policy:
    return policy_from_document(Document(data))


def _selector_data(sel: Selector) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sel.terms:
        if isinstance(v, GroupRef):
            out[k] = {"group": v.name}
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def actor_data(a: Actor) -> dict[str, Any]:
    if a.kind == "labels":
        assert a.selector is not None
        return {"labels": _selector_data(a.selector)}
    if a.kind == "all_workloads":
        return {"all_workloads": True}
    return {a.kind: a.name}


def _endpoint_data(e: Endpoint) -> Any:
    return e if isinstance(e, str) else actor_data(e)


def policy_to_data(p: Policy) -> dict[str, Any]:
    """Plain data in a stable key order; optional fields at their default are omitted."""
    out: dict[str, Any] = {"version": p.version}
    if p.label_keys != DEFAULT_LABEL_KEYS:
        out["label_keys"] = list(p.label_keys)
    if p.label_groups:
        out["label_groups"] = [
            {"name": g.name, "key": g.key, "values": list(g.values),
             **({"groups": list(g.groups)} if g.groups else {})} for g in p.label_groups]
    if p.ip_lists:
        out["ip_lists"] = [
            {"name": x.name, "cidrs": list(x.cidrs), **({"exclude": list(x.exclude)}
                                                        if x.exclude else {})}
            for x in p.ip_lists]
    if p.services:
        out["services"] = [
            {"name": s.name, "ports": list(s.ports),
             **({"process": s.process} if s.process else {}),
             **({"unit": s.unit} if s.unit else {})} for s in p.services]
    if p.user_groups:
        out["user_groups"] = [
            {"name": u.name, "members": list(u.members), **({"sid": u.sid} if u.sid else {})}
            for u in p.user_groups]
    if p.workloads:
        out["workloads"] = [_workload_data(w) for w in p.workloads]
    if p.rulesets:
        out["rulesets"] = [_ruleset_data(rs) for rs in p.rulesets]
    if p.settings != Settings():
        out["settings"] = {"outbound": p.settings.outbound}
    if p.tests:
        out["tests"] = [_test_data(t) for t in p.tests]
    return out


def _workload_data(w: Workload) -> dict[str, Any]:
    d: dict[str, Any] = {"name": w.name}
    if w.hostname:
        d["hostname"] = w.hostname
    d["ips"] = list(w.ips)
    if w.labels:
        d["labels"] = dict(w.labels)
    if w.managed:
        d["managed"] = True
    if w.enforcement != "visibility":
        d["enforcement"] = w.enforcement
    if w.os != "linux":
        d["os"] = w.os
    return d


def _ruleset_data(rs: Ruleset) -> dict[str, Any]:
    d: dict[str, Any] = {"name": rs.name}
    if rs.description:
        d["description"] = rs.description
    if not rs.enabled:
        d["enabled"] = False
    if rs.scopes:
        d["scopes"] = [_selector_data(s) for s in rs.scopes]
    d["rules"] = [_rule_data(r) for r in rs.rules]
    return d


def _rule_data(r: Rule) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if r.id:
        d["id"] = r.id
    d["action"] = r.action
    d["consumers"] = [actor_data(a) for a in r.consumers]
    d["providers"] = [actor_data(a) for a in r.providers]
    d["services"] = list(r.services)
    if r.extra_scope:
        d["extra_scope"] = True
    if r.description:
        d["description"] = r.description
    return d


def _test_data(t: PolicyTest) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if t.name:
        d["name"] = t.name
    d["from"] = _endpoint_data(t.source)
    d["to"] = _endpoint_data(t.target)
    d["port"] = t.port
    if t.process:
        d["process"] = t.process
    if t.user:
        d["user"] = t.user
    d["expect"] = t.expect
    return d


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_presenter)


def dump_policy(p: Policy, fmt: str = "yaml") -> str:
    data = policy_to_data(p)
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=100)
