"""The compiled state of the active policy, shared by the policy API and the agent channel.

Theory of operation: one `PolicyState` per server process holds a `Compiler` for the active
(provisioned) policy version together with the current inventory of workloads. Provisioning
rebuilds it (`load`); a workload or label change updates it incrementally
(`update_workload` / `remove_workload`). Every workload has a revision number that grows
whenever its compiled policy changes; `wait_for_change` lets a long-polling agent sleep until
its own revision moves past the one it holds. Mutations come from request threads, waiters
live on the event loop: waking is done with `call_soon_threadsafe`.

An agent's policy version is `"<provisioned version>.<workload revision>"`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from bulkhead.dataplane.model import CompiledWorkload
from bulkhead.domain.addresses import canonical_ip
from bulkhead.domain.model import Policy, Workload
from bulkhead.policy.compile import Compiler


@dataclass(frozen=True)
class Snapshot:
    version: int | None  # provisioned version id; None before the first provision
    revision: int
    compiled: CompiledWorkload | None

    @property
    def label(self) -> str:
        return f"{self.version or 0}.{self.revision}"


class PolicyState:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.version: int | None = None
        self.compiler: Compiler | None = None
        self._revision: dict[str, int] = {}
        self._counter = 0
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]]
        self._waiters = {}
        self._owners: dict[str, str] | None = None
        self._unpaired: set[int] = set()

    # -- mutations (request threads) ----------------------------------------------------------
    def load(self, version: int | None, policy: Policy) -> set[str]:
        """Rebuild for a newly provisioned version; returns workloads whose policy changed."""
        with self._lock:
            old = self.compiler.compiled if self.compiler else {}
            self.compiler = Compiler(policy)
            self._owners = None
            changed = {n for n, cw in self.compiler.compiled.items() if old.get(n) != cw}
            changed |= set(old) - set(self.compiler.compiled)
            if version is not None and version != self.version:
                changed |= set(self.compiler.compiled)  # the version label moved for all
            self.version = version
            self._bump(changed)
            return changed

    def update_workload(self, w: Workload) -> set[str]:
        with self._lock:
            if self.compiler is None:
                return set()
            changed = self.compiler.update_workload(w)
            self._owners = None
            self._bump(changed)
            return changed

    def remove_workload(self, name: str) -> set[str]:
        with self._lock:
            if self.compiler is None:
                return set()
            changed = self.compiler.remove_workload(name) | {name}
            self._owners = None
            self._bump(changed)
            return changed

    def unpaired(self, agent_id: int, name: str) -> None:
        """Agent `agent_id` (of workload `name`) was unpaired: its parked long-polls return
        now and `is_unpaired` tells them (agents authenticate per request, so only polls in
        flight need this)."""
        with self._lock:
            self._unpaired.add(agent_id)
            for loop, fut in self._waiters.pop(name, []):
                loop.call_soon_threadsafe(_wake, fut)

    def is_unpaired(self, agent_id: int) -> bool:
        return agent_id in self._unpaired

    def _bump(self, names: set[str]) -> None:
        for n in names:
            self._counter += 1
            self._revision[n] = self._counter
            for loop, fut in self._waiters.pop(n, []):
                loop.call_soon_threadsafe(_wake, fut)

    # -- reads -------------------------------------------------------------------------------
    def owners(self) -> dict[str, str]:
        """Address -> workload name (to name the far end of reported flows)."""
        with self._lock:
            if self._owners is None:
                ws = self.compiler.workloads.values() if self.compiler else ()
                self._owners = {canonical_ip(ip): w.name for w in ws for ip in w.ips}
            return self._owners

    def snapshot(self, name: str) -> Snapshot:
        with self._lock:
            cw = self.compiler.compiled.get(name) if self.compiler else None
            return Snapshot(self.version, self._revision.get(name, 0), cw)

    async def wait_for_change(self, name: str, known: str | None, timeout: float) -> Snapshot:
        """Return as soon as `name`'s policy label differs from `known` (or at timeout)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            snap = self.snapshot(name)
            if known is None or snap.label != known:
                return snap
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(name, []).append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            with self._lock:
                waiters = self._waiters.get(name, [])
                if (loop, fut) in waiters:
                    waiters.remove((loop, fut))
        return self.snapshot(name)

    def waiting(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._waiters.values())


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
