"""The console's server side without a browser: static files and the map API, whose edge
decisions must equal the reference evaluator's, flow by flow."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bulkhead.flows.csvflows import read_flows_file
from bulkhead.policy.evaluate import Evaluator, Flow
from bulkhead.policy.fileformat import load_policy
from bulkhead.server.api.console import STATIC
from bulkhead.server.services.console_map import decision_class
from tests.browser.harness import SHOP_FLOWS, SHOP_POLICY, Live, seed_shop, serve


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with serve(tmp_path_factory.mktemp("console")) as live:
        seed_shop(live)
        yield live


def test_root_redirects_and_files_are_served_with_a_strict_policy(shop: Live) -> None:
    r = httpx.get(shop.url + "/")
    assert r.status_code == 307 and r.headers["location"] == "/console/"
    r = httpx.get(shop.url + "/console/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    r = httpx.get(shop.url + "/console/js/app.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert httpx.get(shop.url + "/console/policy").text == httpx.get(
        shop.url + "/console/").text  # client-side route: the shell
    assert httpx.get(shop.url + "/console/js/nope.js").status_code == 404
    r = httpx.get(shop.url + "/console/%2e%2e/%2e%2e/api/console.py")
    assert r.status_code == 404
    assert r.json()["detail"].startswith("path:")
    # a NUL byte is a 404 like any missing file, not a server error
    assert httpx.get(shop.url + "/console/js/app%00.js").status_code == 404
    assert httpx.get(shop.url + "/console/a%00b").status_code == 404


def test_every_module_the_console_imports_is_served(shop: Live) -> None:
    pattern = re.compile(r"""(?:from|import)\s*\(?\s*["'](\./[\w./-]+\.js)["']""")
    wanted = {"/console/js/app.js", "/console/css/console.css"}
    for js in (STATIC / "js").glob("*.js"):
        for rel in pattern.findall(js.read_text()):
            wanted.add("/console/js/" + rel[2:])
    for path in sorted(wanted):
        assert httpx.get(shop.url + path).status_code == 200, path
    assert len(wanted) >= 10


def oracle_edges(ref_policy: Path) -> dict[tuple[str, str, int], dict[str, int]]:
    """(src, dst, port) -> connections per decision class, by the reference evaluator."""
    policy = load_policy(str(ref_policy))
    ev = Evaluator(policy)
    owner = {ip: w.name for w in policy.workloads for ip in w.ips}
    f = read_flows_file(str(SHOP_FLOWS))
    out: dict[tuple[str, str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for i in range(len(f)):
        d = ev.decide(Flow(f.src_ip[i], f.dst_ip[i], int(f.proto[i]), int(f.dst_port[i]),
                           process=f.process[i] if f.process else None))
        key = (owner.get(f.src_ip[i], f"ip:{f.src_ip[i]}"),
               owner.get(f.dst_ip[i], f"ip:{f.dst_ip[i]}"), int(f.dst_port[i]))
        assert f.count is not None
        out[key][decision_class(d.decision)] += int(f.count[i])
    return out


def map_edges(body: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, int]]:
    e = body["edges"]
    classes = ("allowed", "potentially_blocked", "blocked", "unknown")
    return {(e["src"][i], e["dst"][i], e["port"][i]): {c: e[c][i] for c in classes if e[c][i]}
            for i in range(len(e["src"]))}


def test_map_decisions_equal_the_evaluator(shop: Live) -> None:
    with shop.client() as c:
        body = c.get("/console/map").json()
    assert body["policy"] == "active"
    got = map_edges(body)
    assert got == {k: dict(v) for k, v in oracle_edges(SHOP_POLICY).items()}
    assert got[("web-1", "api-1", 22)] == {"blocked": 1}
    assert body["workloads"]["web-1"]["labels"]["role"] == "web"
    e = body["edges"]
    rules = {(s, d, p): r for s, d, p, r in zip(e["src"], e["dst"], e["port"], e["rules"],
                                                strict=True)}
    assert rules[("web-dev", "pay-1", 443)] == ["pci-fence"]
    assert rules[("web-1", "api-1", 8080)] == ["web-api"]
    assert rules[("web-1", "api-1", 22)] == []


def test_map_filters_by_label_and_time_and_names_bad_input(shop: Live) -> None:
    with shop.client() as c:
        body = c.get("/console/map", params=[("label", "env=dev")]).json()
        assert {(s, d) for s, d in zip(body["edges"]["src"], body["edges"]["dst"],
                                       strict=True)} == {("web-dev", "pay-1"),
                                                         ("web-dev", "db-dev")}
        body = c.get("/console/map", params={"from": "2026-11-01T10:05:00Z"}).json()
        assert len(body["edges"]["src"]) == 5
        r = c.get("/console/map", params={"label": "nonsense"})
        assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query:label"
        r = c.get("/console/map", params={"policy": "latest"})
        assert r.status_code == 422 and r.json()["errors"][0]["path"] == "policy"
        r = c.get("/console/map", params={"colour": "red"})
        assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query:colour"
    assert httpx.get(shop.url + "/api/v1/console/map").status_code == 401


def test_map_of_the_draft_differs_from_the_active_policy(tmp_path: Path) -> None:
    with serve(tmp_path) as live:
        seed_shop(live)
        with live.client() as c:
            r = c.post("/rulesets/shop/rules", json={
                "id": "web-api-ssh", "action": "allow", "consumers": [{"labels": {"role": "web"}}],
                "providers": [{"labels": {"role": "api"}}], "services": ["ssh"]})
            assert r.status_code == 201, r.text
            draft = map_edges(c.get("/console/map", params={"policy": "draft"}).json())
            active = map_edges(c.get("/console/map").json())
    assert active[("web-1", "api-1", 22)] == {"blocked": 1}
    assert draft[("web-1", "api-1", 22)] == {"allowed": 1}
    assert {k: v for k, v in draft.items() if k != ("web-1", "api-1", 22)} == \
        {k: v for k, v in active.items() if k != ("web-1", "api-1", 22)}
