"""Browser tests: Playwright (sync API) driving Debian's Chromium headless against a real server
(`harness.serve`) seeded with examples/policies/shop.yaml and examples/flows/shop.csv.

Tests marked ``@pytest.mark.browser`` are skipped when /usr/bin/chromium (or Playwright) is
missing; with ``BULKHEAD_REQUIRE_BROWSER=1`` (CI) they fail instead. Screenshots go to
``$BULKHEAD_ARTIFACTS`` (default build/artifacts/browser/).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.harness import ROOT, Live, seed_shop, serve

CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_ENV = "BULKHEAD_REQUIRE_BROWSER"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
_PLUGIN_NAME = "bulkhead-require-browser"


def browser_unavailable() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None


class _FailNoBrowser:
    """Fails the setup of browser tests when a browser is required but missing."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if item.get_closest_marker("browser"):
            pytest.fail(f"{REQUIRE_ENV}=1 but browser tests cannot run: {self.reason}",
                        pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("browser")]
    if not marked:
        return
    reason = browser_unavailable()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        if not config.pluginmanager.has_plugin(_PLUGIN_NAME):
            config.pluginmanager.register(_FailNoBrowser(reason), _PLUGIN_NAME)
        return
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=f"browser test: {reason}"))


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("BULKHEAD_ARTIFACTS") or ROOT / "build" / "artifacts" / "browser")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    """A fresh server per test, seeded with the shop example (policy version 1 + flows)."""
    with serve(tmp_path) as server:
        seed_shop(server)
        yield server


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest, artifacts: Path) -> Iterator[Any]:
    """A page in its own context; JavaScript errors fail the test; a screenshot of the last
    state is kept as an artefact."""
    context = browser.new_context(viewport={"width": 1400, "height": 900},
                                  accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        pg.screenshot(path=str(artifacts / f"{name}-final.png"), full_page=True)
    finally:
        context.close()
    assert not errors, f"JavaScript errors: {errors}"


def login(page: Any, live: Live) -> None:
    page.goto(live.url + "/")
    page.fill("#login-name", live.user)
    page.fill("#login-password", live.password)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector(f"#who:has-text('{live.user}')")
