"""Privileged tests: real network namespaces, nftables, iptables (root only).

Tests marked ``@pytest.mark.privileged`` are skipped, with the reason from
`privileged_available()`, when this machine cannot run them. With
``BULKHEAD_REQUIRE_PRIVILEGED=1`` (CI) they fail instead, so a CI job that silently lost
its privileges does not go green.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from bulkhead.lab.netns import HostSpec, NetnsLab, privileged_available

REQUIRE_ENV = "BULKHEAD_REQUIRE_PRIVILEGED"
_PLUGIN_NAME = "bulkhead-require-privileged"


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


class _FailUnprivileged:
    """Plugin (registered only when needed) failing the setup of unrunnable privileged tests.

    A plugin rather than a hook of this conftest: conftest runtest hooks only apply to
    tests below this directory, and privileged tests may live elsewhere too.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if item.get_closest_marker("privileged"):
            pytest.fail(
                f"{REQUIRE_ENV}=1 but privileged tests cannot run: {self.reason}", pytrace=False
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest's collection hook sees every collected item, not only those below it.
    privileged = [item for item in items if item.get_closest_marker("privileged")]
    if not privileged:
        return
    reason = privileged_available()  # creates and deletes a throwaway namespace: once
    if reason is None:
        return
    if _required():
        if not config.pluginmanager.has_plugin(_PLUGIN_NAME):
            config.pluginmanager.register(_FailUnprivileged(reason), _PLUGIN_NAME)
        return
    for item in privileged:
        item.add_marker(pytest.mark.skip(reason=f"privileged test: {reason}"))


LabFactory = Callable[..., NetnsLab]


@pytest.fixture
def netns_lab() -> Iterator[LabFactory]:
    """Factory: ``lab = netns_lab([HostSpec(...), ...], **NetnsLab kwargs)``, already up.

    Every lab built through it is torn down after the test, even when the test failed.
    """
    labs: list[NetnsLab] = []

    def make(hosts: Sequence[HostSpec], **kwargs: Any) -> NetnsLab:
        lab = NetnsLab(hosts, **kwargs)
        labs.append(lab)
        lab.up()
        return lab

    yield make
    errors: list[BaseException] = []
    for lab in reversed(labs):
        try:
            lab.down()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
