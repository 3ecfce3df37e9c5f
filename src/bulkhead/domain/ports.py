"""Port specifications: `tcp/443`, `udp/53`, `tcp/8000-8099`, `tcp`, `icmp`, `icmp/8`,
`icmpv6`, `icmpv6/128`, `any`, or a protocol number (`47`, `proto/47`).

For ICMP and ICMPv6 the "port" of a flow is its ICMP type. A spec with no port matches every
port (or type) of its protocol; `any` matches every flow.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTO_NUMBERS: dict[str, int] = {"icmp": 1, "tcp": 6, "udp": 17, "sctp": 132, "icmpv6": 58,
                                 "gre": 47, "esp": 50, "ah": 51}
PROTO_NAMES: dict[int, str] = {v: k for k, v in PROTO_NUMBERS.items()}
PORTED = frozenset({6, 17, 132})
ICMP_PROTOS = frozenset({1, 58})


class PortSpecError(ValueError):
    pass


def parse_proto(text: str | int) -> int:
    """`tcp` / `6` / 6 → 6."""
    if isinstance(text, int):
        value = text
    else:
        t = text.strip().lower()
        if t in PROTO_NUMBERS:
            return PROTO_NUMBERS[t]
        if t == "ipv6-icmp":
            return 58
        if not (t.isascii() and t.isdigit()):
            raise PortSpecError(f"unknown protocol {text!r}")
        value = int(t)
    if not 1 <= value <= 255:
        raise PortSpecError(f"protocol number {value} out of range 1-255 (for every "
                            "protocol write 'any')")
    return value


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


@dataclass(frozen=True, order=True)
class PortSpec:
    """proto None = any protocol; lo/hi None = every port (or ICMP type) of `proto`."""

    proto: int | None
    lo: int | None = None
    hi: int | None = None

    @classmethod
    def parse(cls, text: str) -> PortSpec:
        if not isinstance(text, str):
            raise PortSpecError(f"port spec must be a string like 'tcp/443', got {text!r}")
        t = text.strip().lower()
        if t == "any":
            return cls(None)
        name, sep, rest = t.partition("/")
        if name == "proto" and sep:
            return cls(parse_proto(rest))
        proto = parse_proto(name)
        if not sep:
            return cls(proto)
        if proto not in PORTED and proto not in ICMP_PROTOS:
            raise PortSpecError(f"protocol {name!r} has no ports: {text!r}")
        limit = 255 if proto in ICMP_PROTOS else 65535
        lo_s, dash, hi_s = rest.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if dash else lo
        except ValueError:
            raise PortSpecError(f"bad port in {text!r}") from None
        if proto in ICMP_PROTOS and dash:
            raise PortSpecError(f"ICMP takes one type, not a range: {text!r}")
        if not (0 <= lo <= hi <= limit) or (proto in PORTED and lo == 0):
            raise PortSpecError(f"port out of range or reversed in {text!r}")
        return cls(proto, lo, hi)

    def __str__(self) -> str:
        if self.proto is None:
            return "any"
        name = PROTO_NAMES.get(self.proto)
        if name is None:
            return f"proto/{self.proto}"
        if self.lo is None:
            return name
        if self.lo == self.hi:
            return f"{name}/{self.lo}"
        return f"{name}/{self.lo}-{self.hi}"

    def matches(self, proto: int, port: int | None) -> bool:
        if self.proto is None:
            return True
        if self.proto != proto:
            return False
        if self.lo is None:
            return True
        return port is not None and self.lo <= port <= (self.hi if self.hi is not None else self.lo)

    def contains(self, other: PortSpec) -> bool:
        """Every flow `other` matches, `self` matches too."""
        if self.proto is None:
            return True
        if other.proto != self.proto:
            return False
        if self.lo is None:
            return True
        if other.lo is None:
            return False
        assert self.hi is not None and other.hi is not None
        return self.lo <= other.lo and other.hi <= self.hi
