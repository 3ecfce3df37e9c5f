"""Address sets as sorted, disjoint integer intervals per family.

IP lists (CIDRs and `a-b` ranges minus exclusions) and the resolved peers of compiled rules are
`AddressSet`s. Intervals keep union, difference and membership exact and cheap, and render to
single addresses, CIDRs or ranges for each firewall.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

Interval = tuple[int, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
V4_MAX = 2**32 - 1
V6_MAX = 2**128 - 1


def parse_ip(text: str) -> IPAddress:
    """An address in canonical form; raises ValueError with a readable message."""
    try:
        return ipaddress.ip_address(text.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"not an IP address: {text!r}") from None


def canonical_ip(text: str) -> str:
    return str(parse_ip(text))


def parse_block(text: str) -> tuple[int, int, int]:
    """`10.0.0.0/8`, `10.0.0.1`, `10.0.0.1-10.0.0.9`, `2001:db8::/32` → (family, lo, hi)."""
    t = text.strip()
    if "-" in t:
        a_s, _, b_s = t.partition("-")
        a, b = parse_ip(a_s), parse_ip(b_s)
        if a.version != b.version:
            raise ValueError(f"range mixes IPv4 and IPv6: {text!r}")
        if int(a) > int(b):
            raise ValueError(f"range is reversed: {text!r}")
        return a.version, int(a), int(b)
    try:
        net = ipaddress.ip_network(t, strict=False)
    except ValueError:
        raise ValueError(f"not an address, CIDR or range: {text!r}") from None
    return net.version, int(net.network_address), int(net.broadcast_address)


def _normalise(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1][1] = hi
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def _subtract(base: tuple[Interval, ...], cut: tuple[Interval, ...]) -> tuple[Interval, ...]:
    out: list[Interval] = []
    j = 0
    for lo, hi in base:
        cur = lo
        while j < len(cut) and cut[j][1] < cur:
            j += 1
        k = j
        while k < len(cut) and cut[k][0] <= hi and cur <= hi:
            c_lo, c_hi = cut[k]
            if c_lo > cur:
                out.append((cur, c_lo - 1))
            cur = max(cur, c_hi + 1)
            k += 1
        if cur <= hi:
            out.append((cur, hi))
    return tuple(out)


def _contains(intervals: tuple[Interval, ...], starts: tuple[int, ...], value: int) -> bool:
    i = bisect_right(starts, value) - 1
    return i >= 0 and intervals[i][1] >= value


@dataclass(frozen=True)
class AddressSet:
    v4: tuple[Interval, ...] = ()
    v6: tuple[Interval, ...] = ()
    _v4_starts: tuple[int, ...] = field(default=(), compare=False, repr=False, hash=False)
    _v6_starts: tuple[int, ...] = field(default=(), compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_v4_starts", tuple(a for a, _ in self.v4))
        object.__setattr__(self, "_v6_starts", tuple(a for a, _ in self.v6))

    @classmethod
    def build(cls, v4: Iterable[Interval] = (), v6: Iterable[Interval] = ()) -> AddressSet:
        return cls(_normalise(v4), _normalise(v6))

    @classmethod
    def from_blocks(cls, include: Iterable[str], exclude: Iterable[str] = ()) -> AddressSet:
        inc = cls._parse(include)
        exc = cls._parse(exclude)
        return inc - exc

    @classmethod
    def _parse(cls, blocks: Iterable[str]) -> AddressSet:
        v4: list[Interval] = []
        v6: list[Interval] = []
        for b in blocks:
            fam, lo, hi = parse_block(b)
            (v4 if fam == 4 else v6).append((lo, hi))
        return cls.build(v4, v6)

    @classmethod
    def of_ips(cls, ips: Iterable[str]) -> AddressSet:
        v4: list[Interval] = []
        v6: list[Interval] = []
        for ip in ips:
            a = parse_ip(ip)
            (v4 if a.version == 4 else v6).append((int(a), int(a)))
        return cls.build(v4, v6)

    def __or__(self, other: AddressSet) -> AddressSet:
        return AddressSet.build(self.v4 + other.v4, self.v6 + other.v6)

    def __sub__(self, other: AddressSet) -> AddressSet:
        return AddressSet(_subtract(self.v4, other.v4), _subtract(self.v6, other.v6))

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)

    def contains(self, ip: str | IPAddress) -> bool:
        a = parse_ip(ip) if isinstance(ip, str) else ip
        if a.version == 4:
            return _contains(self.v4, self._v4_starts, int(a))
        return _contains(self.v6, self._v6_starts, int(a))

    def contains_int(self, version: int, value: int) -> bool:
        if version == 4:
            return _contains(self.v4, self._v4_starts, value)
        return _contains(self.v6, self._v6_starts, value)

    def singles(self, version: int) -> Iterator[str]:
        """Intervals of one address, as text."""
        mk = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        for lo, hi in self.v4 if version == 4 else self.v6:
            if lo == hi:
                yield str(mk(lo))

    def ranges(self, version: int) -> Iterator[tuple[str, str]]:
        """Intervals of more than one address, as (first, last) text."""
        mk = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        for lo, hi in self.v4 if version == 4 else self.v6:
            if lo != hi:
                yield str(mk(lo)), str(mk(hi))

    def cidrs(self, version: int) -> Iterator[str]:
        """Every interval as the minimal list of CIDRs (single addresses as /32 or /128)."""
        mk = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        for lo, hi in self.v4 if version == 4 else self.v6:
            if lo == hi:
                yield f"{mk(lo)}/{32 if version == 4 else 128}"
            else:
                for net in ipaddress.summarize_address_range(mk(lo), mk(hi)):
                    yield str(net)

    def describe_intervals(self) -> list[tuple[str, str]]:
        """Every interval as (first, last) text, v4 then v6."""
        out: list[tuple[str, str]] = []
        for v in (4, 6):
            mk = ipaddress.IPv4Address if v == 4 else ipaddress.IPv6Address
            out.extend((str(mk(lo)), str(mk(hi))) for lo, hi in (self.v4 if v == 4 else self.v6))
        return out

    def size(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.v4) + sum(hi - lo + 1 for lo, hi in self.v6)

    def describe(self) -> list[str]:
        """Compact text form: singles and `a-b` ranges, v4 then v6."""
        out: list[str] = []
        for v in (4, 6):
            mk = ipaddress.IPv4Address if v == 4 else ipaddress.IPv6Address
            for lo, hi in self.v4 if v == 4 else self.v6:
                out.append(str(mk(lo)) if lo == hi else f"{mk(lo)}-{mk(hi)}")
        return out


EMPTY = AddressSet()
