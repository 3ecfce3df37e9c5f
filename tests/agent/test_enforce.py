"""Enforcement: render, check, apply, read back, detect tamper, remove.

The first tests record the commands the enforcer runs (no root needed); the privileged ones
program a real network namespace with nft."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence

import pytest

from bulkhead.agent.enforce import ApplyError, Enforcer, Snapshot, diff_text, host_context
from bulkhead.agent.tamper import TamperWatch
from bulkhead.dataplane.model import CompiledRule, CompiledWorkload, Endpoint, HostContext, PeerSet
from bulkhead.domain.ports import PortSpec
from bulkhead.lab.netns import HostSpec, NetnsLab, privileged_available
from bulkhead.policy.resolve import ResolvedService

CTX = HostContext(control_plane=(Endpoint("10.99.0.2", 8443),))


def workload(enforcement: str, *, process: str | None = None) -> CompiledWorkload:
    rule = CompiledRule("allow", PeerSet(frozenset({"10.99.0.11"})),
                        (ResolvedService(PortSpec(6, 5432, 5432), process, None),), "web-db", 0)
    return CompiledWorkload("db", ("10.99.0.13",), enforcement, "linux", "enforce",
                            inbound=(rule,))


class Recorder:
    def __init__(self, fail: dict[str, str] | None = None, listing: str = "") -> None:
        self.calls: list[tuple[list[str], str]] = []
        self.fail = fail or {}
        self.listing = listing

    def __call__(self, argv: Sequence[str], stdin: str) -> tuple[int, str, str]:
        self.calls.append((list(argv), stdin))
        key = " ".join(argv[:2])
        if key in self.fail:
            return 1, "", self.fail[key]
        if argv[:2] == ["nft", "-j"]:
            return 0, self.listing, ""
        return 0, "", ""


LISTING = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6"}},
    {"table": {"family": "inet", "name": "bulkhead", "handle": 3}},
    {"chain": {"family": "inet", "table": "bulkhead", "name": "input", "handle": 1}},
    {"rule": {"chain": "input", "handle": 4, "expr": [{"counter": {"packets": 9, "bytes": 99}},
                                                       {"accept": None}]}}]})


def test_check_then_apply_then_read_back() -> None:
    rec = Recorder(listing=LISTING)
    enf = Enforcer(backend="nft", run=rec)
    assert enf.apply(workload("full"), CTX) == "full"
    argvs = [c[0] for c in rec.calls]
    assert argvs == [["nft", "-c", "-f", "-"], ["nft", "-f", "-"],
                     ["nft", "-j", "list", "table", "inet", "bulkhead"]]
    script = rec.calls[0][1]
    assert script == rec.calls[1][1] and "delete table inet bulkhead" in script
    assert "ip saddr 10.99.0.2 tcp sport 8443 counter accept" in script  # never cut off
    assert enf.expected is not None and enf.expected.present


def test_a_rejected_ruleset_is_never_applied() -> None:
    rec = Recorder(fail={"nft -c": "Error: syntax error"})
    enf = Enforcer(backend="nft", run=rec)
    with pytest.raises(ApplyError, match="nft -c rejected the ruleset: Error: syntax error"):
        enf.apply(workload("full"), CTX)
    assert [c[0][:2] for c in rec.calls] == [["nft", "-c"]]


def test_counters_and_handles_do_not_count_as_changes() -> None:
    rec = Recorder(listing=LISTING)
    enf = Enforcer(backend="nft", run=rec)
    enf.apply(workload("full"), CTX)
    rec.listing = LISTING.replace('"packets": 9', '"packets": 12').replace('"handle": 4',
                                                                           '"handle": 40')
    assert enf.check() == (False, "")
    rec.listing = LISTING.replace('{"accept": null}', '{"drop": null}')
    changed, detail = enf.check()
    assert changed and detail == "table inet bulkhead modified: changed: rule in chain input #0"


def test_a_listing_failure_is_not_tamper() -> None:
    rec = Recorder(listing=LISTING)
    enf = Enforcer(backend="nft", run=rec)
    enf.apply(workload("full"), CTX)
    rec.fail = {"nft -j": "Error: cannot lock"}
    res = TamperWatch(enf).check()
    assert not res.changed and "cannot lock" in res.error


def test_diff_text_names_what_changed() -> None:
    a = Snapshot(True, "a", {"chain input": "x", "rule in chain input #0": "r"})
    assert diff_text("bulkhead", a, Snapshot(False, "", {})) == \
        "table inet bulkhead was removed (ruleset flushed or table deleted)"
    b = Snapshot(True, "b", {"chain input": "x", "chain evil": "y"})
    assert diff_text("bulkhead", a, b) == ("table inet bulkhead modified: removed: rule in "
                                           "chain input #0; added: chain evil")


def test_iptables_backend_runs_the_restore_steps_in_order() -> None:
    rec = Recorder()
    enf = Enforcer(backend="iptables", run=rec, iptables_backend="legacy")
    enf.apply(workload("selective"), CTX)
    tools = [c[0][0] for c in rec.calls]
    assert tools[:5] == ["ipset", "sh", "iptables-legacy-restore", "ip6tables-legacy-restore",
                         "sh"]
    assert tools[5:] == ["iptables-legacy-save", "ip6tables-legacy-save"]


def test_host_context_maps_bound_services_to_listener_cgroups() -> None:
    cw = workload("full", process="postgres")
    ctx = host_context(cw, [Endpoint("10.0.0.9", 443)], [
        ("nginx", None, "/system.slice/nginx.service"),
        ("postgres", "postgresql.service", "/system.slice/postgresql.service")],
        cgroup_base=("unified", 0))
    assert ctx.cgroups == {"postgres": ("unified/system.slice/postgresql.service", 2)}
    assert ctx.control_plane == (Endpoint("10.0.0.9", 443),)


# -- privileged: a real namespace ------------------------------------------------------------
@pytest.fixture(scope="module")
def lab() -> Iterator[NetnsLab]:
    reason = privileged_available()
    if reason is not None:
        pytest.skip(f"privileged test: {reason}")
    with NetnsLab([HostSpec("db", "10.99.0.13"), HostSpec("web", "10.99.0.11")]) as lab:
        lab.serve("db", tcp=[5432, 6000])
        yield lab


def ns_runner(lab: NetnsLab):  # type: ignore[no-untyped-def]
    def run(argv: Sequence[str], stdin: str) -> tuple[int, str, str]:
        cp = subprocess.run(["nsenter", f"--net={lab.netns_path('db')}", *argv], input=stdin,
                            capture_output=True, text=True, timeout=30, check=False)
        return cp.returncode, cp.stdout, cp.stderr
    return run


@pytest.mark.privileged
def test_four_states_tamper_and_remove_in_a_namespace(lab: NetnsLab) -> None:
    enf = Enforcer(backend="nft", run=ns_runner(lab))
    probes = [("10.99.0.13", "tcp", 5432), ("10.99.0.13", "tcp", 6000)]
    want = {"idle": ["open", "open"], "visibility": ["open", "open"],
            "selective": ["open", "open"], "full": ["open", "timeout"]}
    for state in ("visibility", "full", "selective", "idle", "full"):
        assert enf.apply(workload(state), CTX) == state
        assert lab.probe("web", probes, timeout=0.5) == want[state], state
        assert enf.check() == (False, "")
    lab.run("db", ["nft", "add", "rule", "inet", "bulkhead", "input", "tcp", "dport", "6000",
                   "accept"])
    changed, detail = enf.check()
    assert changed and "added: rule in chain input" in detail
    lab.run("db", ["nft", "flush", "ruleset"])
    assert enf.check() == (True, "table inet bulkhead was removed (ruleset flushed or table "
                                 "deleted)")
    enf.apply(workload("full"), CTX)  # restore
    assert lab.probe("web", probes, timeout=0.5) == want["full"]
    # a broken update leaves the last good ruleset in place
    with pytest.raises(ApplyError):
        enf.apply(workload("full"), HostContext(table="bad name"))
    assert lab.probe("web", probes, timeout=0.5) == want["full"]
    enf.remove(CTX)
    assert lab.run("db", ["nft", "list", "tables"]).stdout.strip() == ""
    assert lab.probe("web", probes, timeout=0.5) == ["open", "open"]
