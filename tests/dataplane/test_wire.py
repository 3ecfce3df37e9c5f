"""The compiled policy on the wire: round trips (real policies and generated ones, through JSON
text), the format pinned by one literal example, and `WireError` paths for bad input."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.iptables import render_iptables
from bulkhead.dataplane.model import (
    CompiledRule,
    CompiledWorkload,
    Endpoint,
    HostContext,
    PeerSet,
)
from bulkhead.dataplane.nftables import render_nftables
from bulkhead.dataplane.wire import FORMAT, WireError, from_data, to_data
from bulkhead.domain.addresses import AddressSet
from bulkhead.domain.ports import PortSpec
from bulkhead.policy.compile import compile_naive
from bulkhead.policy.fileformat import load_policy
from bulkhead.policy.resolve import ResolvedService

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def through_json(cw: CompiledWorkload) -> CompiledWorkload:
    return from_data(json.loads(json.dumps(to_data(cw))))


@pytest.mark.parametrize("name", ["shop.yaml", "shop-v2.yaml"])
def test_round_trip_of_example_policies(name: str) -> None:
    compiled = compile_naive(load_policy(str(EXAMPLES / name)))
    assert compiled
    for cw in compiled.values():
        assert through_json(cw) == cw


def test_agent_renders_the_same_firewall_from_the_wire() -> None:
    ctx = HostContext(control_plane=(Endpoint("192.0.2.10", 8443),))
    for cw in compile_naive(load_policy(str(EXAMPLES / "shop.yaml"))).values():
        got = through_json(cw)
        assert render_nftables(got, ctx) == render_nftables(cw, ctx)
        assert render_iptables(got, ctx) == render_iptables(cw, ctx)


SAMPLE = CompiledWorkload(
    workload="db-1", addresses=("10.0.0.5", "fd00::5"), enforcement="full", os="linux",
    outbound_mode="enforce",
    inbound=(CompiledRule(
        "allow", PeerSet(frozenset({"10.0.0.7", "10.0.0.10", "10.0.0.8", "fd00::9"}),
                         AddressSet.from_blocks(["192.168.0.0/16", "2001:db8::/120"])),
        (ResolvedService(PortSpec(6, 3306, 3306), process="mysqld"),
         ResolvedService(PortSpec(1, 8, 8))), "app/0", 3),),
    outbound=(CompiledRule("deny", PeerSet(), (ResolvedService(PortSpec(None)),), "fence", 0,
                           local=AddressSet.of_ips(["10.0.0.5"]),
                           users=frozenset({"bob", "alice"})),),
)


def test_the_format_is_pinned() -> None:
    assert to_data(SAMPLE) == {
        "format": 1, "workload": "db-1", "addresses": ["10.0.0.5", "fd00::5"],
        "enforcement": "full", "os": "linux", "outbound_mode": "enforce",
        "inbound": [{
            "action": "allow", "rule_id": "app/0", "instance": 3,
            "peers": {"hosts": ["10.0.0.7-10.0.0.8", "10.0.0.10", "fd00::9"],
                      "nets": ["192.168.0.0-192.168.255.255", "2001:db8::-2001:db8::ff"]},
            "services": [
                {"proto": 6, "lo": 3306, "hi": 3306, "process": "mysqld", "unit": None},
                {"proto": 1, "lo": 8, "hi": 8, "process": None, "unit": None}],
            "local": None, "users": None}],
        "outbound": [{
            "action": "deny", "rule_id": "fence", "instance": 0,
            "peers": {"hosts": [], "nets": []},
            "services": [{"proto": None, "lo": None, "hi": None, "process": None,
                          "unit": None}],
            "local": ["10.0.0.5"], "users": ["alice", "bob"]}],
    }
    assert through_json(SAMPLE) == SAMPLE


def _bad(mutate: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(to_data(SAMPLE)))
    mutate(data)
    return data  # type: ignore[no-any-return]


@pytest.mark.parametrize(("mutate", "path"), [
    (lambda d: d.update(format=2), "format"),
    (lambda d: d.pop("workload"), "workload"),
    (lambda d: d.update(enforcement="strict"), "enforcement"),
    (lambda d: d.update(os="plan9"), "os"),
    (lambda d: d["addresses"].append("10.0.0.300"), "addresses[2]"),
    (lambda d: d.update(inbound={}), "inbound"),
    (lambda d: d["inbound"][0].update(action="maybe"), "inbound[0].action"),
    (lambda d: d["inbound"][0].update(instance=-1), "inbound[0].instance"),
    (lambda d: d["inbound"][0].update(instance=True), "inbound[0].instance"),
    (lambda d: d["inbound"][0]["peers"]["hosts"].append(7), "inbound[0].peers.hosts[3]"),
    (lambda d: d["inbound"][0]["peers"].update(hosts=["10.0.0.0/8"]), "inbound[0].peers.hosts"),
    (lambda d: d["inbound"][0]["peers"].update(nets=["10.0.0.9-10.0.0.1"]),
     "inbound[0].peers.nets"),
    (lambda d: d["inbound"][0]["services"][0].update(lo=70000), "inbound[0].services[0].lo"),
    (lambda d: d["inbound"][0]["services"][0].update(hi=None), "inbound[0].services[0].hi"),
    (lambda d: d["inbound"][0]["services"][0].update(lo=4000), "inbound[0].services[0].lo"),
    (lambda d: d["inbound"][0]["services"][0].update(proto=None),
     "inbound[0].services[0].lo"),
    (lambda d: d["outbound"][0].update(users=[""]), "outbound[0].users[0]"),
    (lambda d: d["outbound"][0].update(local="10.0.0.5"), "outbound[0].local"),
])
def test_bad_input_names_the_field(mutate: Any, path: str) -> None:
    with pytest.raises(WireError) as err:
        from_data(_bad(mutate))
    assert err.value.path == path


def test_not_an_object() -> None:
    with pytest.raises(WireError, match="expected an object"):
        from_data([FORMAT])


# -- generated compiled workloads -------------------------------------------------------------
v4 = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
v6 = st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i)))
ips = st.one_of(v4, v6)


@st.composite
def address_sets(draw: st.DrawFn) -> AddressSet:
    def intervals(bits: int) -> list[tuple[int, int]]:
        pairs = draw(st.lists(st.tuples(st.integers(0, 2**bits - 1),
                                        st.integers(0, 2**bits - 1)), max_size=4))
        return [(min(a, b), max(a, b)) for a, b in pairs]

    return AddressSet.build(intervals(32), intervals(128))


@st.composite
def services(draw: st.DrawFn) -> ResolvedService:
    proto = draw(st.sampled_from([None, 1, 6, 17, 47, 58, 132]))
    spec = PortSpec(proto)
    if proto in (6, 17, 132) and draw(st.booleans()):
        lo = draw(st.integers(1, 65535))
        spec = PortSpec(proto, lo, draw(st.integers(lo, 65535)))
    elif proto in (1, 58) and draw(st.booleans()):
        t = draw(st.integers(0, 255))
        spec = PortSpec(proto, t, t)
    names = st.none() | st.text("abcdefgh.-_/", min_size=1, max_size=12)
    return ResolvedService(spec, draw(names), draw(names))


@st.composite
def rules(draw: st.DrawFn) -> CompiledRule:
    users = st.none() | st.frozensets(st.text("abcxyz", min_size=1, max_size=5), max_size=3)
    return CompiledRule(
        draw(st.sampled_from(["allow", "deny", "override_deny"])),
        PeerSet(draw(st.frozensets(ips, max_size=6)), draw(address_sets())),
        tuple(draw(st.lists(services(), max_size=4))),
        draw(st.text("abcdef/0123456789", min_size=1, max_size=10)),
        draw(st.integers(0, 10_000)),
        draw(st.none() | address_sets()),
        draw(users),
    )


@st.composite
def workloads(draw: st.DrawFn) -> CompiledWorkload:
    return CompiledWorkload(
        draw(st.text("abcdefgh-0123456789", min_size=1, max_size=12)),
        tuple(draw(st.lists(ips, max_size=3, unique=True))),
        draw(st.sampled_from(["idle", "visibility", "selective", "full"])),
        draw(st.sampled_from(["linux", "windows"])),
        draw(st.sampled_from(["enforce", "allow"])),
        tuple(draw(st.lists(rules(), max_size=3))),
        tuple(draw(st.lists(rules(), max_size=3))),
    )


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_round_trip_of_generated_workloads(cw: CompiledWorkload) -> None:
    assert through_json(cw) == cw
