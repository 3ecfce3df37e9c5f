"""JSON Schema (draft 2020-12) of the policy file, for editors and CI linters.

The loader (`fileformat.py`) is the authority: it also checks references and values that a
schema cannot express (addresses, port specs, unique names). The schema is kept in step by a
test that validates every example and round-tripped random policy against it.
"""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,127}$"}
STRINGS = {"type": "array", "items": {"type": "string"}}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


def policy_schema() -> dict[str, Any]:
    selector_value = {"oneOf": [
        {"type": ["string", "integer"]},
        {"type": "array", "items": {"type": ["string", "integer"]}, "minItems": 1},
        _obj({"group": {"type": "string"}}, ("group",)),
    ]}
    selector = {"type": "object", "additionalProperties": {"$ref": "#/$defs/selector_value"}}
    actor = {"oneOf": [
        _obj({"labels": {"$ref": "#/$defs/selector"}}, ("labels",)),
        _obj({"workload": {"type": "string"}}, ("workload",)),
        _obj({"ip_list": {"type": "string"}}, ("ip_list",)),
        _obj({"all_workloads": {"const": True}}, ("all_workloads",)),
        _obj({"user_group": {"type": "string"}}, ("user_group",)),
    ]}
    endpoint = {"oneOf": [{"type": "string"}, {"$ref": "#/$defs/actor"}]}
    rule = _obj({
        "id": NAME,
        "action": {"enum": ["allow", "deny", "override_deny"]},
        "consumers": {"type": "array", "items": {"$ref": "#/$defs/actor"}, "minItems": 1},
        "providers": {"type": "array", "items": {"$ref": "#/$defs/actor"}, "minItems": 1},
        "services": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "extra_scope": {"type": "boolean"},
        "description": {"type": "string"},
    }, ("action", "consumers", "providers", "services"))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://bulkhead.dev/schema/policy-v1.json",
        "title": "Bulkhead policy file",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "version": {"const": 1},
            "label_keys": {"type": "array", "items": {
                "type": "string", "pattern": r"^[a-z][a-z0-9_.-]{0,62}$"}, "uniqueItems": True},
            "label_groups": {"type": "array", "items": _obj({
                "name": NAME, "key": {"type": "string"}, "values": STRINGS,
                "groups": STRINGS, "description": {"type": "string"}}, ("name", "key"))},
            "ip_lists": {"type": "array", "items": _obj({
                "name": NAME, "cidrs": STRINGS, "exclude": STRINGS,
                "description": {"type": "string"}}, ("name",))},
            "services": {"type": "array", "items": _obj({
                "name": NAME, "ports": {**STRINGS, "minItems": 1},
                "process": {"type": "string"}, "unit": {"type": "string"},
                "description": {"type": "string"}}, ("name", "ports"))},
            "user_groups": {"type": "array", "items": _obj({
                "name": NAME, "members": STRINGS, "sid": {"type": "string"},
                "description": {"type": "string"}}, ("name",))},
            "workloads": {"type": "array", "items": _obj({
                "name": NAME, "hostname": {"type": "string"}, "ips": STRINGS,
                "labels": {"type": "object",
                           "additionalProperties": {"type": ["string", "integer"]}},
                "managed": {"type": "boolean"},
                "enforcement": {"enum": ["idle", "visibility", "selective", "full"]},
                "os": {"enum": ["linux", "windows"]},
                "description": {"type": "string"}}, ("name",))},
            "rulesets": {"type": "array", "items": _obj({
                "name": NAME, "description": {"type": "string"}, "enabled": {"type": "boolean"},
                "scopes": {"type": "array", "items": {"$ref": "#/$defs/selector"}},
                "rules": {"type": "array", "items": {"$ref": "#/$defs/rule"}}}, ("name",))},
            "settings": _obj({"outbound": {"enum": ["enforce", "allow"]}}),
            "tests": {"type": "array", "items": _obj({
                "name": {"type": "string"}, "from": {"$ref": "#/$defs/endpoint"},
                "to": {"$ref": "#/$defs/endpoint"}, "port": {"type": "string"},
                "expect": {"enum": ["allowed", "blocked"]}, "process": {"type": "string"},
                "user": {"type": "string"}}, ("from", "to", "port", "expect"))},
        },
        "$defs": {"selector_value": selector_value, "selector": selector, "actor": actor,
                  "endpoint": endpoint, "rule": rule},
    }
