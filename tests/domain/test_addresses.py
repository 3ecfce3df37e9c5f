from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from bulkhead.domain.addresses import AddressSet, parse_block


def test_exclusions_and_rendering() -> None:
    s = AddressSet.from_blocks(["10.0.0.0/8", "192.168.1.1", "2001:db8::/32"],
                               ["10.1.0.0/16", "2001:db8::1"])
    assert s.contains("10.0.0.1") and not s.contains("10.1.2.3") and s.contains("10.2.0.0")
    assert s.contains("2001:db8::2") and not s.contains("2001:db8::1")
    assert list(s.singles(4)) == ["192.168.1.1"]
    cidrs = list(s.cidrs(4))
    assert "10.0.0.0/16" in cidrs and "10.1.0.0/16" not in cidrs and "192.168.1.1/32" in cidrs
    assert sum(ipaddress.ip_network(c).num_addresses for c in cidrs) == 2**24 - 2**16 + 1


def test_ranges() -> None:
    assert parse_block("10.0.0.1-10.0.0.9")[1:] == (int(ipaddress.ip_address("10.0.0.1")),
                                                     int(ipaddress.ip_address("10.0.0.9")))
    s = AddressSet.from_blocks(["10.0.0.1-10.0.0.9"])
    assert list(s.ranges(4)) == [("10.0.0.1", "10.0.0.9")]
    assert s.size() == 9


intervals = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)).map(
    lambda t: (t[0], t[0] + t[1])), max_size=6)


def as_set(iv: list[tuple[int, int]]) -> set[int]:
    return {x for lo, hi in iv for x in range(lo, hi + 1)}


@given(intervals, intervals, st.integers(0, 240))
def test_union_and_difference_are_exact(a: list[tuple[int, int]], b: list[tuple[int, int]],
                                        probe: int) -> None:
    sa, sb = AddressSet.build(a), AddressSet.build(b)
    assert (probe in as_set(a) | as_set(b)) == (sa | sb).contains_int(4, probe)
    assert (probe in as_set(a) - as_set(b)) == (sa - sb).contains_int(4, probe)
    assert (sa | sb).size() == len(as_set(a) | as_set(b))
