"""The policy objects (see docs/policy-format.md). Frozen, hashable, compared by value.

Collections are tuples in file order; labels are sorted (key, value) pairs. A `Policy` built by
`bulkhead.policy.fileformat.load_policy` is already checked for dangling references.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_LABEL_KEYS: tuple[str, ...] = ("role", "app", "env", "loc")
ENFORCEMENT_STATES: tuple[str, ...] = ("idle", "visibility", "selective", "full")
ACTIONS: tuple[str, ...] = ("allow", "deny", "override_deny")
Enforcement = Literal["idle", "visibility", "selective", "full"]
Action = Literal["allow", "deny", "override_deny"]
ActorKind = Literal["labels", "workload", "ip_list", "all_workloads", "user_group"]


@dataclass(frozen=True)
class GroupRef:
    """`{group: NAME}` inside a selector."""

    name: str


# A selector value as written: one value, a list of values (OR), or a label-group reference.
SelectorValue = str | tuple[str, ...] | GroupRef


@dataclass(frozen=True)
class Selector:
    """Keys ANDed; each key's value(s) ORed. No terms = every workload."""

    terms: tuple[tuple[str, SelectorValue], ...] = ()

    @classmethod
    def of(cls, mapping: dict[str, SelectorValue]) -> Selector:
        return cls(tuple(sorted(mapping.items(), key=lambda kv: kv[0])))

    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.terms)


@dataclass(frozen=True)
class LabelGroup:
    name: str
    key: str
    values: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # other groups of the same key, included


@dataclass(frozen=True)
class Workload:
    name: str
    ips: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    hostname: str | None = None
    managed: bool = False
    enforcement: Enforcement = "visibility"
    os: Literal["linux", "windows"] = "linux"

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class IPList:
    name: str
    cidrs: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Service:
    name: str
    ports: tuple[str, ...] = ()
    process: str | None = None
    unit: str | None = None


@dataclass(frozen=True)
class UserGroup:
    """A directory group for user segmentation: its members' user names (and SIDs)."""

    name: str
    members: tuple[str, ...] = ()
    sid: str | None = None


@dataclass(frozen=True)
class Actor:
    kind: ActorKind
    selector: Selector | None = None  # kind == "labels"
    name: str | None = None  # kind in workload / ip_list / user_group


@dataclass(frozen=True)
class Rule:
    action: Action
    consumers: tuple[Actor, ...]
    providers: tuple[Actor, ...]
    services: tuple[str, ...]  # service names or inline port specs, as written
    extra_scope: bool = False
    id: str | None = None  # as written; `effective_id` fills the default
    description: str | None = None


@dataclass(frozen=True)
class Ruleset:
    name: str
    rules: tuple[Rule, ...] = ()
    scopes: tuple[Selector, ...] = ()
    description: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class Settings:
    outbound: Literal["enforce", "allow"] = "enforce"


# `from`/`to` of a policy test: a workload name, an address, or an actor.
Endpoint = str | Actor


@dataclass(frozen=True)
class PolicyTest:
    source: Endpoint
    target: Endpoint
    port: str
    expect: Literal["allowed", "blocked"]
    name: str | None = None
    process: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class Policy:
    version: int = 1
    label_keys: tuple[str, ...] = DEFAULT_LABEL_KEYS
    label_groups: tuple[LabelGroup, ...] = ()
    ip_lists: tuple[IPList, ...] = ()
    services: tuple[Service, ...] = ()
    user_groups: tuple[UserGroup, ...] = ()
    workloads: tuple[Workload, ...] = ()
    rulesets: tuple[Ruleset, ...] = ()
    settings: Settings = field(default_factory=Settings)
    tests: tuple[PolicyTest, ...] = ()

    def workload(self, name: str) -> Workload | None:
        for w in self.workloads:
            if w.name == name:
                return w
        return None


def effective_rule_id(ruleset: Ruleset, index: int, rule: Rule) -> str:
    """Rules without `id` are known as `<ruleset>/<index>`."""
    return rule.id if rule.id else f"{ruleset.name}/{index}"
