"""The batch evaluator agrees with the reference evaluator (`Evaluator.decide`) on every row."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from bench.synth import make_flows, make_policy
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.domain.model import Actor, Policy, Rule, Ruleset, Selector, UserGroup
from bulkhead.policy import batch
from bulkhead.policy.batch import BatchEvaluator, BatchResult
from bulkhead.policy.evaluate import DECISIONS, Decision, Evaluator, Flow
from bulkhead.policy.fileformat import load_policy
from bulkhead.policy.resolve import resolve
from tests.strategies import flows_for, policies

SHOP = Path(__file__).resolve().parents[2] / "examples" / "policies" / "shop.yaml"


def run(be: BatchEvaluator, flows: list[Flow]) -> BatchResult:
    return be.evaluate([f.src_ip for f in flows], [f.dst_ip for f in flows],
                       [f.proto for f in flows],
                       [-1 if f.dst_port is None else f.dst_port for f in flows],
                       process=[f.process for f in flows], unit=[f.unit for f in flows],
                       user=[f.user for f in flows])


def v4_int(ip: str) -> int | None:
    """The address as an integer when `ip` is IPv4 in canonical form (the uint32 fast path)."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return int(a) if a.version == 4 and str(a) == ip else None


def assert_agrees(policy: Policy, flows: list[Flow]) -> None:
    ev = Evaluator(policy)
    be = BatchEvaluator(policy)
    expected = [ev.decide(f) for f in flows]
    res = run(be, flows)
    assert len(res) == len(flows)
    for i, f in enumerate(flows):
        assert res.row(i) == expected[i], (i, f)
    assert res.decisions() == [d.decision for d in expected]
    assert res.sides() == [d.side for d in expected]
    assert [res.rules(i) for i in range(len(flows))] == [d.rules for d in expected]
    assert len(set(res.patterns)) == len(res.patterns)
    # the same flows again (memo tables warm), then the IPv4 rows as uint32 columns
    again = run(be, flows)
    assert [again.row(i) for i in range(len(flows))] == expected
    rows = [i for i, f in enumerate(flows)
            if v4_int(f.src_ip) is not None and v4_int(f.dst_ip) is not None]
    if rows:
        sub = [flows[i] for i in rows]
        fast = be.evaluate(np.array([v4_int(f.src_ip) for f in sub], np.uint32),
                           np.array([v4_int(f.dst_ip) for f in sub], np.uint32),
                           np.array([f.proto for f in sub]),
                           np.array([-1 if f.dst_port is None else f.dst_port for f in sub]),
                           process=[f.process for f in sub], unit=[f.unit for f in sub],
                           user=[f.user for f in sub])
        assert [fast.row(j) for j in range(len(sub))] == [expected[i] for i in rows]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_batch_equals_reference_on_random_policies(data: st.DataObject) -> None:
    policy = data.draw(policies(), label="policy")
    flows = data.draw(st.lists(flows_for(policy, odd_spellings=True), min_size=1, max_size=40),
                      label="flows")
    assert_agrees(policy, flows)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_batch_equals_reference_without_memo_tables(data: st.DataObject) -> None:
    """The np.unique path used when class-pair tables would be too large."""
    policy = data.draw(policies(), label="policy")
    flows = data.draw(st.lists(flows_for(policy), min_size=1, max_size=40), label="flows")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch, "DENSE_LIMIT", 1)
        assert_agrees(policy, flows)


def test_synthetic_policy_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = make_policy(400, 80, seed=7)
    cols = make_flows(policy, 5_000, seed=7)
    monkeypatch.setattr(batch, "CHUNK", 1_000)
    be = BatchEvaluator(resolve(policy))
    res = be.evaluate(cols.src, cols.dst, cols.proto, cols.port)
    ev = Evaluator(policy)
    for i in range(0, 5_000, 3):
        f = Flow(str(ipaddress.IPv4Address(int(cols.src[i]))),
                 str(ipaddress.IPv4Address(int(cols.dst[i]))), int(cols.proto[i]),
                 None if cols.port[i] < 0 else int(cols.port[i]))
        assert res.row(i) == ev.decide(f), (i, f)
    assert len({res.decisions()[i] for i in range(5_000)}) >= 5


# -- examples on the shop policy --------------------------------------------------------------

@pytest.fixture(scope="module")
def shop() -> Policy:
    return load_policy(str(SHOP))


def decide_all(policy: Policy, flows: list[Flow]) -> list[Decision]:
    res = run(BatchEvaluator(policy), flows)
    ev = Evaluator(policy)
    out = [res.row(i) for i in range(len(flows))]
    assert out == [ev.decide(f) for f in flows]
    return out


def test_every_decision_of_the_vocabulary(shop: Policy) -> None:
    soft_pay = replace(shop, workloads=tuple(
        replace(w, enforcement="visibility") if w.name == "pay-1" else w
        for w in shop.workloads))
    cases = [
        (shop, Flow("10.0.1.10", "10.0.1.20", 6, 8080),
         Decision("allowed", "provider", ("web-api",))),
        (shop, Flow("10.0.5.10", "10.0.5.30", 6, 3306, process="/usr/sbin/mysqld"),
         Decision("allowed_across_boundary", "provider", ("web-dev-db", "no-db-from-web"))),
        (shop, Flow("10.0.5.10", "10.0.2.10", 6, 443),
         Decision("blocked_by_override_deny", "provider", ("pci-fence",))),
        (soft_pay, Flow("10.0.5.10", "10.0.2.10", 6, 443),
         Decision("potentially_blocked_by_override_deny", "provider", ("pci-fence",))),
        (shop, Flow("10.0.1.10", "10.0.1.30", 6, 3306),
         Decision("blocked_by_deny", "provider", ("no-db-from-web",))),
        (shop, Flow("10.0.5.10", "10.0.5.30", 6, 22),
         Decision("potentially_blocked_by_deny", "provider", ("no-db-from-web",))),
        (shop, Flow("10.0.1.10", "10.0.1.11", 6, 22), Decision("blocked_no_rule", "provider", ())),
        (shop, Flow("10.0.5.30", "10.0.5.10", 6, 80),
         Decision("potentially_blocked_no_rule", "provider", ())),
        (shop, Flow("10.9.0.5", "203.0.113.7", 6, 443), Decision("unknown", "", ())),
    ]
    seen = set()
    for policy, flow, want in cases:
        assert decide_all(policy, [flow]) == [want], flow
        seen.add(want.decision)
    assert seen == set(DECISIONS)


def test_worst_side_wins_and_is_named(shop: Policy) -> None:
    # web-1 (full) -> db-dev (visibility): the consumer side blocks, the provider only reports
    [d] = decide_all(shop, [Flow("10.0.1.10", "10.0.5.30", 6, 3306)])
    assert d == Decision("blocked_by_deny", "consumer", ("no-db-from-web",))


def test_ipv6_and_ip_list_exclusions(shop: Policy) -> None:
    flows = [
        Flow("2001:db8::7", "fd00:1::10", 6, 443),  # internet -> web-1 over IPv6
        Flow("fd00::5", "fd00:1::10", 6, 443),  # fd00::/8 is excluded from internet
        Flow("203.0.113.7", "10.0.1.10", 6, 443),  # internet -> web-1
        Flow("10.0.9.9", "10.0.1.10", 6, 443),  # 10.0.0.0/8 is excluded from internet
        Flow("FD00:1:0:0:0:0:0:10", "FD00:1::20", 6, 8080),  # web-1 -> api-1, odd spelling
        Flow("10.9.0.5", "10.0.1.30", 6, 22),  # jump is unmanaged but in the admins list
    ]
    got = decide_all(shop, flows)
    assert [(d.decision, d.rules) for d in got] == [
        ("allowed", ("internet-web",)),
        ("blocked_no_rule", ()),
        ("allowed", ("internet-web",)),
        ("blocked_no_rule", ()),
        ("allowed", ("web-api",)),
        ("allowed", ("admin-ssh",)),
    ]


def test_uint32_fast_path_equals_strings(shop: Policy) -> None:
    ips = [ip for w in shop.workloads for ip in w.ips if ":" not in ip]
    ips += ["203.0.113.7", "10.9.0.77", "10.0.9.9", "0.0.0.0", "255.255.255.255"]
    src = [s for s in ips for _ in ips]
    dst = [d for _ in ips for d in ips]
    n = len(src)
    proto = np.array([6, 6, 17, 1] * n)[:n]
    port = np.array([443, 3306, 53, 8] * n)[:n]
    be = BatchEvaluator(shop)
    by_text = be.evaluate(src, dst, proto, port)
    as_int = be.evaluate(np.array([int(ipaddress.IPv4Address(s)) for s in src], np.uint32),
                         np.array([int(ipaddress.IPv4Address(d)) for d in dst], np.uint32),
                         proto, port)
    as_int64 = be.evaluate([int(ipaddress.IPv4Address(s)) for s in src],
                           np.array([int(ipaddress.IPv4Address(d)) for d in dst], np.int64),
                           proto, port)
    for res in (as_int, as_int64):
        assert [res.row(i) for i in range(n)] == [by_text.row(i) for i in range(n)]
    ev = Evaluator(shop)
    assert [by_text.row(i) for i in range(n)] == [
        ev.decide(Flow(src[i], dst[i], int(proto[i]), int(port[i]))) for i in range(n)]


def test_bad_addresses_name_the_row(shop: Policy) -> None:
    be = BatchEvaluator(shop)
    with pytest.raises(ValueError, match=r"row 2\b.*not-an-ip"):
        be.evaluate(["10.0.1.10"] * 3, ["10.0.1.20", "10.0.1.20", "not-an-ip"], [6] * 3,
                    [443] * 3)
    with pytest.raises(ValueError, match=r"row 1\b"):
        be.evaluate(["10.0.1.10", "10.0.1.300"], ["10.0.1.20"] * 2, [6] * 2, [443] * 2)
    with pytest.raises(ValueError, match=r"row 1\b"):
        be.evaluate(np.array([1, 2**32], np.int64), np.array([1, 2], np.int64), [6] * 2,
                    [443] * 2)
    with pytest.raises(ValueError, match="rows"):
        be.evaluate(["10.0.1.10"], ["10.0.1.20"] * 2, [6] * 2, [443] * 2)


def test_empty_batch_and_result_api(shop: Policy) -> None:
    be = BatchEvaluator(shop)
    empty = be.evaluate([], [], np.array([], np.int64), np.array([], np.int64))
    assert len(empty) == 0 and empty.decisions() == [] and empty.patterns == []
    res = be.evaluate(np.array([int(ipaddress.IPv4Address("10.0.1.10"))] * 2, np.uint32),
                      ["10.0.1.20", "10.0.1.11"], [6, 6], [8080, 22])
    assert res.decision.dtype == np.uint8 and res.side.dtype == np.uint8
    assert res.pattern.dtype == np.int32
    assert res.decisions() == ["allowed", "blocked_no_rule"]
    assert res.sides() == ["provider", "provider"]
    assert res.rules(0) == ("web-api",) and res.rules(1) == ()
    assert [DECISIONS[c] for c in res.decision] == res.decisions()


def test_integer_dtypes_of_proto_and_port(shop: Policy) -> None:
    be = BatchEvaluator(shop)
    src, dst = ["10.0.1.10"] * 4, ["10.0.1.20", "10.0.1.20", "10.0.1.30", "10.0.1.11"]
    want = [be.evaluate(src, dst, [6, 6, 6, 1], [8080, 8082, 3306, 8]).row(i) for i in range(4)]
    for pt, dt in [(np.uint8, np.uint16), (np.int8, np.int16), (np.uint16, np.uint32),
                   (np.int16, np.uint64), (np.uint64, np.int32)]:
        res = be.evaluate(src, dst, np.array([6, 6, 6, 1], pt),
                          np.array([8080, 8082, 3306, 8], dt))
        assert [res.row(i) for i in range(4)] == want, (pt, dt)
    res = be.evaluate(src, dst, [6] * 4, np.array([-1, 1, 2, 3], np.int8))
    assert res.decisions() == ["blocked_no_rule", "blocked_no_rule", "blocked_by_deny",
                               "blocked_no_rule"]
    with pytest.raises(ValueError, match="integers"):
        be.evaluate(src, dst, [6.0] * 4, [80] * 4)


@pytest.mark.parametrize("max_tables", [0, 1, 2, 128])
def test_v4_radix_index_equals_binary_search(max_tables: int) -> None:
    rng = np.random.default_rng(max_tables)
    starts = np.unique(np.concatenate([
        [0], rng.integers(0, 2**32, 300), 0x0A000000 + rng.integers(0, 2**16, 2000),
        0xC0A80000 + np.arange(0, 2**16, 7), [2**32 - 1]]).astype(np.uint32))
    index = batch._V4Index(starts, max_tables=max_tables)
    x = np.concatenate([starts, starts - 1, starts + 1, rng.integers(0, 2**32, 20_000),
                        0x0A000000 + rng.integers(0, 2**16, 20_000)]).astype(np.uint32)
    want = np.searchsorted(starts, x, side="right") - 1
    assert np.array_equal(index.find(x), want)


def test_user_groups_and_bound_services_in_batch(shop: Policy) -> None:
    dba = Rule("allow", (Actor("user_group", name="dba"),),
               (Actor("labels", selector=Selector.of({"role": "db"})),), ("mysql", "ssh"),
               id="dba")
    policy = replace(shop, user_groups=(UserGroup("dba", ("alice", "bob")),),
                     rulesets=(*shop.rulesets, Ruleset("users", (dba,))))
    flows = [Flow(src, dst, 6, port, process, None, user)
             for src in ("10.0.1.10", "10.9.0.5", "203.0.113.7")
             for dst in ("10.0.1.30", "10.0.5.30")
             for port, process in ((3306, "mysqld"), (3306, None), (22, None))
             for user in (None, "alice", "carol")]
    assert_agrees(policy, flows)
    # the rule matches (and is reported) but only the consumer's host could see the user, and
    # jump is unmanaged: db-dev's provider side decides without it
    got = decide_all(policy, [Flow("10.9.0.5", "10.0.5.30", 6, 3306, "/usr/sbin/mysqld",
                                   user="alice")])
    assert got == [Decision("potentially_blocked_no_rule", "provider", ("dba",))]
