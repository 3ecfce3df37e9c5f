"""Generalising rules over the label lattice, and ports into ranges.

Theory of operation
-------------------
A *selector* here is a sorted tuple of (key, value) pairs; dropping keys walks up the lattice
towards `()` (every workload). For one group of rules that share everything but one side, the
observed side is a set of *atoms* (exact label tuples at the granularity's keys, or named
workloads). The workloads the exact atoms admit are the *observed members* O. For each label
atom we take the coarsest ancestor selector S (fewest keys; among equals the one admitting
most) with

    |members(S) \\ O| <= tolerance * |members(S)|

so at tolerance 0 a key is dropped only while no never-seen workload gets in; a positive
tolerance lifts a rule to a parent scope (say, the whole app) when most of it was seen. Chosen
selectors subsumed by another chosen selector are dropped. Counting is by dictionaries from a
projected label tuple to the workload indices, built once per key subset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import numpy.typing as npt

from bulkhead.domain.model import Workload

Sel = tuple[tuple[str, str], ...]
# an actor atom: ("labels", Sel) | ("workload", name) | ("ip_list", name) | ("all", "")
Atom = tuple[str, object]


@dataclass
class Choice:
    chosen: Sel
    admitted: int
    unobserved: int


class LabelIndex:
    """Workloads by projected label tuple, for every subset of the granularity's keys."""

    def __init__(self, workloads: Sequence[Workload], keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.n = len(workloads)
        self.subsets: list[tuple[str, ...]] = [
            c for r in range(len(keys) + 1) for c in combinations(keys, r)]
        self.index: dict[tuple[str, ...], dict[tuple[str, ...], npt.NDArray[np.int64]]] = {}
        labels = [w.label_dict for w in workloads]
        self._ancestors: dict[Sel, list[tuple[int, Sel, npt.NDArray[np.int64]]]] = {}
        for sub in self.subsets:
            groups: dict[tuple[str, ...], list[int]] = {}
            for i, lab in enumerate(labels):
                vals = tuple(lab.get(k) for k in sub)
                if None in vals:
                    continue
                groups.setdefault(vals, []).append(i)  # type: ignore[arg-type]
            self.index[sub] = {k: np.asarray(v, np.int64) for k, v in groups.items()}

    def ancestors(self, val: Sel) -> list[tuple[int, Sel, npt.NDArray[np.int64]]]:
        """(key count, selector, members) of every ancestor of a full label tuple, coarsest
        first (cached)."""
        got = self._ancestors.get(val)
        if got is None:
            full = dict(val)
            got = []
            for sub in self.subsets:
                if all(k in full for k in sub):
                    sel: Sel = tuple((k, full[k]) for k in sub)
                    got.append((len(sub), sel, self.members(sel)))
            self._ancestors[val] = got
        return got

    def members(self, sel: Sel) -> npt.NDArray[np.int64]:
        keys = tuple(k for k, _ in sel)
        sub = tuple(k for k in self.keys if k in keys)
        d = dict(sel)
        got = self.index.get(sub, {}).get(tuple(d[k] for k in sub))
        return got if got is not None else np.zeros(0, np.int64)


def _subsumes(general: Sel, specific: Sel) -> bool:
    return general != specific and set(general) <= set(specific)


def generalise(index: LabelIndex, atoms: Iterable[Atom], tolerance: float,
               by_name: dict[str, int]) -> dict[Atom, tuple[Atom, int, int]]:
    """Map each atom to its generalised atom with (admitted, unobserved) workload counts."""
    atoms = list(atoms)
    observed = np.zeros(index.n, np.bool_)
    for kind, val in atoms:
        if kind == "labels":
            assert isinstance(val, tuple)
            observed[index.members(val)] = True
        elif kind == "workload":
            assert isinstance(val, str)
            observed[by_name[val]] = True
    picks: dict[Atom, Choice] = {}
    for atom in atoms:
        kind, val = atom
        if kind != "labels":
            continue
        assert isinstance(val, tuple)
        best: Choice | None = None
        for size, sel, mem in index.ancestors(val):
            if best is not None and size > len(best.chosen):
                break
            adm = int(mem.shape[0])
            unobs = adm - int(np.count_nonzero(observed[mem]))
            ok = unobs <= tolerance * adm or size == len(val)
            if ok and (best is None or adm > best.admitted):
                best = Choice(sel, adm, unobs)
        assert best is not None
        picks[atom] = best
    chosen = {c.chosen for c in picks.values()}
    out: dict[Atom, tuple[Atom, int, int]] = {}
    for atom in atoms:
        if atom not in picks:
            out[atom] = (atom, 1, 0)
            continue
        c = picks[atom]
        sel = c.chosen
        for other in chosen:
            if _subsumes(other, sel):
                sel = other
                break
        if sel != c.chosen:
            mem = index.members(sel)
            c = Choice(sel, int(mem.shape[0]),
                       int(mem.shape[0]) - int(np.count_nonzero(observed[mem])))
        out[atom] = (("all", "") if not sel else ("labels", sel), c.admitted, c.unobserved)
    return out


def port_ranges(ports: Sequence[int], tolerance: float) -> list[tuple[int, int]]:
    """Sorted distinct ports → inclusive ranges: neighbours always merge; a gap merges when
    the range stays at least (1 - tolerance) observed and holds 3 or more observed ports."""
    ps = sorted(set(ports))
    out: list[list[int]] = []
    count: list[int] = []
    for p in ps:
        if out:
            lo, hi = out[-1]
            n = count[-1] + 1
            if p == hi + 1 or (tolerance > 0 and n >= (1 - tolerance) * (p - lo + 1)):
                out[-1][1] = p
                count[-1] = n
                continue
        out.append([p, p])
        count.append(1)
    # a gapped range needs 3 observed ports; split back the ones that do not qualify
    result: list[tuple[int, int]] = []
    for (lo, hi), n in zip(out, count, strict=True):
        if hi - lo + 1 != n and n < 3:
            result += [(p, p) for p in ps if lo <= p <= hi]
        else:
            result.append((lo, hi))
    return result
