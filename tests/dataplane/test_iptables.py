"""The iptables renderer: golden files, an interpreter of our own scripts checked flow by flow
against the evaluator (the oracle), and privileged tests in throwaway network namespaces:
`iptables-restore --test` on every golden, apply twice / read back / update / remove beside a
foreign rule and set, the xt_cgroup path finding, and real packets.

Regenerate the golden files with
`BULKHEAD_UPDATE_GOLDEN=1 pytest tests/dataplane/test_iptables.py`.
Privileged tests need root, ip, nsenter, iptables-legacy, ipset and setpriv; they skip
otherwise, unless BULKHEAD_REQUIRE_PRIVILEGED=1, where a skip would hide a failure, so they
fail instead.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from bulkhead.dataplane.iptables import (
    MULTIPORT_SLOTS,
    SET_MAXELEM,
    IptablesArtifact,
    remove_iptables,
    render_iptables,
    restore_commands,
    xt_cgroup_path,
)
from bulkhead.dataplane.model import (
    CompiledRule,
    CompiledWorkload,
    Endpoint,
    HostContext,
    PeerSet,
)
from bulkhead.domain.addresses import AddressSet
from bulkhead.domain.model import Policy
from bulkhead.domain.ports import ICMP_PROTOS, PORTED, PortSpec
from bulkhead.policy.compile import compile_naive
from bulkhead.policy.evaluate import Evaluator, Flow
from bulkhead.policy.fileformat import load_policy, loads_policy
from bulkhead.policy.resolve import ResolvedService
from tests.dataplane.test_nftables import FEATURES, OUTBOUND_ALLOW

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "iptables"
SHOP = ROOT / "examples" / "policies" / "shop.yaml"
STATES = ("idle", "visibility", "selective", "full")
UPDATE = os.environ.get("BULKHEAD_UPDATE_GOLDEN") == "1"

# FEATURES and OUTBOUND_ALLOW come from the nftables renderer's tests, so the golden files of
# both renderers describe the same workloads: label peers (v4+v6), IP-list peers (CIDRs,
# ranges, single addresses), shared sets, every protocol shape, process- and unit-bound
# services (with and without a known cgroup), `local`, user groups (with and without uids),
# an empty peer group, an odd and a 128-character rule id.

# A wide port list (multiport splitting) and whole-address-space peers (hash:net has no /0).
WIDE = """
version: 1
ip_lists:
  - {name: anywhere, cidrs: ["0.0.0.0/0", "::/0"]}
services:
  - {name: many, ports: ["tcp/1", "tcp/3", "tcp/5", "tcp/7", "tcp/9", "tcp/11", "tcp/13",
                         "tcp/15", "tcp/17", "tcp/19", "tcp/21-22", "tcp/25-26", "tcp/29",
                         "tcp/31", "tcp/33", "tcp/35", "udp/1000-2000", "udp/3000"]}
workloads:
  - {name: gw, ips: [10.3.0.1, "fd03::1"], labels: {role: gw}, managed: true, enforcement: full}
  - {name: peer, ips: [10.3.0.2], labels: {role: peer}}
rulesets:
  - name: w
    rules:
      - {id: world-many, action: allow, consumers: [{ip_list: anywhere}],
         providers: [{labels: {role: gw}}], services: [many]}
      - {id: gw-out, action: allow, consumers: [{labels: {role: gw}}],
         providers: [{ip_list: anywhere}], services: ["tcp/443", "udp/53"]}
      - {id: no-peer, action: override_deny, consumers: [{labels: {role: peer}}],
         providers: [{labels: {role: gw}}], services: ["tcp/22"]}
"""

CG_BASE = "bulkhead-ipt-test"  # golden cgroups live here, relative to the cgroup2 root


def context(cgroup_prefix: str = f"unified/{CG_BASE}") -> HostContext:
    """The host context of the golden files; `cgroup_prefix` relocates the cgroups (as nft
    names them: relative to /sys/fs/cgroup)."""
    return HostContext(
        control_plane=(Endpoint("192.0.2.10", 8443), Endpoint("2001:db8::10")),
        cgroups={"mysqld": (f"{cgroup_prefix}/mysqld", 2),
                 "snmpd.service": (f"{cgroup_prefix}/snmpd.service", 2)},
        uids={"alice": 1001, "carol": 1003, "root": 0})


def _policy(text: str, name: str) -> Policy:
    return loads_policy(text, name)


@dataclass(frozen=True)
class Case:
    golden: str  # path under GOLDEN
    make: Callable[[str], IptablesArtifact]  # cgroup prefix -> artefact


def _case(golden: str, cw: CompiledWorkload, ctx: Callable[[str], HostContext] = context,
          **kw: Any) -> Case:
    return Case(golden, lambda prefix: render_iptables(cw, ctx(prefix), **kw))


def cases() -> list[Case]:
    out: list[Case] = []
    shop = compile_naive(load_policy(str(SHOP)))
    out += [_case(f"shop/{name}.txt", shop[name]) for name in sorted(shop)]
    feats = compile_naive(_policy(FEATURES, "features.yaml"))
    out += [_case(f"features/srv.{s}.txt", replace(feats["srv"], enforcement=s)) for s in STATES]
    out += [_case(f"features/{n}.txt", feats[n]) for n in ("web-1", "db-1", "ws")]
    out.append(_case("features/srv.bare-context.txt", feats["srv"],
                     lambda _p: HostContext(table="bh_test", nflog_group=42)))
    out.append(_case("features/srv.port-mode.txt", feats["srv"], inbound_process="port"))
    allow = compile_naive(_policy(OUTBOUND_ALLOW, "outbound-allow.yaml"))
    out += [_case(f"outbound-allow/app.{s}.txt", replace(allow["app"], enforcement=s))
            for s in STATES]
    wide = compile_naive(_policy(WIDE, "wide.yaml"))
    out.append(_case("wide/gw.txt", wide["gw"]))
    out.append(Case("remove.txt", lambda _p: remove_iptables(HostContext())))
    return out


CASES = cases()


# -- golden files -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.golden for c in CASES])
def test_golden(case: Case) -> None:
    text = case.make(f"unified/{CG_BASE}").text()
    path = GOLDEN / case.golden
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with BULKHEAD_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path} differs; review, then BULKHEAD_UPDATE_GOLDEN=1"


def test_no_stale_golden_files() -> None:
    expected = {c.golden for c in CASES}
    found = {str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*.txt")}
    assert found <= expected, f"golden files without a case: {sorted(found - expected)}"


# -- helpers for the structure tests ------------------------------------------------------------

def _cw(inbound: tuple[CompiledRule, ...] = (), outbound: tuple[CompiledRule, ...] = (),
        enforcement: str = "full", mode: str = "enforce") -> CompiledWorkload:
    return CompiledWorkload("w", ("10.0.0.1", "fd00::1"), enforcement, "linux", mode,
                            inbound, outbound)


def _svc(*specs: str, process: str | None = None, unit: str | None = None
         ) -> tuple[ResolvedService, ...]:
    return tuple(ResolvedService(PortSpec.parse(s), process, unit) for s in specs)


def _rule(action: str = "allow", hosts: tuple[str, ...] = ("10.0.0.2",),
          nets: tuple[str, ...] = (), services: tuple[ResolvedService, ...] = _svc("tcp/443"),
          rule_id: str = "r", instance: int = 0, **kw: Any) -> CompiledRule:
    return CompiledRule(action, PeerSet(frozenset(hosts), AddressSet.from_blocks(nets)),
                        services, rule_id, instance, **kw)


def _chain_lines(script: str, chain: str) -> list[str]:
    """`-A CHAIN ...` lines of one chain, without the `-A CHAIN ` head."""
    head = f"-A {chain} "
    return [ln[len(head):] for ln in script.splitlines() if ln.startswith(head)]


_SECTIONS = ("# essential traffic", "# override_deny rules", "# allow rules", "# deny rules",
             "# default (no rule)")


def _policy_lines(script: str, chain: str) -> list[str]:
    """Rules and notes of the policy part of a chain: no essential rules, no default."""
    lines = script.splitlines()
    head = f"-A {chain} "
    idx = [i for i, ln in enumerate(lines) if ln.startswith(head)]
    out = []
    for ln in lines[idx[0]:idx[-1] + 1] if idx else []:
        if ln.startswith(head):
            body = ln[len(head):]
            if "essential:" not in body and "default: no rule" not in body:
                out.append(body)
        elif ln.startswith("# ") and not ln.startswith(_SECTIONS):
            out.append(ln)
    return out


def _in(cw: CompiledWorkload, ctx: HostContext | None = None, v: int = 4, **kw: Any) -> list[str]:
    art = render_iptables(cw, ctx or HostContext(), **kw)
    return _policy_lines(art.v4 if v == 4 else art.v6, "BULKHEAD-IN")


def _out(cw: CompiledWorkload, ctx: HostContext | None = None, v: int = 4) -> list[str]:
    art = render_iptables(cw, ctx or HostContext())
    return _policy_lines(art.v4 if v == 4 else art.v6, "BULKHEAD-OUT")


def _srv(state: str = "full", **kw: Any) -> IptablesArtifact:
    feats = compile_naive(_policy(FEATURES, "features.yaml"))
    return render_iptables(replace(feats["srv"], enforcement=state), context(), **kw)


# -- layout -------------------------------------------------------------------------------------

def _kind(rule: str) -> int:
    """0 essential, 1 override_deny, 2 allow, 3 deny, 4 default."""
    if "essential:" in rule:
        return 0
    for k, mark in ((1, '"bh:o:'), (3, '"bh:d:'), (4, '"bh:n:-"')):
        if mark in rule:
            return k
    if "default: no rule" in rule:
        return 4
    if re.search(r"--nflog-prefix \"bh:o:", rule):
        return 1
    return 2


def _kinds(lines: list[str]) -> list[int]:
    """Kinds in chain order; the verdict rule after an NFLOG rule takes its kind."""
    out: list[int] = []
    for i, ln in enumerate(lines):
        if ln.endswith(("-j DROP", "-j ACCEPT")) and i and "-j NFLOG" in lines[i - 1] and (
                ln.rsplit(" -j ", 1)[0] == lines[i - 1].rsplit(" -j ", 1)[0]):
            out.append(out[-1])
        else:
            out.append(_kind(ln))
    return out


@pytest.mark.parametrize("v", [4, 6])
def test_one_transaction_with_our_chains_and_hooks(v: int) -> None:
    art = _srv()
    script = art.v4 if v == 4 else art.v6
    body = [ln for ln in script.splitlines() if not ln.startswith("#")]
    assert body[:7] == ["*filter", ":BULKHEAD-IN - [0:0]", ":BULKHEAD-OUT - [0:0]",
                        "-D INPUT -j BULKHEAD-IN", "-I INPUT 1 -j BULKHEAD-IN",
                        "-D OUTPUT -j BULKHEAD-OUT", "-I OUTPUT 1 -j BULKHEAD-OUT"]
    assert body[-1] == "COMMIT" and body.count("COMMIT") == 1 and body.count("*filter") == 1
    # nothing but our own chains is appended to, flushed or deleted
    for ln in body[7:-1]:
        assert ln.startswith(("-A BULKHEAD-IN ", "-A BULKHEAD-OUT ")), ln
    assert art.hooks == (("INPUT", "BULKHEAD-IN"), ("OUTPUT", "BULKHEAD-OUT")) and art.hooked


@pytest.mark.parametrize("chain", ["BULKHEAD-IN", "BULKHEAD-OUT"])
def test_chain_order_essential_then_precedence_then_default(chain: str) -> None:
    lines = _chain_lines(_srv().v4, chain)
    kinds = _kinds(lines)
    assert kinds == sorted(kinds), chain
    assert kinds[-2:] == [4, 4] and kinds.count(4) == 2
    assert {2, 3} <= set(kinds) and (chain == "BULKHEAD-OUT" or 1 in kinds)
    lo = "-i lo" if chain == "BULKHEAD-IN" else "-o lo"
    assert lines[0] == f'{lo} -m comment --comment "essential: loopback" -j ACCEPT'
    assert lines[1] == ("-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "
                        '"essential: established/related" -j ACCEPT')
    assert lines[-2:] == [
        '-m comment --comment "default: no rule" -j NFLOG --nflog-prefix "bh:n:-" '
        "--nflog-group 7", '-m comment --comment "default: no rule" -j DROP']


def test_essential_traffic() -> None:
    art = _srv()
    in4, out4 = _chain_lines(art.v4, "BULKHEAD-IN"), _chain_lines(art.v4, "BULKHEAD-OUT")
    in6, out6 = _chain_lines(art.v6, "BULKHEAD-IN"), _chain_lines(art.v6, "BULKHEAD-OUT")
    cp = '-m comment --comment "essential: control plane" -j ACCEPT'
    assert f"-s 192.0.2.10/32 -p tcp -m tcp --sport 8443 {cp}" in in4
    assert f"-d 192.0.2.10/32 -p tcp -m tcp --dport 8443 {cp}" in out4
    assert f"-s 2001:db8::10/128 -p tcp {cp}" in in6
    assert f"-d 2001:db8::10/128 -p tcp {cp}" in out6
    assert not [ln for ln in in4 + out4 if "2001:db8::10" in ln]
    assert any(ln.startswith("-p udp -m udp --sport 67 --dport 68 ") for ln in in4)
    assert any(ln.startswith("-p udp -m udp --dport 67 ") for ln in out4)
    assert any(ln.startswith("-p udp -m udp --dport 546 ") for ln in in6)
    assert any(ln.startswith("-p udp -m udp --dport 547 ") for ln in out6)
    for lines in (in4, out4):
        types = {int(m) for ln in lines for m in re.findall(r"--icmp-type (\d+) .*essential", ln)}
        assert types == {3, 11, 12}
    for lines in (in6, out6):
        types = {int(m) for ln in lines
                 for m in re.findall(r"--icmpv6-type (\d+) .*essential", ln)}
        assert types == {1, 2, 3, 4, 130, 131, 132, 133, 134, 135, 136, 137, 143}
    # essential rules come before every policy rule and all accept
    for lines in (in4, out4, in6, out6):
        n = sum(1 for ln in lines if "essential:" in ln)
        assert all("essential:" in ln and ln.endswith("-j ACCEPT") for ln in lines[:n])


@pytest.mark.parametrize("state", ["visibility", "selective", "full"])
def test_enforcement_state_verdicts(state: str) -> None:
    art = _srv(state)
    seen = set()
    for script in (art.v4, art.v6):
        for chain in ("BULKHEAD-IN", "BULKHEAD-OUT"):
            lines = _chain_lines(script, chain)
            for i, ln in enumerate(lines):
                m = re.search(r'-j NFLOG --nflog-prefix "bh:([odn]):([0-9]+|-)" '
                              r"--nflog-group 7$", ln)
                if "NFLOG" not in ln:
                    prev = lines[i - 1] if i else ""
                    if "-j DROP" in ln:  # a drop always follows its own NFLOG rule
                        assert "NFLOG" in prev and prev.rsplit(" -j ", 1)[0] == (
                            ln.rsplit(" -j ", 1)[0])
                    continue
                assert m, ln
                kind = m.group(1)
                seen.add(kind)
                verdict = lines[i + 1]
                assert verdict.rsplit(" -j ", 1)[0] == ln.rsplit(" -j ", 1)[0]
                drop = state == "full" or (state == "selective" and kind in "od")
                assert verdict.endswith("-j DROP" if drop else "-j ACCEPT"), verdict
                assert (m.group(2) == "-") == (kind == "n")
    assert seen == {"o", "d", "n"}


def test_idle_renders_removal() -> None:
    feats = compile_naive(_policy(FEATURES, "features.yaml"))
    ctx = HostContext(table="bh_x")
    idle = render_iptables(replace(feats["srv"], enforcement="idle"), ctx)
    remove = remove_iptables(ctx)
    assert not idle.hooked and not idle.sets and idle.ipset == ""
    strip = [[ln for ln in s.splitlines() if not ln.startswith("#")]
             for s in (idle.v4, idle.v6, remove.v4, remove.v6)]
    expect = ["*filter", ":BH_X-IN - [0:0]", ":BH_X-OUT - [0:0]", "-X BH_X-IN", "-X BH_X-OUT",
              "COMMIT"]
    assert strip == [expect] * 4
    assert idle.hooks == remove.hooks == (("INPUT", "BH_X-IN"), ("OUTPUT", "BH_X-OUT"))


def test_outbound_allow_leaves_outbound_unfiltered() -> None:
    cw = _cw((_rule(),), (_rule(rule_id="o"),), mode="allow")
    art = render_iptables(cw, HostContext())
    for script in (art.v4, art.v6):
        assert _chain_lines(script, "BULKHEAD-OUT") == [
            '-m comment --comment "outbound: allow" -j RETURN']
    assert _in(cw) == ["-p tcp -m multiport --dports 443 -m set --match-set bulkhead-p0-h4 src "
                       "-m comment --comment r -j ACCEPT"]


# -- peer sets ----------------------------------------------------------------------------------

def _ipset_lines(art: IptablesArtifact) -> list[str]:
    return [ln for ln in art.ipset.splitlines() if not ln.startswith("#")]


def test_identical_peer_groups_share_sets_named_by_first_use() -> None:
    hosts = ("10.0.0.9", "10.0.0.3", "fd00::9")
    rules = (_rule(hosts=hosts, rule_id="a"), _rule(hosts=("10.0.0.7",), rule_id="b"),
             _rule(hosts=tuple(reversed(hosts)), nets=("192.0.2.0/24",), rule_id="c"))
    art = render_iptables(_cw(rules), HostContext())
    # v4 is rendered first, so the IPv6 set of p0 comes after every IPv4 set
    assert art.sets == ("bulkhead-p0-h4", "bulkhead-p1-h4", "bulkhead-p2-n4", "bulkhead-p0-h6")
    assert _in(_cw(rules)) == [
        f"-p tcp -m multiport --dports 443 -m set --match-set bulkhead-{s} src "
        f"-m comment --comment {r} -j ACCEPT"
        for s, r in (("p0-h4", "a"), ("p1-h4", "b"), ("p0-h4", "c"), ("p2-n4", "c"))]
    lines = _ipset_lines(art)
    assert "add bulkhead-p0-h4-t 10.0.0.3" in lines
    assert lines.index("add bulkhead-p0-h4-t 10.0.0.3") < lines.index(
        "add bulkhead-p0-h4-t 10.0.0.9")  # sorted numerically
    assert "add bulkhead-p2-n4-t 192.0.2.0/24" in lines
    assert any(ln.startswith("create bulkhead-p2-n4 hash:net family inet ") for ln in lines)
    assert any(ln.startswith("create bulkhead-p0-h6 hash:ip family inet6 ") for ln in lines)


def test_ipset_update_fills_temporaries_then_swaps_then_destroys() -> None:
    art = render_iptables(_cw((_rule(hosts=("10.0.0.2", "fd00::2"), nets=("10.9.0.0/16",)),)),
                          HostContext())
    lines = _ipset_lines(art)
    verbs = [ln.split()[0] for ln in lines]
    first_swap = verbs.index("swap")
    assert set(verbs[:first_swap]) == {"create", "flush", "add"}
    assert verbs[first_swap:] == ["swap"] * 3 + ["destroy"] * 3
    for name in art.sets:
        tmp = f"{name}-t"
        assert len(tmp) <= 31
        creates = [ln for ln in lines if ln.startswith(("create ", f"create {tmp} "))
                   and ln.split()[1] in (name, tmp)]
        assert len(creates) == 2 and all(ln.endswith(f"maxelem {SET_MAXELEM} -exist")
                                         for ln in creates)
        assert f"flush {tmp}" in lines and f"swap {tmp} {name}" in lines
        assert f"destroy {tmp}" in lines
        assert not [ln for ln in lines if ln.startswith(f"add {name} ")]  # never live


def test_nets_as_cidrs_and_no_zero_prefix() -> None:
    r = _rule(hosts=(), nets=("0.0.0.0/0", "::/0"))
    lines = _ipset_lines(render_iptables(_cw((r,)), HostContext()))
    assert [ln for ln in lines if ln.startswith("add ")] == [
        "add bulkhead-p0-n4-t 0.0.0.0/1", "add bulkhead-p0-n4-t 128.0.0.0/1",
        "add bulkhead-p0-n6-t ::/1", "add bulkhead-p0-n6-t 8000::/1"]
    r = _rule(hosts=(), nets=("198.51.100.3-198.51.100.9",))
    adds = [ln.split()[2] for ln in _ipset_lines(render_iptables(_cw((r,)), HostContext()))
            if ln.startswith("add ")]
    assert adds == ["198.51.100.3/32", "198.51.100.4/30", "198.51.100.8/31"]


def test_empty_peers_emit_nothing() -> None:
    art = render_iptables(_cw((_rule(hosts=()),), (_rule(hosts=()),)), HostContext())
    assert art.ipset == "" and art.sets == ()
    assert _in(_cw((_rule(hosts=()),))) == []


def test_deterministic_whatever_the_input_order() -> None:
    hosts = [f"10.0.{i % 7}.{i % 250 + 1}" for i in range(300)]
    a = _cw((_rule(hosts=tuple(hosts)),))
    b = _cw((_rule(hosts=tuple(reversed(hosts))),))
    assert render_iptables(a, HostContext()) == render_iptables(b, HostContext())
    assert render_iptables(a, HostContext()).text() == render_iptables(a, HostContext()).text()


# -- services -----------------------------------------------------------------------------------

def test_service_shapes() -> None:
    svcs = _svc("tcp/443", "tcp/8000-8099", "tcp/8050", "tcp/8100", "udp/53", "tcp/53",
                "sctp/9", "icmp/8", "icmp/0", "icmpv6/128", "proto/47", "esp", "udp/7")
    cw = _cw((_rule(hosts=("10.0.0.2", "fd00::2"), services=svcs),))
    tail = "-m comment --comment r -j ACCEPT"
    v4 = [f"{m} -m set --match-set bulkhead-p0-h4 src {tail}" for m in (
        "-p tcp -m multiport --dports 53,443,8000:8100", "-p udp -m multiport --dports 7,53",
        "-p sctp -m multiport --dports 9", "-p icmp -m icmp --icmp-type 0",
        "-p icmp -m icmp --icmp-type 8", "-p 47", "-p esp")]
    assert _in(cw) == v4
    v6 = [ln.replace("p0-h4", "p0-h6") for ln in v4 if "icmp" not in ln]
    v6.insert(3, f"-p ipv6-icmp -m icmp6 --icmpv6-type 128 -m set --match-set bulkhead-p0-h6 "
                 f"src {tail}")
    assert _in(cw, v=6) == v6
    whole = _in(_cw((_rule(services=_svc("tcp/22", "tcp", "icmp", "icmp/8", "udp/5")),)))
    assert [ln.split(" -m set")[0] for ln in whole] == [
        "-p udp -m multiport --dports 5", "-p icmp", "-p tcp"]
    anything = _in(_cw((_rule(services=_svc("tcp/22", "any")),)))
    assert anything == [f"-m set --match-set bulkhead-p0-h4 src {tail}"]
    # ICMPv6 only in IPv6 rules: a v4-only peer group emits nothing for it
    assert _in(_cw((_rule(services=_svc("icmpv6")),))) == []


def test_multiport_splits_at_fifteen_slots() -> None:
    singles = tuple(f"tcp/{p}" for p in range(1, 41, 2))  # 20 ports, none adjacent
    lines = _in(_cw((_rule(services=_svc(*singles)),)))
    lists = [re.search(r"--dports (\S+)", ln).group(1) for ln in lines]  # type: ignore[union-attr]
    assert [len(x.split(",")) for x in lists] == [15, 5]
    ranges = tuple(f"udp/{p}-{p + 1}" for p in range(100, 140, 4))  # 10 ranges: 20 slots
    lists = [re.search(r"--dports (\S+)", ln).group(1)  # type: ignore[union-attr]
             for ln in _in(_cw((_rule(services=_svc(*ranges, "udp/999")),)))]
    for x in lists:
        assert sum(2 if ":" in p else 1 for p in x.split(",")) <= MULTIPORT_SLOTS
    assert [len(x.split(",")) for x in lists] == [7, 4]
    every = {p for x in lists for p in x.split(",")}
    assert every == {f"{p}:{p + 1}" for p in range(100, 140, 4)} | {"999"}


def test_protocol_zero_fails_closed() -> None:
    # `-p 0` means every protocol to iptables: the policy format refuses `proto/0`, and a
    # compiled rule carrying it anyway (hand-built) is left out of an allow, widened in a deny
    from bulkhead.domain.ports import PortSpec, PortSpecError
    from bulkhead.policy.resolve import ResolvedService

    with pytest.raises(PortSpecError):
        PortSpec.parse("proto/0")
    zero = (ResolvedService(PortSpec(0)),)
    assert _in(_cw((_rule(services=zero),))) == []
    deny = _in(_cw((_rule("deny", services=zero, instance=3),)))
    assert deny[0] == ("-m set --match-set bulkhead-p0-h4 src -m comment --comment r "
                       '-j NFLOG --nflog-prefix "bh:d:3" --nflog-group 7')


def test_local_restriction() -> None:
    r_in = _rule(hosts=("10.0.0.2", "fd00::2"), local=AddressSet.of_ips(["10.0.0.1"]))
    assert _in(_cw((r_in,))) == [
        "-d 10.0.0.1/32 -p tcp -m multiport --dports 443 -m set --match-set bulkhead-p0-h4 src "
        "-m comment --comment r -j ACCEPT"]
    assert _in(_cw((r_in,)), v=6) == []
    r_out = _rule(hosts=("10.0.0.2", "fd00::2"), local=AddressSet.of_ips(["fd00::1"]))
    assert _out(_cw(outbound=(r_out,)), v=6) == [
        "-s fd00::1/128 -p tcp -m multiport --dports 443 -m set --match-set bulkhead-p0-h6 dst "
        "-m comment --comment r -j ACCEPT"]
    assert _out(_cw(outbound=(r_out,))) == []


def test_users_become_uid_owner_ranges_outbound_only() -> None:
    ctx = HostContext(uids={"alice": 1001, "bob": 1002, "eve": 1005, "dan": 1003})
    r = _rule(users=frozenset({"bob", "alice", "dan", "eve", "nobody"}))
    assert _out(_cw(outbound=(r,)), ctx) == [
        f"-p tcp -m multiport --dports 443 -m set --match-set bulkhead-p0-h4 dst "
        f"-m owner --uid-owner {u} -m comment --comment r -j ACCEPT" for u in ("1001-1003", "1005")]
    none = _rule(users=frozenset({"nobody"}))
    assert _out(_cw(outbound=(none,)), ctx) == [
        "# r: none of its users has a uid on this host"]


# -- processes and cgroups ----------------------------------------------------------------------

@pytest.mark.parametrize(("path", "level", "want"), [
    ("unified/bh/mysqld", 2, "bh/mysqld"),  # hybrid host: cgroup2 at /sys/fs/cgroup/unified
    ("bh/mysqld", 2, "bh/mysqld"),  # unified host: cgroup2 at /sys/fs/cgroup
    ("unified/system.slice/mysql.service", 2, "system.slice/mysql.service"),
    ("unified/a/b/c", 1, "c"),
    ("/unified//a/b/", 2, "a/b"),
    ("bh/mysqld", 3, None),  # a mount of a sub-tree: the path to the root is unknown
    ("bh/mysqld", 0, None),  # the root cgroup would match every socket
    ("unified/../etc", 1, None),
    ('x" -j ACCEPT', 1, None),
    ("", 1, None),
])
def test_xt_cgroup_path(path: str, level: int, want: str | None) -> None:
    assert xt_cgroup_path(path, level) == want


def _db_ctx() -> HostContext:
    return HostContext(cgroups={"mysqld": ("unified/db/mysqld", 2),
                                "mysql.service": ("unified/system.slice/mysql.service", 2)})


def test_bound_allow_gets_cgroup_matches_and_says_it_cannot_admit() -> None:
    both = _svc("tcp/3306", process="mysqld", unit="mysql.service")
    r = _rule(services=both + _svc("tcp/80"))
    assert _in(_cw((r,)), _db_ctx()) == [
        "-p tcp -m multiport --dports 80 -m set --match-set bulkhead-p0-h4 src "
        "-m comment --comment r -j ACCEPT",
        "# r: tcp/3306 only for process mysqld and unit mysql.service; xt_cgroup cannot see "
        "the listener of a new connection, so this admits none (fail closed)",
        '-p tcp -m multiport --dports 3306 -m set --match-set bulkhead-p0-h4 src '
        '-m cgroup --path "db/mysqld" -m cgroup --path "system.slice/mysql.service" '
        "-m comment --comment r -j ACCEPT"]
    # outbound: the remote process cannot be seen, the port alone matches
    assert _out(_cw(outbound=(r,)), _db_ctx()) == [
        "-p tcp -m multiport --dports 80,3306 -m set --match-set bulkhead-p0-h4 dst "
        "-m comment --comment r -j ACCEPT"]


def test_bound_deny_is_widened_to_the_port() -> None:
    deny = _rule("deny", services=_svc("tcp/3306", process="mysqld"), instance=4)
    lines = _in(_cw((deny,)), _db_ctx())
    assert lines == [
        "# r: xt_cgroup cannot match a new inbound connection: tcp/3306 deny widened to every "
        "process (fail closed)",
        "-p tcp -m multiport --dports 3306 -m set --match-set bulkhead-p0-h4 src "
        '-m comment --comment r -j NFLOG --nflog-prefix "bh:d:4" --nflog-group 7',
        "-p tcp -m multiport --dports 3306 -m set --match-set bulkhead-p0-h4 src "
        "-m comment --comment r -j DROP"]


def test_missing_cgroup_fails_closed() -> None:
    svcs = _svc("tcp/3306", process="mysqld")
    allow = _in(_cw((_rule(services=svcs + _svc("tcp/80")),)))
    assert allow == [
        "-p tcp -m multiport --dports 80 -m set --match-set bulkhead-p0-h4 src "
        "-m comment --comment r -j ACCEPT",
        "# r: no usable cgroup for process mysqld: tcp/3306 not allowed (fail closed)"]
    deny = _in(_cw((_rule("override_deny", services=svcs, instance=2),)))
    assert deny[0] == ("# r: no usable cgroup for process mysqld: tcp/3306 override_deny "
                       "widened to every process (fail closed)")
    assert deny[1].startswith("-p tcp -m multiport --dports 3306 -m set")
    # an unusable path (quote injection, bad level) is treated like a missing one
    for bad in (('x" -j ACCEPT', 1), ("unified/db/mysqld", 5)):
        lines = _in(_cw((_rule(services=svcs),)), HostContext(cgroups={"mysqld": bad}))
        assert lines == ["# r: no usable cgroup for process mysqld: tcp/3306 not allowed "
                         "(fail closed)"]


def test_port_mode_matches_bound_services_by_port() -> None:
    r = _rule(services=_svc("tcp/3306", process="mysqld"))
    lines = _in(_cw((r,)), inbound_process="port")
    assert lines == [
        "# r: tcp/3306 of process mysqld matched by port alone (inbound_process=port): the "
        "process is not enforced",
        "-p tcp -m multiport --dports 3306 -m set --match-set bulkhead-p0-h4 src "
        "-m comment --comment r -j ACCEPT"]


# -- text safety and errors ---------------------------------------------------------------------

def test_comments_cannot_break_out() -> None:
    evil = 'x" -j ACCEPT\nCOMMIT\n*nat \\ \'' + "z" * 300
    art = render_iptables(_cw((_rule(rule_id=evil),)), HostContext())
    for script in (art.v4, art.v6):
        assert script.splitlines().count("COMMIT") == 1
        assert script.splitlines().count("*filter") == 1
        lines = _in(_cw((_rule(rule_id=evil),)))
        comment = re.search(r'--comment "([^"]*)" -j ACCEPT$', lines[0])
        assert comment and len(comment.group(1)) == 255
        assert comment.group(1).startswith("x_ -j ACCEPT_COMMIT__nat _ _zz")
        for ln in script.splitlines():
            assert ln.startswith(("#", "*filter", ":", "-A ", "-D ", "-I ", "COMMIT")), ln
            assert "\\" not in ln and "'" not in ln


def test_words_quoted_like_iptables_save() -> None:
    lines = _in(_cw((_rule(rule_id="web-api_2"), _rule(rule_id="shop/0", hosts=("10.0.0.3",)))))
    assert lines[0].endswith("-m comment --comment web-api_2 -j ACCEPT")
    assert lines[1].endswith('-m comment --comment "shop/0" -j ACCEPT')


@pytest.mark.parametrize(("cw", "ctx", "message"), [
    (_cw(), HostContext(table="bad name"), "table name"),
    (_cw(), HostContext(table="waytoolongname"), "table name"),
    (_cw(), HostContext(table="x;y"), "table name"),
    (_cw(), HostContext(control_plane=(Endpoint("cp.example"),)), "control-plane address"),
    (_cw(), HostContext(control_plane=(Endpoint("10.0.0.9", 0),)), "control-plane port"),
    (_cw(), HostContext(nflog_group=70000), "NFLOG group"),
    (_cw(enforcement="strict"), HostContext(), "enforcement"),
    (_cw(mode="maybe"), HostContext(), "outbound mode"),
    (replace(_cw(), os="windows"), HostContext(), "linux"),
    (_cw((_rule(hosts=("10.0.0.1 -j ACCEPT",)),)), HostContext(), "IP address"),
    (_cw((_rule(action="reject"),)), HostContext(), "unknown action"),
])
def test_rejects_what_it_cannot_render_safely(cw: CompiledWorkload, ctx: HostContext,
                                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_iptables(cw, ctx)


def test_rejects_unknown_inbound_process_mode() -> None:
    with pytest.raises(ValueError, match="inbound_process"):
        render_iptables(_cw(), HostContext(), inbound_process="maybe")  # type: ignore[arg-type]


# -- apply commands -----------------------------------------------------------------------------

def test_restore_commands_order_and_backends() -> None:
    art = _srv()
    steps = restore_commands(art)
    argv0 = [argv[0] for argv, _ in steps]
    assert argv0 == ["ipset", "sh", "iptables-legacy-restore", "ip6tables-legacy-restore", "sh"]
    assert steps[0] == (["ipset", "restore"], art.ipset)
    assert steps[2] == (["iptables-legacy-restore", "-w", "--noflush"], art.v4)
    assert steps[3] == (["ip6tables-legacy-restore", "-w", "--noflush"], art.v6)
    hooks = steps[1][0][2]
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        assert f"r=$({tool} -w -S INPUT)\nif ! printf '%s\\n' \"$r\" | grep -qxF -- " \
               "'-A INPUT -j BULKHEAD-IN'; then" in hooks
        assert f"{tool} -w -I OUTPUT 1 -j BULKHEAD-OUT" in hooks
    stale = steps[4][0][2]
    assert stale.startswith('for s in $(ipset list -n); do case "$s" in bulkhead-p0-h4|')
    assert stale.endswith('bulkhead-*) ipset destroy "$s";; esac; done')
    nft = restore_commands(art, "nft")
    assert [a[0] for a, _ in nft][2:4] == ["iptables-nft-restore", "ip6tables-nft-restore"]
    assert "iptables-nft -w -S INPUT" in nft[1][0][2]
    default = restore_commands(art, "default")
    assert [a[0] for a, _ in default][2:4] == ["iptables-restore", "ip6tables-restore"]


def test_remove_commands_unhook_first_and_destroy_every_set_last() -> None:
    steps = restore_commands(remove_iptables(HostContext()))
    assert [argv[0] for argv, _ in steps] == [
        "sh", "iptables-legacy-restore", "ip6tables-legacy-restore", "sh"]
    assert "while iptables-legacy -w -D INPUT -j BULKHEAD-IN 2>/dev/null; do :; done" in (
        steps[0][0][2])
    assert steps[-1][0][2] == ('for s in $(ipset list -n); do case "$s" in '
                               'bulkhead-*) ipset destroy "$s";; esac; done')


def test_text_has_every_script_under_a_header() -> None:
    art = _srv()
    text = art.text()
    for header, script in (("# ==== [ipset] ipset restore ====", art.ipset),
                           ("# ==== [v4] iptables-restore -w --noflush ====", art.v4),
                           ("# ==== [v6] ip6tables-restore -w --noflush ====", art.v6)):
        assert f"{header}\n{script}" in text
    assert "# ==== [ipset] ipset restore ====\n# (no sets)\n" in remove_iptables(
        HostContext()).text()


# -- the oracle: an interpreter of our own scripts against the evaluator ------------------------

_PROTO_NUM = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "esp": 50, "ah": 51,
              "sctp": 132, "udplite": 136}
EPHEMERAL = 40000  # source port of simulated connections
NOBODY = 65534  # uid of a connection made by no user of the policy


@dataclass(frozen=True)
class Packet:
    """The first packet of a new connection, as seen by our chains."""

    src: str
    dst: str
    proto: int
    port: int | None  # destination port, or ICMP type
    uid: int = NOBODY


Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Cond = Callable[[Packet], bool]


def _ipsets(script: str) -> dict[str, list[Net]]:
    sets: dict[str, list[Net]] = {}
    for ln in script.splitlines():
        w = ln.split()
        if not w or w[0].startswith("#"):
            continue
        if w[0] == "create":
            sets.setdefault(w[1], [])
        elif w[0] == "flush":
            sets[w[1]] = []
        elif w[0] == "add":
            sets[w[1]].append(ipaddress.ip_network(w[2]))
        elif w[0] == "swap":
            sets[w[1]], sets[w[2]] = sets[w[2]], sets[w[1]]
        elif w[0] == "destroy":
            del sets[w[1]]
        else:
            raise AssertionError(f"unexpected ipset command {ln!r}")
    return sets


@dataclass
class SimRule:
    conds: list[Cond]
    target: str
    log: str | None


def _never(_p: Packet) -> bool:
    return False


def _addr_in(attr: str, nets: list[Net]) -> Cond:
    return lambda p: any(ipaddress.ip_address(getattr(p, attr)) in n for n in nets)


def _proto_is(num: int) -> Cond:
    return lambda p: p.proto == num


def _port_in(ranges: list[tuple[int, int]]) -> Cond:
    return lambda p: p.port is not None and any(a <= p.port <= b for a, b in ranges)


def _uid_in(a: int, b: int) -> Cond:
    return lambda p: a <= p.uid <= b


def _ranges(spec: str) -> list[tuple[int, int]]:
    """`22,8000:8099` -> [(22, 22), (8000, 8099)]."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        out.append((int(lo), int(hi or lo)))
    return out


_MODULES = ("multiport", "tcp", "udp", "icmp", "icmp6", "set", "owner", "cgroup", "conntrack",
            "comment")


def _parse_rule(tokens: list[str], sets: dict[str, list[Net]]) -> SimRule:
    """One `-A` line (after the chain name) as conditions and a target."""
    conds: list[Cond] = []
    target, log = "", None
    it = iter(tokens)
    for tok in it:
        if tok in ("-s", "-d"):
            conds.append(_addr_in("src" if tok == "-s" else "dst",
                                  [ipaddress.ip_network(next(it))]))
        elif tok in ("-i", "-o"):
            assert next(it) == "lo"
            conds.append(_never)  # simulated traffic never uses loopback
        elif tok == "-p":
            name = next(it)
            conds.append(_proto_is(int(name) if name.isdigit() else _PROTO_NUM[name]))
        elif tok == "-m":
            assert next(it) in _MODULES
        elif tok in ("--dports", "--dport", "--icmp-type", "--icmpv6-type"):
            conds.append(_port_in(_ranges(next(it))))
        elif tok == "--sport":
            if int(next(it)) != EPHEMERAL:
                conds.append(_never)
        elif tok == "--match-set":
            members, attr = sets[next(it)], next(it)
            assert attr in ("src", "dst")
            conds.append(_addr_in(attr, members))
        elif tok == "--uid-owner":
            (lo, hi), = _ranges(next(it).replace("-", ":"))
            conds.append(_uid_in(lo, hi))
        elif tok in ("--path", "--ctstate"):
            # a NEW packet; and the kernel cannot see a new connection's listener
            next(it)
            conds.append(_never)
        elif tok in ("--comment", "--nflog-group"):
            next(it)
        elif tok == "-j":
            target = next(it)
        elif tok == "--nflog-prefix":
            log = next(it)
        else:
            raise AssertionError(f"the interpreter does not know {tok!r} in {tokens}")
    assert target in ("ACCEPT", "DROP", "NFLOG", "RETURN"), tokens
    return SimRule(conds, target, log)


class Sim:
    """What our chains do with the first packet of a connection (base policies ACCEPT)."""

    def __init__(self, art: IptablesArtifact) -> None:
        sets = _ipsets(art.ipset)
        self.chains: dict[tuple[int, str], list[SimRule]] = {}
        for v, script in ((4, art.v4), (6, art.v6)):
            for ln in script.splitlines():
                if ln.startswith("-A "):
                    tokens = shlex.split(ln)
                    self.chains.setdefault((v, tokens[1]), []).append(
                        _parse_rule(tokens[2:], sets))

    def run(self, p: Packet, chain: str) -> tuple[bool, list[str]]:
        """(accepted, NFLOG prefixes logged on the way)."""
        logs: list[str] = []
        v = ipaddress.ip_address(p.src).version
        for rule in self.chains.get((v, chain), []):
            if all(c(p) for c in rule.conds):
                if rule.target == "NFLOG":
                    assert rule.log is not None
                    logs.append(rule.log)
                    continue
                return rule.target != "DROP", logs
        return True, logs


def _model(policy: Policy, w: str, *, inbound: bool, port_mode: bool) -> Policy:
    """What the iptables target enforces on `w`'s side of the flow, as a policy for the
    evaluator: only `w` is managed, every process/unit binding is dropped (outbound sees
    no remote process; port mode ignores it; denies are widened to the port), and in cgroup
    mode an inbound allow bound to a process admits nothing (xt_cgroup cannot see it)."""
    bound = {s.name for s in policy.services if s.process or s.unit}
    drop = inbound and not port_mode
    rulesets = tuple(
        replace(rs, rules=tuple(
            replace(r, services=tuple(s for s in r.services if s not in bound))
            if drop and r.action == "allow" else r for r in rs.rules))
        for rs in policy.rulesets)
    return replace(
        policy, rulesets=rulesets,
        services=tuple(replace(s, process=None, unit=None) for s in policy.services),
        workloads=tuple(replace(x, managed=x.name == w) for x in policy.workloads))


_ESSENTIAL = {(17, 67), (17, 68), (17, 546), (17, 547), (1, 3), (1, 11), (1, 12),
              *((58, t) for t in (1, 2, 3, 4, 130, 131, 132, 133, 134, 135, 136, 137, 143))}


def _sample_addresses(policy: Policy, ctx: HostContext) -> list[str]:
    """Every workload address, both ends and the middle of every IP-list interval and the
    addresses just outside, and two external addresses."""
    out = {ip for w in policy.workloads for ip in w.ips} | {"203.0.113.77", "2001:db8:ff::1"}
    for ipl in policy.ip_lists:
        aset = AddressSet.from_blocks(ipl.cidrs, ipl.exclude)
        for v, top, mk in ((4, 2**32 - 1, ipaddress.IPv4Address),
                           (6, 2**128 - 1, ipaddress.IPv6Address)):
            for lo, hi in aset.v4 if v == 4 else aset.v6:
                for x in (lo - 1, lo, (lo + hi) // 2, hi, hi + 1):
                    if 0 <= x <= top:
                        out.add(str(mk(x)))
    out -= {ipaddress.ip_address(e.address).compressed for e in ctx.control_plane}
    return sorted(out, key=lambda a: (":" in a, int(ipaddress.ip_address(a))))


def _sample_services(policy: Policy) -> list[tuple[int, int | None]]:
    """Both ends of every port range and the ports just outside, every ICMP type named,
    whole protocols, and a few ports no rule names."""
    names = {s.name: s for s in policy.services}
    specs = [PortSpec.parse(p) for s in policy.services for p in s.ports]
    specs += [PortSpec.parse(x) for rs in policy.rulesets for r in rs.rules
              for x in r.services if x not in names]
    out: set[tuple[int, int | None]] = {(6, 1), (17, 9), (6, 65535), (1, 8), (58, 128),
                                        (47, None), (132, 9), (50, None), (2, None)}
    for s in specs:
        if s.proto is None:
            continue
        if s.proto in PORTED:
            lo, hi = (1000, 1000) if s.lo is None else (s.lo, s.hi or s.lo)
            out |= {(s.proto, x) for x in (lo - 1, lo, hi, hi + 1) if 1 <= x <= 65535}
        elif s.proto in ICMP_PROTOS:
            t = 8 if s.lo is None else s.lo
            out |= {(s.proto, t), (s.proto, t + 1)}
        else:
            out.add((s.proto, None))
    return sorted(x for x in out if x not in _ESSENTIAL)


def _log_of(decision: str) -> str | None:
    for suffix, letter in (("override_deny", "o"), ("by_deny", "d"), ("no_rule", "n")):
        if decision.endswith(suffix):
            return letter
    return None


def _oracle_check(policy: Policy, w: str, ctx: HostContext, *, port_mode: bool = False
                  ) -> tuple[int, list[str]]:
    """(flows checked, mismatches) for workload `w`, both directions."""
    cw = compile_naive(policy)[w]
    art = render_iptables(cw, ctx, inbound_process="port" if port_mode else "cgroup")
    sim = Sim(art)
    ids = {r.instance: r.rule_id for r in cw.inbound + cw.outbound}
    own = set(cw.addresses)
    peers = [a for a in _sample_addresses(policy, ctx) if a not in own]
    services = _sample_services(policy)
    members = {u for g in policy.user_groups for u in g.members}
    users: list[tuple[str | None, int]] = [
        (None, NOBODY), *sorted((u, uid) for u, uid in ctx.uids.items() if u in members)]
    wrong: list[str] = []
    checked = 0
    for inbound in (True, False):
        ev = Evaluator(_model(policy, w, inbound=inbound, port_mode=port_mode))
        chain = "BULKHEAD-IN" if inbound else "BULKHEAD-OUT"
        for local in cw.addresses:
            for peer in peers:
                if (":" in peer) != (":" in local):
                    continue
                src, dst = (peer, local) if inbound else (local, peer)
                for proto, port in services:
                    if proto in ICMP_PROTOS and proto != (58 if ":" in local else 1):
                        continue
                    for user, uid in users if not inbound else [(None, NOBODY)]:
                        d = ev.decide(Flow(src, dst, proto, port, user=user))
                        accepted, logs = sim.run(Packet(src, dst, proto, port, uid), chain)
                        checked += 1
                        want = not d.decision.startswith("blocked")
                        letter = None if cw.enforcement == "idle" else _log_of(d.decision)
                        ok = accepted == want and len(logs) == (letter is not None)
                        if ok and letter is not None:
                            _bh, kind, inst = logs[0].split(":")
                            ok = kind == letter and (
                                inst == "-" if letter == "n" else ids[int(inst)] in d.rules)
                        if not ok:
                            wrong.append(f"{w} {cw.enforcement} {chain} {src}->{dst} "
                                         f"{proto}/{port} user={user}: iptables "
                                         f"{'accepts' if accepted else 'drops'} {logs}, "
                                         f"evaluator {d.decision} {d.rules}")
    return checked, wrong


def _oracle_cases() -> list[tuple[str, str, str, str]]:
    out = [("shop", w.name, s, "cgroup") for w in load_policy(str(SHOP)).workloads
           if w.managed for s in STATES]
    out += [("features", w, s, "cgroup") for w in ("srv", "web-1", "db-1", "ws")
            for s in STATES]
    out += [("features", "srv", "full", "port"), ("outbound-allow", "app", "full", "cgroup"),
            ("outbound-allow", "lb", "selective", "cgroup"), ("wide", "gw", "full", "cgroup")]
    return out


_POLICIES: dict[str, Callable[[], Policy]] = {
    "shop": lambda: load_policy(str(SHOP)),
    "features": lambda: _policy(FEATURES, "features.yaml"),
    "outbound-allow": lambda: _policy(OUTBOUND_ALLOW, "outbound-allow.yaml"),
    "wide": lambda: _policy(WIDE, "wide.yaml"),
}


@pytest.mark.parametrize(("name", "w", "state", "mode"), _oracle_cases(),
                         ids=["-".join(c) for c in _oracle_cases()])
def test_scripts_decide_like_the_evaluator(name: str, w: str, state: str, mode: str) -> None:
    policy = _POLICIES[name]()
    policy = replace(policy, workloads=tuple(
        replace(x, enforcement=state) if x.name == w else x  # type: ignore[arg-type]
        for x in policy.workloads))
    checked, wrong = _oracle_check(policy, w, context(), port_mode=mode == "port")
    assert checked > 50
    assert not wrong, f"{len(wrong)} of {checked} flows differ:\n" + "\n".join(wrong[:30])


def test_the_oracle_check_is_not_vacuous() -> None:
    # A renderer that forgets the precedence (deny before allow) must be caught.
    policy = _policy(FEATURES, "features.yaml")
    cw = compile_naive(policy)["srv"]
    art = render_iptables(cw, context())
    sim = Sim(art)
    web = "10.1.0.11"
    assert sim.run(Packet(web, "10.1.0.1", 6, 8050), "BULKHEAD-IN") == (True, [])  # across
    assert sim.run(Packet("10.1.0.21", "10.1.0.1", 6, 80), "BULKHEAD-IN") == (
        False, ["bh:o:0"])  # override_deny beats the allow
    assert sim.run(Packet("10.1.0.12", "10.1.0.1", 6, 3306), "BULKHEAD-IN") == (
        False, ["bh:n:-"])  # bound allow: fail closed
    swapped = IptablesArtifact(art.ipset, art.v4.replace("bh:o:0", "bh:d:0"), art.v6)
    assert Sim(swapped).run(Packet("10.1.0.21", "10.1.0.1", 6, 80), "BULKHEAD-IN")[1] == [
        "bh:d:0"]


# -- privileged: real namespaces ------------------------------------------------------------

TOOLS = ("ip", "nsenter", "iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save",
         "ip6tables-legacy", "ip6tables-legacy-restore", "ip6tables-legacy-save", "ipset",
         "setpriv", "sh")


def _privileged_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    return f"needs {', '.join(missing)} on PATH" if missing else None


@pytest.fixture
def privileged() -> None:
    """Skip without root or tools; fail instead when BULKHEAD_REQUIRE_PRIVILEGED=1."""
    reason = _privileged_reason()
    if reason is None:
        return
    if os.environ.get("BULKHEAD_REQUIRE_PRIVILEGED") == "1":
        pytest.fail(f"privileged test cannot run ({reason}) but BULKHEAD_REQUIRE_PRIVILEGED=1")
    pytest.skip(reason)


def run(cmd: list[str], stdin: str | None = None, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, input=stdin, text=True, capture_output=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)[:200]} failed ({r.returncode}): "
                             f"{r.stderr.strip()}")
    return r


_ns_counter = itertools.count()


@contextmanager
def netns() -> Iterator[str]:
    """A throwaway network namespace (lo up); yields its /var/run/netns path."""
    name = f"bhipt-{os.getpid()}-{next(_ns_counter)}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def in_ns(ns: str, argv: list[str], stdin: str | None = None, check: bool = True
          ) -> subprocess.CompletedProcess[str]:
    return run(["nsenter", f"--net={ns}", *argv], stdin, check)


def apply(ns: str, art: IptablesArtifact, backend: str = "legacy") -> None:
    for argv, text in restore_commands(art, backend):  # type: ignore[arg-type]
        in_ns(ns, argv, text)


def cgroup2_root() -> tuple[Path, str]:
    """(mount point of cgroup v2, its path relative to /sys/fs/cgroup as nft names it)."""
    unified = Path("/sys/fs/cgroup/unified")
    if (unified / "cgroup.procs").exists():
        return unified, "unified"
    return Path("/sys/fs/cgroup"), ""


@contextmanager
def cgroups(names: tuple[str, ...]) -> Iterator[tuple[Path, str]]:
    """<cgroup2>/<unique>/<name> for each name; yields (its dir, the prefix nft would use)."""
    mount, rel = cgroup2_root()
    base = f"{CG_BASE}-{os.getpid()}-{next(_ns_counter)}"
    top = mount / base
    top.mkdir()
    try:
        for n in names:
            (top / n).mkdir()
        yield top, f"{rel}/{base}" if rel else base
    finally:
        for n in names:
            with suppress(OSError):
                (top / n).rmdir()
        with suppress(OSError):
            top.rmdir()


def _save(ns: str, v: int) -> list[str]:
    tool = "iptables-legacy-save" if v == 4 else "ip6tables-legacy-save"
    return [ln for ln in in_ns(ns, [tool, "-t", "filter"]).stdout.splitlines()
            if not ln.startswith("#")]


def _norm(line: str) -> str:
    """A rule line with protocol names as numbers (iptables-save names them from
    /etc/protocols)."""
    def number(m: re.Match[str]) -> str:
        name = m.group(2)
        return m.group(1) + (name if name.isdigit() else str(
            _PROTO_NUM.get(name) or socket.getprotobyname(name)))

    return re.sub(r"(-p )(\S+)", number, line)


def _ours(lines: list[str]) -> list[str]:
    return [_norm(ln) for ln in lines if ln.startswith(("-A BULKHEAD-IN ", "-A BULKHEAD-OUT "))]


def _sets(ns: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name in in_ns(ns, ["ipset", "list", "-n"]).stdout.split():
        listing = in_ns(ns, ["ipset", "list", name]).stdout
        out[name] = set(listing.split("Members:\n", 1)[1].split())
    return out


def _expected_sets(art: IptablesArtifact) -> dict[str, set[str]]:
    return {k: {str(n) if n.prefixlen != n.max_prefixlen else str(n.network_address)
                for n in v} for k, v in _ipsets(art.ipset).items()}


@pytest.mark.privileged
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_every_golden_passes_iptables_restore_test(privileged: None, backend: str) -> None:
    if backend == "nft" and shutil.which("iptables-nft-restore") is None:
        pytest.skip("no iptables-nft-restore")
    failures = []
    with netns() as ns:
        for case in CASES:
            art = case.make(f"unified/{CG_BASE}")
            steps = restore_commands(art, backend)  # type: ignore[arg-type]
            for argv, text in steps:
                if argv[0].endswith("-restore"):
                    r = in_ns(ns, [argv[0], "--test", *argv[1:]], text, check=False)
                    if r.returncode != 0:
                        failures.append(f"{case.golden} {argv[0]}: {r.stderr.strip()}")
                else:  # sets and hooks must exist for the rules that name them
                    in_ns(ns, argv, text)
    assert not failures, "\n".join(failures)


@pytest.mark.privileged
def test_apply_twice_read_back_update_and_remove(privileged: None) -> None:
    feats = compile_naive(_policy(FEATURES, "features.yaml"))
    with cgroups(("mysqld", "snmpd.service")) as (_dir, prefix), netns() as ns:
        ctx = context(prefix)
        apply(ns, remove_iptables(ctx))  # safe on a fresh host
        foreign = {4: "-A INPUT -s 192.0.2.99/32 -m comment --comment foreign -j DROP",
                   6: "-A INPUT -s 2001:db8::99/128 -m comment --comment foreign -j DROP"}
        for v, rule in foreign.items():
            in_ns(ns, ["iptables-legacy" if v == 4 else "ip6tables-legacy", *shlex.split(rule)])
            in_ns(ns, ["iptables-legacy" if v == 4 else "ip6tables-legacy",
                       "-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"])
        in_ns(ns, ["ipset", "create", "foreign", "hash:ip"])
        in_ns(ns, ["ipset", "add", "foreign", "192.0.2.98"])

        def check(art: IptablesArtifact) -> None:
            for v, script in ((4, art.v4), (6, art.v6)):
                saved = _save(ns, v)
                assert _ours(saved) == _ours(script.splitlines()), f"IPv{v} read-back differs"
                inp = [ln for ln in saved if ln.startswith("-A INPUT ")]
                out = [ln for ln in saved if ln.startswith("-A OUTPUT ")]
                assert inp == ["-A INPUT -j BULKHEAD-IN", foreign[v]]
                assert out == ["-A OUTPUT -j BULKHEAD-OUT", "-A OUTPUT -o lo -j ACCEPT"]
            live = _sets(ns)
            assert live["foreign"] == {"192.0.2.98"}
            assert {k: s for k, s in live.items() if k != "foreign"} == _expected_sets(art)

        # a leftover chain of ours, not hooked: its stale rules never go live
        in_ns(ns, ["iptables-legacy", "-N", "BULKHEAD-IN"])
        in_ns(ns, ["iptables-legacy", "-A", "BULKHEAD-IN", "-j", "DROP"])
        srv = render_iptables(feats["srv"], ctx)
        apply(ns, srv)  # fresh host: hooks created
        check(srv)
        apply(ns, srv)  # the same artefact again: the update path
        check(srv)

        # another policy state replaces the first; sets it no longer uses are destroyed
        web = render_iptables(feats["web-1"], ctx)
        apply(ns, web)
        check(web)
        assert set(srv.sets) - set(web.sets)  # there was something stale to destroy

        # a second hook (someone else's doing) is kept at two, never multiplied
        in_ns(ns, ["iptables-legacy", "-A", "INPUT", "-j", "BULKHEAD-IN"])
        apply(ns, web)
        apply(ns, web)
        saved = _save(ns, 4)
        assert saved.count("-A INPUT -j BULKHEAD-IN") == 2
        assert next(ln for ln in saved if ln.startswith("-A INPUT ")) == (
            "-A INPUT -j BULKHEAD-IN")
        in_ns(ns, ["iptables-legacy", "-D", "INPUT", "-j", "BULKHEAD-IN"])  # left: the last
        apply(ns, web)  # and the next update moves it back to the top
        check(web)

        # a failing transaction (a cgroup that does not exist) leaves the running rules alone
        broken = render_iptables(feats["srv"], replace(
            ctx, cgroups={"mysqld": ("unified/no/such", 2)}))
        steps = restore_commands(broken)
        for argv, text in steps[:2]:
            in_ns(ns, argv, text)
        assert in_ns(ns, steps[2][0], steps[2][1], check=False).returncode != 0
        assert _ours(_save(ns, 4)) == _ours(web.v4.splitlines())

        # idle removes ours, and only ours; removing twice is fine
        apply(ns, render_iptables(replace(feats["web-1"], enforcement="idle"), ctx))
        apply(ns, remove_iptables(ctx))
        for v in (4, 6):
            saved = _save(ns, v)
            assert not [ln for ln in saved if "BULKHEAD" in ln], saved
            assert foreign[v] in saved
        assert set(_sets(ns)) == {"foreign"}


@pytest.mark.privileged
def test_nft_backend_reads_back_the_same(privileged: None) -> None:
    if shutil.which("iptables-nft-restore") is None:
        pytest.skip("no iptables-nft-restore")
    feats = compile_naive(_policy(FEATURES, "features.yaml"))
    with cgroups(("mysqld", "snmpd.service")) as (_dir, prefix), netns() as ns:
        art = render_iptables(feats["srv"], context(prefix))
        apply(ns, art, "nft")
        apply(ns, art, "nft")
        saved = in_ns(ns, ["iptables-nft-save", "-t", "filter"]).stdout.splitlines()
        assert _ours(saved) == _ours(art.v4.splitlines())
        assert [ln for ln in saved if ln.startswith("-A INPUT")] == ["-A INPUT -j BULKHEAD-IN"]
        apply(ns, remove_iptables(context(prefix)), "nft")
        assert "BULKHEAD" not in in_ns(ns, ["iptables-nft-save"]).stdout


@pytest.mark.privileged
def test_xt_cgroup_path_is_relative_to_the_cgroup2_root(privileged: None) -> None:
    """The finding behind xt_cgroup_path(): nft's path (under /sys/fs/cgroup) and xt_cgroup's
    (under the cgroup2 root) differ on a hybrid host; the level picks the right suffix."""
    with cgroups(("svc",)) as (_dir, prefix), netns() as ns:
        nft_path = f"{prefix}/svc"
        xt = xt_cgroup_path(nft_path, 2)
        assert xt is not None and not xt.startswith("unified/")
        ok = in_ns(ns, ["iptables-legacy", "-A", "OUTPUT", "-m", "cgroup", "--path", xt],
                   check=False)
        assert ok.returncode == 0, ok.stderr
        if nft_path != xt:  # hybrid host: nft's spelling names no cgroup for xt_cgroup
            bad = in_ns(ns, ["iptables-legacy", "-A", "OUTPUT", "-m", "cgroup", "--path",
                             nft_path], check=False)
            assert bad.returncode != 0


# Real packets. Every host is a namespace on one bridge (bulkhead.lab.netns); only the
# workload under test runs our firewall, so each probe shows its side's verdict.
PACKETS = """
version: 1
ip_lists:
  - {name: ops, cidrs: ["10.77.9.0/24", "fd77:9::/64"]}
  - {name: vip, cidrs: ["10.77.0.4/32"]}
services:
  - {name: web, ports: ["tcp/80", "tcp/8000-8010"]}
  - {name: dns, ports: ["udp/53", "tcp/53"]}
  - {name: mysql, ports: ["tcp/3306"], process: mysqld}
  - {name: ghost, ports: ["tcp/3307"], process: ghostd}
user_groups:
  - {name: admins, members: [alice, bob]}
workloads:
  - {name: srv, ips: [10.77.0.1, 10.77.0.4, "fd77::1"], labels: {role: srv}, managed: true}
  - {name: cache, ips: [10.77.0.6, "fd77::6"], labels: {role: cache}, managed: true}
  - {name: web, ips: [10.77.0.2, "fd77::2"], labels: {role: web}, managed: true}
  - {name: db, ips: [10.77.0.5, "fd77::5"], labels: {role: db}, managed: true}
rulesets:
  - name: t
    rules:
      - {id: web-srv, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: srv}}], services: [web, dns, "icmp/8", "icmpv6/128"]}
      - {id: db-srv, action: allow, consumers: [{labels: {role: db}}],
         providers: [{labels: {role: srv}}], services: ["tcp/80", "tcp/5432"]}
      - {id: fence, action: override_deny, consumers: [{labels: {role: db}}],
         providers: [{labels: {role: srv}}], services: ["tcp/80", "udp/53"]}
      - {id: no-8005, action: deny, consumers: [{all_workloads: true}],
         providers: [{all_workloads: true}], services: ["tcp/8005", "tcp/9000"]}
      - {id: ops-ssh, action: allow, consumers: [{ip_list: ops}],
         providers: [{all_workloads: true}], services: ["tcp/22"]}
      - {id: vip, action: allow, consumers: [{labels: {role: web}}],
         providers: [{ip_list: vip}], services: ["tcp/7100"]}
      - {id: admins, action: allow, consumers: [{user_group: admins}],
         providers: [{labels: {role: srv}}], services: ["tcp/2222"]}
      - {id: sql, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: srv}}], services: [mysql, ghost]}
      - {id: web-cache, action: allow, consumers: [{labels: {role: web}}],
         providers: [{labels: {role: cache}}], services: ["udp/5353", "tcp/6379"]}
"""
LAB_HOSTS = (("srv", "10.77.0.1", "fd77::1"), ("web", "10.77.0.2", "fd77::2"),
             ("db", "10.77.0.5", "fd77::5"), ("cache", "10.77.0.6", "fd77::6"),
             ("ops", "10.77.9.9", "fd77:9::9"), ("ext", "10.77.8.8", "fd77:8::8"))
TCP = (22, 53, 80, 2222, 3306, 3307, 5432, 6379, 7100, 8005, 8007, 9000, 9999)
UDP = (53, 5353)
UIDS = {"alice": 4242, "carol": 4343}


SRV_LOCAL = ("10.77.0.1", "10.77.0.4", "fd77::1")  # srv's addresses, the vip included


def _variant(policy: Policy, w: str, state: str, outbound: str = "enforce") -> Policy:
    """The policy with `w` in `state` and the given outbound setting."""
    return replace(policy, settings=replace(policy.settings, outbound=outbound),  # type: ignore[arg-type]
                   workloads=tuple(replace(x, enforcement=state) if x.name == w  # type: ignore[arg-type]
                                   else x for x in policy.workloads))


LabFlow = tuple[str, str, str, int]  # (src ip, dst ip, "tcp" | "udp" | "icmp", port)


def _lab_flows(w: str, inbound: bool, with_icmp: bool) -> dict[str, list[LabFlow]]:
    """Probes by source host: every other host to `w` (inbound) or `w` to every other host."""
    addrs = {n: (a, b) for n, a, b in LAB_HOSTS}
    local = SRV_LOCAL if w == "srv" else addrs[w]
    out: dict[str, list[LabFlow]] = {}
    for other in (n for n, _a, _b in LAB_HOSTS if n != w):
        src_host = other if inbound else w
        for remote in addrs[other]:
            for mine in local:
                src, dst = (remote, mine) if inbound else (mine, remote)
                if (":" in src) != (":" in dst) or src not in addrs[src_host]:
                    continue  # probes leave from the host's primary address
                # the UDP responder answers from the primary address, which a connected
                # client socket ignores: no UDP to the secondary one
                udp = [] if dst == "10.77.0.4" else [("udp", x) for x in UDP]
                icmp = [("icmp", 0)] if with_icmp else []
                out.setdefault(src_host, []).extend(
                    (src, dst, proto, port) for proto, port in [("tcp", x) for x in TCP]
                    + udp + icmp)
    return out


def _lab_probe(lab: Any, host: str, flows: list[LabFlow], uid: int | None) -> list[bool]:
    """Whether an answer came back (open or refused) for each flow, probing as `uid`."""
    from bulkhead.lab import probe as probe_module

    probes = [(d, proto, port) for _s, d, proto, port in flows]
    if uid is None:
        results = lab.probe(host, probes, timeout=0.8)
    else:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                sys.executable, "-I", probe_module.__file__, "--timeout", "0.8"]
        data = json.dumps([{"dst": d, "proto": p, "port": n} for d, p, n in probes])
        results = json.loads(lab.run(host, argv, input=data).stdout)
    return [r != "timeout" for r in results]


def _lab_flow(f: LabFlow, user: str | None) -> Flow:
    src, dst, proto, port = f
    if proto == "icmp":
        return Flow(src, dst, 58, 128) if ":" in dst else Flow(src, dst, 1, 8)
    return Flow(src, dst, 6 if proto == "tcp" else 17, port, user=user)


@dataclass
class PacketRun:
    """Applies one workload's artefact in its namespace and probes its side."""

    lab: Any
    policy: Policy
    ctx: HostContext
    wrong: list[str]
    seen: dict[tuple[str, str, str, str, int], bool]

    def check(self, w: str, state: str, *, inbound: bool, port_mode: bool = False,
              user: str | None = None, outbound: str = "enforce") -> None:
        p = _variant(self.policy, w, state, outbound)
        art = render_iptables(compile_naive(p)[w], self.ctx,
                              inbound_process="port" if port_mode else "cgroup")
        for argv, text in restore_commands(art):
            self.lab.run(w, argv, input=text)
        ev = Evaluator(_model(p, w, inbound=inbound, port_mode=port_mode))
        tag = "/".join([w, state, "in" if inbound else "out", str(user),
                        "port" if port_mode else "cgroup", outbound])
        for host, flows in _lab_flows(w, inbound, with_icmp=user is None).items():
            got = _lab_probe(self.lab, host, flows, UIDS[user] if user else None)
            for f, passed in zip(flows, got, strict=True):
                want = not ev.decide(_lab_flow(f, user)).decision.startswith("blocked")
                self.seen[(tag, *f)] = passed
                if passed != want:
                    self.wrong.append(f"{tag} {f}: firewall {'passed' if passed else 'dropped'}"
                                      f", evaluator says {'pass' if want else 'drop'}")


@pytest.mark.privileged
def test_packets_match_the_evaluator(privileged: None) -> None:
    from bulkhead.lab.netns import HostSpec, NetnsLab

    hosts = [HostSpec(n, a, b) for n, a, b in LAB_HOSTS]
    wrong: list[str] = []
    seen: dict[tuple[str, str, str, str, int], bool] = {}
    with NetnsLab(hosts, v4_net="10.77.0.0/16", v6_net="fd77::/16") as lab:
        lab.run("srv", ["ip", "addr", "add", "10.77.0.4/16", "dev", "eth0"])
        for name, _a, _b in LAB_HOSTS:
            lab.serve(name, tcp=[p for p in TCP if (name, p) != ("srv", 3306)], udp=UDP)
        lab.serve("srv", tcp=[3306], cgroup="mysqld")  # the one bound port with a cgroup
        ctx = HostContext(cgroups={"mysqld": (lab.cgroup_path("mysqld"),
                                              lab.cgroup_level("mysqld"))}, uids=UIDS)
        run_ = PacketRun(lab, _policy(PACKETS, "packets.yaml"), ctx, wrong, seen)
        for state in STATES:
            run_.check("srv", state, inbound=True)
        run_.check("srv", "full", inbound=True, port_mode=True)
        for argv, text in restore_commands(remove_iptables(ctx)):
            lab.run("srv", argv, input=text)
        for state in ("full", "selective"):
            for user in (None, *UIDS):
                run_.check("web", state, inbound=False, user=user)
        run_.check("web", "full", inbound=False, outbound="allow")
    assert not wrong, f"{len(wrong)} mismatches:\n" + "\n".join(wrong[:40])
    web, db, ops, srv = "10.77.0.2", "10.77.0.5", "10.77.9.9", "10.77.0.1"
    full, port = "srv/full/in/None/cgroup/enforce", "srv/full/in/None/port/enforce"
    out = "web/full/out/{}/cgroup/enforce"
    assert not seen[(full, web, srv, "tcp", 3306)]  # process-bound allow fails closed ...
    assert seen[(port, web, srv, "tcp", 3306)]  # ... unless matched by port alone
    assert seen[(full, web, srv, "tcp", 8005)]  # allowed across the boundary
    assert not seen[(full, db, srv, "tcp", 8005)]  # deny
    assert not seen[(full, db, srv, "tcp", 80)]  # override_deny beats allow
    assert seen[(full, ops, srv, "tcp", 22)]  # IP-list peer
    assert not seen[(full, web, srv, "tcp", 7100)]  # `local`: not the vip ...
    assert seen[(full, web, "10.77.0.4", "tcp", 7100)]  # ... but the vip
    assert seen[(full, "fd77::2", "fd77::1", "icmp", 0)]
    assert seen[(out.format("alice"), web, srv, "tcp", 2222)]  # uid-owner
    assert not seen[(out.format("carol"), web, srv, "tcp", 2222)]
    assert not seen[(out.format(None), web, srv, "tcp", 2222)]
    assert seen[(out.format(None), web, "10.77.0.6", "udp", 5353)]
    assert seen[("srv/selective/in/None/cgroup/enforce", "10.77.8.8", srv, "tcp", 9999)]
    assert seen[("web/full/out/None/cgroup/allow", web, srv, "tcp", 2222)]
