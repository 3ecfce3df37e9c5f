"""The console end to end in Chromium: log in, read the map, write a rule, preview its impact,
provision, and see the map's edge colours change; plus the other pages on the same data."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import login
from tests.browser.harness import Live

pytestmark = pytest.mark.browser


def open_map(page: Any, live: Live, level: str | None = None, policy: str | None = None) -> None:
    if page.url.endswith("#/map"):
        page.reload()  # a fresh page: default policy and level
    else:
        page.goto(live.url + "/console/#/map")
    page.wait_for_selector("#map-stat[data-edges]")
    if policy is not None:
        page.select_option("#map-policy", policy)
        page.wait_for_selector("#map-stat[data-edges]")
    if level is not None:
        page.select_option("#map-level", level)
        page.wait_for_selector("#map-stat[data-edges]")


def edge_decision(page: Any, label: str) -> str:
    row = page.locator(f"#map-edges tr[data-edge='{label}']")
    return str(row.get_attribute("data-decision"))


def test_login_is_required_and_wrong_password_is_refused(page: Any, live: Live) -> None:
    page.goto(live.url + "/")
    assert page.url.endswith("/console/")
    page.fill("#login-name", "owner")
    page.fill("#login-password", "not-the-password")
    page.click("#login-form button[type=submit]")
    err = page.wait_for_selector("#login-form .notice.error:not([hidden])")
    assert "invalid" in err.inner_text().lower() or "password" in err.inner_text().lower()
    assert page.evaluate("sessionStorage.getItem('bulkhead.token')") is None
    login(page, live)
    assert page.evaluate("sessionStorage.getItem('bulkhead.token')").startswith("bhs_")
    page.click("#logout")
    page.wait_for_selector("#login-form")
    assert page.evaluate("sessionStorage.getItem('bulkhead.token')") is None


def test_rule_impact_provision_recolours_the_map(page: Any, live: Live,
                                                 artifacts: Path) -> None:
    login(page, live)
    # the map by app+env: shop prod, shop dev, pay prod, ops prod and the outside world
    page.wait_for_selector("#map-stat[data-edges]")
    stats = page.evaluate("window.bulkheadMap.stats()")
    assert stats["nodes"] == 5 and stats["edges"] == 7
    assert edge_decision(page, "external→shop · prod") == "allowed"
    assert edge_decision(page, "shop · dev→pay · prod") == "blocked"
    page.screenshot(path=str(artifacts / "1-map-app-env.png"))

    # expand shop · prod to roles by clicking its node on the canvas
    canvas = page.locator("#map-canvas").bounding_box()
    i = page.evaluate("window.bulkheadMap.nodeIndex('shop · prod')")
    x, y = page.evaluate(f"window.bulkheadMap.nodePoint({i})")
    page.mouse.click(canvas["x"] + x, canvas["y"] + y)
    page.click("#node-expand")
    page.wait_for_selector("#map-edges tr[data-edge='shop · prod · web→shop · prod · api']")

    # workload level: web-1 → api-1 carries tcp/8080 (allowed) and tcp/22 (no rule: blocked)
    open_map(page, live, level="3")
    assert edge_decision(page, "web-1→api-1") == "blocked"
    i = page.evaluate("window.bulkheadMap.edgeIndex('web-1→api-1')")
    x, y = page.evaluate(f"window.bulkheadMap.edgePoint({i})")
    canvas = page.locator("#map-canvas").bounding_box()
    page.mouse.click(canvas["x"] + x, canvas["y"] + y)
    assert page.locator("#edge-title").inner_text() == "web-1 → api-1"
    page.wait_for_selector("#edge-rules li[data-rule='web-api']")
    page.wait_for_selector("#edge-flows table")
    flows = page.locator("#edge-flows tbody tr")
    assert flows.count() == 3  # two on 8080 (IPv4 and IPv6), one on 22
    assert "tcp/22" in page.locator("#map-detail").inner_text()
    page.screenshot(path=str(artifacts / "2-map-workloads-before.png"))

    # write a rule: web may ssh to api
    page.click("#nav a[href='#/policy']")
    page.wait_for_selector("#rule-form")
    page.select_option("#rule-ruleset", "shop")
    page.fill("#rule-id", "web-api-ssh")
    page.select_option("[data-picker=consumer] select[data-key=role]", "web")
    page.select_option("[data-picker=provider] select[data-key=role]", "api")
    page.select_option("#rule-services", ["ssh"])
    page.click("#rule-save")
    row = page.locator("tr[data-rule='web-api-ssh']")
    row.wait_for()
    assert "change-added" in (row.get_attribute("class") or "")
    assert "1 modified" in page.locator("#draft-state").inner_text()

    # its impact on recorded traffic, before provisioning: one blocked connection now allowed
    page.click("#impact-preview")
    page.wait_for_selector("#impact-result tr[data-impact='blocked']")
    assert page.locator("#impact-result tr[data-impact='blocked']").get_attribute(
        "data-delta") == "-1"
    assert page.locator("#impact-result tr[data-impact='allowed']").get_attribute(
        "data-delta") == "1"
    page.wait_for_selector("#impact-result tr[data-impact-rule='web-api-ssh']")
    page.screenshot(path=str(artifacts / "3-policy-impact.png"), full_page=True)

    # the map of the draft already shows it; the active policy does not yet
    open_map(page, live, level="3", policy="draft")
    assert edge_decision(page, "web-1→api-1") == "allowed"
    open_map(page, live, level="3")
    assert edge_decision(page, "web-1→api-1") == "blocked"

    # provision with a note
    page.click("#nav a[href='#/policy']")
    page.wait_for_selector("#provision")
    page.fill("#provision-note", "web may ssh to api")
    page.click("#provision")
    page.wait_for_selector("#policy-msg .notice.ok:has-text('Provisioned version 2')")
    page.wait_for_selector("#versions tr[data-version='2']")

    # the active map recoloured
    open_map(page, live, level="3")
    assert edge_decision(page, "web-1→api-1") == "allowed"
    assert edge_decision(page, "web-1→db-1") == "blocked"
    page.screenshot(path=str(artifacts / "4-map-workloads-after.png"))
    with live.client() as c:
        v = c.get("/policy/versions").json()["items"][0]
        assert (v["id"], v["note"]) == (2, "web may ssh to api")


def test_traffic_explorer_filters_groups_and_exports(page: Any, live: Live) -> None:
    login(page, live)
    page.click("#nav a[href='#/traffic']")
    page.wait_for_selector("#traffic-count:has-text('12 flows')")
    page.fill("#traffic-filter", "dst.app=pay")
    page.click("#traffic-run")
    page.wait_for_selector("#traffic-count:has-text('2 flows')")
    page.check("#traffic-group input[value=src_workload]")
    page.click("#traffic-run")
    page.wait_for_selector("#traffic-count:has-text('2 groups')")
    cells = page.locator("#traffic-result tbody tr td:first-child").all_inner_texts()
    assert sorted(cells) == ["api-1", "web-dev"]
    with page.expect_download() as info:
        page.click("#traffic-export")
    text = Path(info.value.path()).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["src_workload"]: int(r["connections"]) for r in rows} == {"api-1": 12, "web-dev": 3}
    # an unknown filter is refused with the parameter named
    page.fill("#traffic-filter", "colour=red")
    page.click("#traffic-run")
    assert "query:colour" in page.locator("#traffic-result .notice.error").inner_text()


def test_workloads_labels_and_enforcement(page: Any, live: Live) -> None:
    login(page, live)
    page.click("#nav a[href='#/workloads']")
    page.wait_for_selector("#wl-count:has-text('8 workloads')")
    page.fill("#wl-search", "web")
    page.click("#wl-list ~ * button, form.toolbar button.primary")
    page.wait_for_selector("#wl-count:has-text('3 workloads')")
    # edit labels of web-dev: env dev -> staging
    page.click("tr[data-workload='web-dev'] td:nth-child(2)")
    page.fill("input[data-label-key=env]", "staging")
    page.click("#wl-save")
    page.wait_for_selector("#wl-msg .notice.ok")
    # single: db-1 to full; bulk: web-1 and web-2 to visibility
    page.fill("#wl-search", "")
    page.click("form.toolbar button.primary")
    page.wait_for_selector("#wl-count:has-text('8 workloads')")
    page.select_option("select[data-enforcement='db-1']", "full")
    page.wait_for_selector("#wl-msg .notice.ok:has-text('1 workload')")
    page.check("tr[data-workload='web-1'] input.wl-check")
    page.check("tr[data-workload='web-2'] input.wl-check")
    page.select_option("#wl-bulk-state", "visibility")
    page.click("#wl-bulk-apply")
    page.wait_for_selector("#wl-msg .notice.ok:has-text('2 workload')")
    with live.client() as c:
        got = {w["name"]: w for w in c.get("/workloads").json()["items"]}
    assert got["web-dev"]["labels"]["env"] == "staging"
    assert got["db-1"]["enforcement"] == "full"
    assert got["web-1"]["enforcement"] == got["web-2"]["enforcement"] == "visibility"
    assert got["api-1"]["enforcement"] == "full"


def test_versions_diff_revert_events_and_audit(page: Any, live: Live) -> None:
    login(page, live)
    page.click("#nav a[href='#/policy']")
    page.wait_for_selector("tr[data-rule='admin-ssh']")
    page.click("button[data-delete-rule='admin-ssh']")
    page.wait_for_selector("#policy-msg .notice.ok:has-text('admin-ssh')")
    page.wait_for_selector("tr.change-deleted[data-rule='admin-ssh']")
    page.click("button[data-diff='1']")
    page.wait_for_selector("#diff li.change-modified:has-text('ruleset shop')")
    page.click("button[data-revert='1']")
    page.wait_for_selector("#policy-msg .notice.ok:has-text('reverted to version 1')")
    page.wait_for_selector("tr[data-rule='admin-ssh']:not(.change-deleted)")
    assert page.locator("#rulesets tr[class*='change-']").count() == 0
    page.click("#nav a[href='#/audit']")
    page.wait_for_selector(".audit-row:has-text('policy.revert')")
    page.fill("#audit-action", "rule.delete")
    page.click("form.toolbar button.primary")
    page.wait_for_selector("#audit-count:text-is('1 entry')")
    assert page.locator(".audit-row").count() == 1
    page.click(".audit-row")
    assert "admin-ssh" in page.locator("#audit-detail").inner_text()
    page.click("#nav a[href='#/events']")
    page.wait_for_selector(".events-row:has-text('provisioned')")


def test_generate_rules_preview_and_provision(page: Any, live: Live, artifacts: Path) -> None:
    login(page, live)
    page.wait_for_selector("#map-stat[data-edges]")
    assert edge_decision(page, "shop · prod→shop · prod") == "blocked"
    page.click("#nav a[href='#/policy']")
    page.click("#generate-run")
    page.wait_for_selector("#generate-result tr.selected[data-candidate]")
    generated = page.locator("#generate-candidate li[data-generated-rule]")
    assert generated.count() >= 1
    text = " ".join(generated.all_inner_texts())
    assert "web-1" in text and "api-1" in text  # the ssh flow no rule allowed
    page.click("#generate-apply")
    page.wait_for_selector("#policy-msg .notice.ok:has-text('added to the draft')")
    page.wait_for_selector("[data-ruleset] .badge.added")
    page.click("#impact-preview")
    page.wait_for_selector("#impact-result tr[data-impact='blocked']")
    assert int(page.locator("#impact-result tr[data-impact='blocked']").get_attribute(
        "data-delta") or "0") < 0
    page.screenshot(path=str(artifacts / "5-generate-impact.png"), full_page=True)
    page.fill("#provision-note", "generated from traffic")
    page.click("#provision")
    page.wait_for_selector("#policy-msg .notice.ok:has-text('Provisioned version 2')")
    open_map(page, live, level="3")
    assert edge_decision(page, "web-1→api-1") == "allowed"  # was blocked (tcp/22, no rule)
    page.screenshot(path=str(artifacts / "6-map-after-generate.png"))


def test_a_viewer_reads_but_cannot_change(page: Any, live: Live) -> None:
    with live.client() as c:
        r = c.post("/users", json={"name": "vera", "password": "viewer-password-1",
                                   "role": "viewer"})
        assert r.status_code == 201, r.text
    login(page, Live(live.url, live.app, "vera", "viewer-password-1"))
    page.wait_for_selector("#map-stat[data-edges]")
    assert page.locator("#nav a[href='#/audit']").is_hidden()
    page.click("#nav a[href='#/policy']")
    page.fill("#rule-id", "nope")
    page.click("#rule-save")
    err = page.wait_for_selector("#policy-msg .notice.error")
    assert "policy:write" in err.inner_text()
    page.goto(live.url + "/console/#/audit")
    assert "audit:read" in page.wait_for_selector("#audit-list .notice.error").inner_text()
    with live.client() as c:
        assert all(r["rules"] for r in c.get("/rulesets").json())
        assert not [r for rs in c.get("/rulesets").json() for r in rs["rules"]
                    if r.get("id") == "nope"]
