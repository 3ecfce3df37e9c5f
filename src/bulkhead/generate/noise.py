"""Named, auditable noise filters: background traffic kept out of rule generation.

A filter names (protocol, port) pairs. Filtered flows are neither turned into rules nor counted
in coverage; the report says, per filter, how many flows and pairs it removed, with examples.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

NOISE_FILTERS: dict[str, tuple[tuple[int, int], ...]] = {
    "dns": ((17, 53), (6, 53), (17, 5353)),
    "ntp": ((17, 123),),
    "dhcp": ((17, 67), (17, 68), (17, 546), (17, 547)),
    "monitoring": ((6, 9100), (17, 161), (17, 162), (6, 10050), (6, 5666), (6, 4949)),
    "backups": ((6, 873), (6, 9102), (6, 10000), (6, 1500)),
    "icmp": ((1, -2), (58, -2)),  # port -2: any port of the protocol
}
DEFAULT_NOISE: tuple[str, ...] = tuple(NOISE_FILTERS)


def check_names(names: tuple[str, ...], where: str = "noise") -> None:
    bad = [n for n in names if n not in NOISE_FILTERS]
    if bad:
        raise ValueError(f"{where}: unknown noise filter(s) {', '.join(bad)} "
                         f"(known: {', '.join(NOISE_FILTERS)})")


def service_filter(names: tuple[str, ...], proto: npt.NDArray[np.int32],
                   port: npt.NDArray[np.int32]) -> npt.NDArray[np.int16]:
    """Per service code: index into `names` of the first filter that matches, or -1."""
    out = np.full(proto.shape[0], -1, np.int16)
    for i, name in reversed(list(enumerate(names))):
        for p, q in NOISE_FILTERS[name]:
            hit = (proto == p) if q == -2 else ((proto == p) & (port == q))
            out[hit] = i
    return out
