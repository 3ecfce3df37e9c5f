"""Shared helpers of the agent-sensor tests: hex fixtures and a privileged two-host lab."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bulkhead.lab.netns import HostSpec, NetnsLab, privileged_available

DATA = Path(__file__).parent / "data"
A = HostSpec("a", "10.99.0.11", "fd00:99::11")
B = HostSpec("b", "10.99.0.12", "fd00:99::12")
A4, A6, B4, B6 = "10.99.0.11", "fd00:99::11", "10.99.0.12", "fd00:99::12"
# Conntrack is instantiated in a namespace only once a rule uses it; group 7 is the NFLOG
# group of the log rules (the compiled ruleset's prefixes: bh:<o|d>:<instance>, bh:n:-).
RULES = """table inet bhtest {
\tchain o {
\t\ttype filter hook output priority 0;
\t\tct state established accept
\t}
\tchain i {
\t\ttype filter hook input priority 0;
\t\tct state established accept
\t\ttcp dport 81 log prefix "bh:d:3" group 7 drop
\t\tudp dport 54 log prefix "bh:n:-" group 7 drop
\t\ttcp dport 82 log prefix "bh:o:12" group 7 accept
\t}
}
"""


def buffers(name: str) -> list[bytes]:
    """The recv() buffers of a fixture file (hex, one per line, `#` comments)."""
    lines = (DATA / name).read_text().splitlines()
    return [bytes.fromhex(ln) for ln in lines if ln.strip() and not ln.startswith("#")]


def require_privileged() -> None:
    reason = privileged_available()
    if reason is None:
        return
    if os.environ.get("BULKHEAD_REQUIRE_PRIVILEGED") == "1":
        pytest.fail(f"privileged test cannot run ({reason}) but BULKHEAD_REQUIRE_PRIVILEGED=1")
    pytest.skip(reason)


@contextmanager
def two_hosts(rules: bool = True) -> Iterator[NetnsLab]:
    """Hosts a and b on one bridge, each with RULES loaded; torn down on exit."""
    require_privileged()
    with NetnsLab([A, B]) as lab:
        if rules:
            for host in ("a", "b"):
                lab.nft(host, RULES)
        yield lab
