"""Schemas of the policy and inventory API (/api/v1).

Bodies of policy objects are the policy-file form (docs/policy-format.md): what you GET is
what a policy file holds, plus read-only `revision`/`updated_at`/`updated_by`. PUT/PATCH
bodies may carry `revision` instead of an `If-Match` header (optimistic concurrency).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

Enforcement = Literal["idle", "visibility", "selective", "full"]
OS = Literal["linux", "windows"]
Action = Literal["allow", "deny", "override_deny"]
Name = Annotated[str, Field(min_length=1, max_length=128)]
Text = Annotated[str, Field(max_length=4000)]
Selector = dict[str, Any]  # key -> value | [values] | {group: NAME}
Actor = dict[str, Any]  # {labels: SELECTOR} | {workload: N} | {ip_list: N} | ...


def nul_path(value: Any, path: str = "") -> str | None:
    """Where `value` holds a NUL character (PostgreSQL text cannot store one), else None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            found = nul_path(k, sub) or nul_path(v, sub)
            if found is not None:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = nul_path(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        where = nul_path(data)
        if where is not None:
            raise ValueError(f"text must not contain NUL characters (at {where or 'body'})")
        return data


class Output(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Revisioned(Input):
    revision: int | None = Field(None, description="the revision you last read (as If-Match)")


# -- label keys and labels ----------------------------------------------------------------------

class LabelKeyCreate(Input):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    description: Text | None = None


class LabelKeyUpdate(Revisioned):
    description: Text | None = None


class LabelKeyPublic(Output):
    name: str
    position: int
    description: str | None = None
    revision: int
    workloads: int = 0


class LabelCreate(Input):
    key: Annotated[str, Field(min_length=1, max_length=63)]
    value: Annotated[str, Field(min_length=1, max_length=255)]
    description: Text | None = None


class LabelUpdate(Revisioned):
    description: Text | None = None


class LabelPublic(Output):
    key: str
    value: str
    description: str | None = None
    revision: int
    workloads: int = 0


# -- workloads ----------------------------------------------------------------------------------

class WorkloadFields(Input):
    hostname: Annotated[str, Field(max_length=255)] | None = None
    ips: list[str] = []
    labels: dict[str, str] = {}
    managed: StrictBool = False
    enforcement: Enforcement = "visibility"
    os: OS = "linux"
    description: Text | None = None


class WorkloadCreate(WorkloadFields):
    name: Name


class WorkloadUpdate(WorkloadFields, Revisioned):
    name: Name | None = Field(None, description="optional; must equal the name in the path")


class WorkloadPatch(Revisioned):
    hostname: Annotated[str, Field(max_length=255)] | None = None
    ips: list[str] | None = None
    labels: dict[str, str | None] | None = Field(
        None, description="merged: a value sets a label, null removes it")
    managed: StrictBool | None = None
    enforcement: Enforcement | None = None
    os: OS | None = None
    description: Text | None = None


class WorkloadPublic(Output):
    name: str
    hostname: str | None
    ips: list[str]
    labels: dict[str, str]
    managed: bool
    enforcement: Enforcement
    os: OS
    description: str | None
    revision: int
    created_at: datetime
    updated_at: datetime
    updated_by: str


class WorkloadPage(Output):
    items: list[WorkloadPublic]
    total: int
    limit: int
    offset: int
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class EnforcementRequest(Input):
    enforcement: Enforcement
    names: list[Name] | None = None
    labels: dict[str, str | list[str]] | None = Field(
        None, description="label selector (keys ANDed, listed values ORed); {} = every workload")


class EnforcementResult(Output):
    enforcement: Enforcement
    matched: int
    changed: list[str]


class ImportRowReport(Output):
    line: int | None = Field(None, description="CSV line (the header is line 1)")
    index: int = Field(description="row index (0-based) among data rows / JSON items")
    name: str | None
    status: str = Field(description="created | updated | unchanged | would_create | "
                                    "would_update | error")
    errors: list[dict[str, str]] = []


class ImportReport(Output):
    mode: Literal["atomic", "best_effort"]
    dry_run: bool
    applied: bool
    rows_total: int
    summary: dict[str, int]
    rows: list[ImportRowReport]


# -- policy objects -----------------------------------------------------------------------------

class Meta(Output):
    revision: int
    updated_at: datetime | None = None
    updated_by: str | None = None


class LabelGroupFields(Input):
    key: str
    values: list[str] = []
    groups: list[str] = []
    description: Text | None = None


class LabelGroupCreate(LabelGroupFields):
    name: Name


class LabelGroupUpdate(LabelGroupFields, Revisioned):
    name: Name | None = None


class LabelGroupPatch(Revisioned):
    key: str | None = None
    values: list[str] | None = None
    groups: list[str] | None = None
    description: Text | None = None


class LabelGroupPublic(Meta):
    name: str
    key: str
    values: list[str]
    groups: list[str] | None = None
    description: str | None = None


class IPListFields(Input):
    cidrs: list[str] = []
    exclude: list[str] = []
    description: Text | None = None


class IPListCreate(IPListFields):
    name: Name


class IPListUpdate(IPListFields, Revisioned):
    name: Name | None = None


class IPListPatch(Revisioned):
    cidrs: list[str] | None = None
    exclude: list[str] | None = None
    description: Text | None = None


class IPListPublic(Meta):
    name: str
    cidrs: list[str]
    exclude: list[str] | None = None
    description: str | None = None


class ServiceFields(Input):
    ports: list[str]
    process: str | None = None
    unit: str | None = None
    description: Text | None = None


class ServiceCreate(ServiceFields):
    name: Name


class ServiceUpdate(ServiceFields, Revisioned):
    name: Name | None = None


class ServicePatch(Revisioned):
    ports: list[str] | None = None
    process: str | None = None
    unit: str | None = None
    description: Text | None = None


class ServicePublic(Meta):
    name: str
    ports: list[str]
    process: str | None = None
    unit: str | None = None
    description: str | None = None


class UserGroupFields(Input):
    members: list[str] = []
    sid: str | None = None
    description: Text | None = None


class UserGroupCreate(UserGroupFields):
    name: Name


class UserGroupUpdate(UserGroupFields, Revisioned):
    name: Name | None = None


class UserGroupPatch(Revisioned):
    members: list[str] | None = None
    sid: str | None = None
    description: Text | None = None


class UserGroupPublic(Meta):
    name: str
    members: list[str]
    sid: str | None = None
    description: str | None = None


class RuleFields(Input):
    id: Name | None = Field(None, description="stable id; default `<ruleset>/<index>`")
    action: Action
    consumers: list[Actor]
    providers: list[Actor]
    services: list[str] = Field(description="service names or port specs (tcp/443, any)")
    extra_scope: StrictBool = False
    description: Text | None = None


class RuleCreate(RuleFields):
    pass


class RuleUpdate(RuleFields, Revisioned):
    pass


class RulePatch(Revisioned):
    id: Name | None = None
    action: Action | None = None
    consumers: list[Actor] | None = None
    providers: list[Actor] | None = None
    services: list[str] | None = None
    extra_scope: StrictBool | None = None
    description: Text | None = None


class RulePublic(Output):
    ruleset: str
    index: int
    effective_id: str
    revision: int = Field(description="the ruleset's revision (If-Match for rule edits)")
    rule: dict[str, Any]


class RulesetFields(Input):
    scopes: list[Selector] = []
    rules: list[dict[str, Any]] = []
    description: Text | None = None
    enabled: StrictBool = True


class RulesetCreate(RulesetFields):
    name: Name


class RulesetUpdate(RulesetFields, Revisioned):
    name: Name | None = None


class RulesetPatch(Revisioned):
    scopes: list[Selector] | None = None
    rules: list[dict[str, Any]] | None = None
    description: Text | None = None
    enabled: StrictBool | None = None


class RulesetPublic(Meta):
    name: str
    description: str | None = None
    enabled: bool | None = None
    scopes: list[Selector] | None = None
    rules: list[dict[str, Any]]


class SettingsUpdate(Revisioned):
    outbound: Literal["enforce", "allow"] = "enforce"


class SettingsPublic(Output):
    outbound: Literal["enforce", "allow"]
    revision: int


class PolicyTestsUpdate(Revisioned):
    tests: list[dict[str, Any]]


class PolicyTestsPublic(Output):
    tests: list[dict[str, Any]]
    revision: int


# -- draft, versions, provision -----------------------------------------------------------------

class ObjectRef(Output):
    kind: str
    name: str
    updated_at: str | None = None
    updated_by: str | None = None


class ObjectChanges(Output):
    added: list[ObjectRef]
    modified: list[ObjectRef]
    deleted: list[ObjectRef]
    reordered: list[str] = Field(description="kinds whose order changed (order is kept in "
                                             "the file; it does not change decisions)")


class DraftChanges(ObjectChanges):
    base_version: int | None
    draft_revision: int


class ProvisionRequest(Input):
    note: Annotated[str, Field(min_length=1, max_length=4000)]
    force: StrictBool = Field(False, description="provision even when nothing changed")
    draft_revision: int | None = Field(
        None, description="the draft revision you reviewed (as If-Match on the draft)")


class VersionSummary(Output):
    id: int
    created_at: datetime
    author: str
    note: str
    draft_revision: int
    summary: dict[str, Any]


class VersionDetail(VersionSummary):
    objects: dict[str, Any] = Field(description="the policy objects (policy-file form)")


class ProvisionResult(VersionSummary):
    warnings: list[dict[str, Any]] = Field([], description="lint findings below error")


class VersionPage(Output):
    items: list[VersionSummary]
    total: int
    limit: int
    offset: int


class RevertRequest(Input):
    version: int
    draft_revision: int | None = None


class RevertResult(Output):
    version: int
    draft_revision: int
    changes: ObjectChanges


class DiffResult(Output):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    from_: str = Field(alias="from")
    to: str
    changes: ObjectChanges
    semantic: Any = Field(None, description="bulkhead.policy.diff: which (consumer, provider, "
                                            "service) triples become allowed or blocked")


class ImportResult(Output):
    draft_revision: int
    changes: ObjectChanges
    workloads: dict[str, int]
    label_keys: list[str]
