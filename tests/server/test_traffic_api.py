"""Traffic explorer and what-if over HTTP: pages without gaps, grouping, CSV export without a
row cap, and what-if decisions equal to the reference evaluator's, flow by flow."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bulkhead.domain.model import Policy
from bulkhead.flows.store import DuckDBFlowStore, FlowFilter
from bulkhead.policy.evaluate import Evaluator, Flow
from bulkhead.server.api import traffic as traffic_api
from bulkhead.server.services import traffic as traffic_svc
from tests.flows import T0, make_batch, make_policy

API = "/api/v1/traffic"
DRAFT = make_policy()
# "version 7": the draft without the https rule and with db-1 fully enforced
V7 = replace(DRAFT,
             rulesets=tuple(replace(rs, rules=tuple(r for r in rs.rules if r.id != "web-in"))
                            for rs in DRAFT.rulesets),
             workloads=tuple(replace(w, enforcement="full") if w.name == "db-1" else w
                             for w in DRAFT.workloads))
POLICIES = {"draft": DRAFT, "active": DRAFT, "7": V7}


@pytest.fixture
def client(client_as: Callable[[str], TestClient]) -> Iterator[TestClient]:
    c = client_as("viewer")
    app: Any = c.app
    app.dependency_overrides[traffic_api.policy_loader] = lambda: (
        lambda _session, ref: POLICIES[ref])
    app.dependency_overrides[traffic_api.inventory_loader] = lambda: (
        lambda _session: DRAFT.workloads)
    yield c


def store_of(client: TestClient) -> DuckDBFlowStore:
    s = client.app.state.flows  # type: ignore[attr-defined]
    assert isinstance(s, DuckDBFlowStore)
    return s


def load(client: TestClient, n: int, batches: int = 1) -> DuckDBFlowStore:
    s = store_of(client)
    for i in range(batches):
        s.append(make_batch(n, seed=i, start=T0 + timedelta(hours=6 * i)), batch_id=f"b{i}")
    return s


def pages(client: TestClient, url: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        r = client.get(url, params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def test_flows_page_through_without_gaps_or_duplicates(client: TestClient) -> None:
    load(client, 1200, batches=2)
    items = pages(client, API, {"limit": 500})
    assert len(items) == len({i["id"] for i in items}) == 2400
    assert [i["ts"] for i in items] == sorted(i["ts"] for i in items)
    assert items[0]["ts"].endswith("Z")
    newest = pages(client, API, {"limit": 700, "order": "desc"})
    assert [i["id"] for i in newest] == [i["id"] for i in reversed(items)]


def test_filters_select_what_the_store_selects(client: TestClient) -> None:
    s = load(client, 1500)
    params = {"src.app": "shop", "dst.role": "db,api", "proto": "tcp", "port": "3306,8000-8099",
              "from": "2025-03-01T01:00:00Z", "to": "2025-03-01T05:00:00+00:00"}
    items = pages(client, API, {**params, "limit": 50})
    s.set_workloads(DRAFT.workloads)
    flt = FlowFilter(start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=5),
                     src_labels=(("app", ("shop",)),), dst_labels=(("role", ("db", "api")),),
                     protos=(6,), ports=((3306, 3306), (8000, 8099)))
    assert len(items) == s.count(flt) > 0
    roles = {w.name: w.label("role") for w in DRAFT.workloads}
    assert all(roles[i["dst_workload"]] in ("db", "api") for i in items)
    assert all(i["dst_port"] in (3306, 8080) for i in items)
    r = client.get(API, params={"ip": "10.0.3.10", "decision": "allowed", "limit": 1000})
    assert all("10.0.3.10" in (i["src_ip"], i["dst_ip"]) and i["decision"] == "allowed"
               for i in r.json()["items"])


def test_grouping_pages_through_every_group(client: TestClient) -> None:
    load(client, 2000)
    items = pages(client, API, {"group_by": "src.app,dst.app,decision", "limit": 7})
    assert sum(i["flows"] for i in items) == 2000
    keys = [(i["src.app"], i["dst.app"], i["decision"]) for i in items]
    assert len(keys) == len(set(keys)) > 7
    conns = [i["connections"] for i in items]
    assert conns == sorted(conns, reverse=True)
    by_port = client.get(API, params={"group_by": "port", "order_by": "flows",
                                      "limit": 1000, "approx": "true"}).json()
    assert by_port["group_by"] == ["port"]
    assert {"proto", "dst_port", "flows", "sources", "first_seen"} <= set(by_port["items"][0])


BAD_QUERIES: list[tuple[dict[str, str], str]] = [
    ({"port": "70000"}, "query:port"),
    ({"proto": "tcpx"}, "query:proto"),
    ({"from": "yesterday"}, "query:from"),
    ({"decision": "dropped"}, "query:decision"),
    ({"src_ip": "10.0.0.0/40"}, "query:src_ip"),
    ({"colour": "red"}, "query:colour"),
    ({"group_by": "colour"}, "query:group_by"),
    ({"cursor": "garbage"}, "query:cursor"),
    ({"from": "2025-03-02T00:00:00Z", "to": "2025-03-01T00:00:00Z"}, "query:to"),
]


def test_bad_parameters_are_named(client: TestClient) -> None:
    for params, path in BAD_QUERIES:
        for url in (API, f"{API}/export.csv"):
            if url != API and "cursor" in params:
                continue
            r = client.get(url, params=params)
            assert r.status_code == 422, (params, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert path in [e["path"] for e in r.json()["errors"]], (params, r.text)


def test_csv_export_streams_every_row(client: TestClient) -> None:
    s = load(client, 6000, batches=2)  # more rows than one page may hold
    r = client.get(f"{API}/export.csv")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(r.text)))
    assert len(lines) == 12_000 == s.count()
    assert len({row["id"] for row in lines}) == 12_000
    r = client.get(f"{API}/export.csv", params={"proto": "udp", "dst.app": "shop"})
    s.set_workloads(DRAFT.workloads)
    want = s.count(FlowFilter(protos=(17,), dst_labels=(("app", ("shop",)),)))
    assert len(list(csv.DictReader(io.StringIO(r.text)))) == want > 0
    grouped = client.get(f"{API}/export.csv", params={"group_by": "decision"}).text
    rows = list(csv.DictReader(io.StringIO(grouped)))
    assert sum(int(row["flows"]) for row in rows) == 12_000
    empty = client.get(f"{API}/export.csv", params={"port": "1"}).text
    assert empty.startswith('"id","ts"') and empty.count("\n") == 1


def test_the_map_sums_to_the_traffic(client: TestClient) -> None:
    load(client, 800)
    body = client.get(f"{API}/map", params={"level": "app,env"}).json()
    assert sum(e["flows"] for e in body["items"]) == 800
    assert any(e["src"] == "(external)" for e in body["items"])


def reference(policy: Policy, item: dict[str, Any]) -> Any:
    return Evaluator(policy).decide(Flow(item["src_ip"], item["dst_ip"], item["proto"],
                                         item["dst_port"], item["process"], item["unit"],
                                         item["user"]))


@pytest.mark.parametrize("ref", ["draft", "7"])
def test_what_if_decisions_and_hit_counts_match_the_evaluator(client: TestClient,
                                                              ref: str) -> None:
    load(client, 900, batches=2)
    policy = POLICIES[ref]
    ev = Evaluator(policy)
    items: list[dict[str, Any]] = []
    cursor = None
    summary = None
    while True:
        r = client.post(f"{API}/what-if", json={"policy": ref, "limit": 400,
                                                "cursor": cursor})
        assert r.status_code == 200, r.text
        body = r.json()
        if cursor is None:
            summary = body["summary"]
        else:
            assert "summary" not in body
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert summary is not None and len(items) == 1800
    decisions: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    changes: Counter[tuple[str, str]] = Counter()
    for item in items:
        want = ev.decide(Flow(item["src_ip"], item["dst_ip"], item["proto"], item["dst_port"],
                              item["process"], item["unit"], item["user"]))
        assert (item["decision"], item["side"], tuple(item["rules"])) == \
            (want.decision, want.side, want.rules), item
        assert item["changed"] == (item["decision"] != item["reported_decision"])
        decisions[want.decision] += 1
        hits.update(want.rules)
        if want.decision != item["reported_decision"]:
            changes[(item["reported_decision"], want.decision)] += 1
    assert summary["flows"] == 1800
    assert {d: c["flows"] for d, c in summary["decisions"].items()} == dict(decisions)
    assert {h["rule"]: h["flows"] for h in summary["rules"]} == dict(hits)
    assert {(c["from"], c["to"]): c["flows"] for c in summary["changes"]} == dict(changes)
    assert len(hits) >= 4  # the data exercises several rules


def test_what_if_filters_and_versions(client: TestClient) -> None:
    load(client, 1000)
    body = client.post(f"{API}/what-if", json={
        "policy": "7", "filters": {"dst": "web-1", "port": 443}, "limit": 1000}).json()
    assert body["items"] and all(i["dst_workload"] == "web-1" and i["dst_port"] == 443
                                 for i in body["items"])
    # the https rule is gone in version 7: internet -> web-1:443 is blocked there
    ext = [i for i in body["items"] if i["src_workload"] is None and i["proto"] == 6]
    assert ext and all(i["decision"] == "blocked_no_rule" for i in ext)
    draft = client.post(f"{API}/what-if", json={"policy": "draft", "dst": "web-1",
                                                "port": [443], "limit": 1000}).json()
    assert all(i["decision"] == "allowed" and i["rules"] == ["web-in"]
               for i in draft["items"] if i["src_workload"] is None and i["proto"] == 6)
    assert draft["summary"]["flows"] == len(draft["items"])


def test_what_if_rejects_bad_requests(client: TestClient) -> None:
    for body, path in [({"policy": "latest"}, "policy"),
                       ({"policy": "draft", "filters": {"port": "x"}}, "filters.port"),
                       ({"policy": "draft", "colour": "red"}, "filters.colour"),
                       ({"policy": "draft", "cursor": "garbage"}, "cursor")]:
        r = client.post(f"{API}/what-if", json=body)
        assert r.status_code == 422, r.text
        assert path in [e["path"] for e in r.json()["errors"]], (body, r.text)


def test_what_if_uses_the_control_planes_policy_by_default(
        client_as: Callable[[str], TestClient]) -> None:
    """Without overrides the draft comes from `services.versions`: an empty control plane has
    no workloads, so every flow is `unknown`."""
    c = client_as("viewer")
    load(c, 50)
    r = c.post(f"{API}/what-if", json={"policy": "draft"})
    assert r.status_code == 200, r.text
    assert r.json()["summary"]["decisions"] == {"unknown": {"flows": 50, "connections": r.json()[
        "summary"]["connections"]}}


def test_traffic_needs_authentication(app_client: TestClient) -> None:
    assert app_client.get(API).status_code == 401
    assert app_client.post(f"{API}/what-if", json={}).status_code == 401


def test_the_service_parses_label_selectors_and_relative_times() -> None:
    f = traffic_svc.parse_filters([("src.app", "shop,blog"), ("src.app", "x"),
                                   ("dst.env", "prod"), ("from", "-2h"), ("workload", "a,b")])
    assert f.src_labels == (("app", ("shop", "blog", "x")),)
    assert f.dst_labels == (("env", ("prod",)),)
    assert f.workloads == ("a", "b") and f.start is not None


def test_a_relative_time_out_of_range_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="out of range"):
        traffic_svc.parse_time("-999999999d")
