from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkhead.domain.ports import PortSpec, PortSpecError, parse_proto


@pytest.mark.parametrize(("text", "spec"), [
    ("tcp/443", PortSpec(6, 443, 443)),
    ("UDP/53", PortSpec(17, 53, 53)),
    ("tcp/8000-8099", PortSpec(6, 8000, 8099)),
    ("tcp", PortSpec(6)),
    ("icmp", PortSpec(1)),
    ("icmp/8", PortSpec(1, 8, 8)),
    ("icmpv6/128", PortSpec(58, 128, 128)),
    ("any", PortSpec(None)),
    ("proto/47", PortSpec(47)),
    ("gre", PortSpec(47)),
    ("47", PortSpec(47)),
])
def test_parse(text: str, spec: PortSpec) -> None:
    assert PortSpec.parse(text) == spec
    assert PortSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["tcp/0", "tcp/65536", "tcp/9-1", "icmp/1-3", "gre/1",
                                  "foo/1", "tcp/x", "300", "icmp/256", "proto/0", "proto/²",
                                  "tcp/1²", "²"])
def test_reject(text: str) -> None:
    with pytest.raises(PortSpecError):
        PortSpec.parse(text)


def test_matching_and_containment() -> None:
    rng = PortSpec.parse("tcp/8000-8099")
    assert rng.matches(6, 8050) and not rng.matches(6, 8100) and not rng.matches(17, 8050)
    assert PortSpec.parse("icmp").matches(1, 3) and not PortSpec.parse("icmp/8").matches(1, 0)
    assert PortSpec.parse("any").matches(47, None)
    assert rng.contains(PortSpec.parse("tcp/8080"))
    assert PortSpec.parse("tcp").contains(rng) and not rng.contains(PortSpec.parse("tcp"))
    assert parse_proto("6") == 6 and parse_proto("ipv6-icmp") == 58


specs = st.one_of(
    st.just(PortSpec(None)),
    st.sampled_from([6, 17]).flatmap(lambda p: st.one_of(
        st.just(PortSpec(p)),
        st.tuples(st.integers(1, 100), st.integers(0, 20)).map(
            lambda t, p=p: PortSpec(p, t[0], t[0] + t[1])))))


@given(specs, specs, st.sampled_from([6, 17]), st.integers(1, 130))
def test_contains_agrees_with_matches(a: PortSpec, b: PortSpec, proto: int, port: int) -> None:
    if a.contains(b) and b.matches(proto, port):
        assert a.matches(proto, port)


@given(st.text(max_size=12))
def test_any_text_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        spec = PortSpec.parse(text)
    except PortSpecError:
        return
    assert PortSpec.parse(str(spec)) == spec
