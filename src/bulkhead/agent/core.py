"""The agent's pure core: events in, commands out.

Theory of operation
-------------------
`AgentCore.handle(event)` takes one event (a timer tick, a policy from the long-poll, the
result of a command the runtime carried out) and returns the commands to carry out next, the
last of which is always `Sleep(until)`: the runtime feeds the next event no later than that.
The core never reads a clock (time arrives in every event), never touches a socket or a file,
and keeps no reference to the runtime; so the whole agent's behaviour can be replayed as a
transcript of (event -> commands) without root (tests/agent/test_core.py).

What it decides:

* pairing: `Activate` until it succeeds; a credential that stops working (401) clears the
  pairing and activates again;
* policy: one long-poll outstanding at a time (`FetchPolicy(known)`); a new document is decoded
  here (`wire.from_data`, all-or-nothing) and applied (`Apply`); a failed apply keeps the last
  good version and is reported in the next heartbeat as an error of kind `apply`;
* flows: every `flow_window_s` a `CloseWindow`; the summaries become a batch with a
  deterministic id (`b<seq>`, seq persisted by the spool) that is spooled *before* any upload
  is attempted, then uploaded oldest first, one at a time; a batch leaves the queue only when
  the server acknowledged it (stored or duplicate). Retryable failures back off exponentially;
  a batch the server rejects (4xx) is dropped and counted;
* tamper: every `tamper_every_s` a `CheckTamper`; a change re-applies the expected ruleset and
  queues a tamper report, sent with an immediate heartbeat;
* inventory: collected every `inventory_every_s`, sent when its fingerprint changed; other
  firewall managers found with it (their drops still apply after our accept) are reported
  in every heartbeat as errors of kind `firewall_manager`;
* unpair: a heartbeat answer `{unpair: {final_state}}` ends in `Unpair(final_state)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bulkhead.dataplane.model import CompiledWorkload
from bulkhead.dataplane.wire import WireError, from_data

AGENT_VERSION = "0.1.0"
MAX_REPORTS = 50  # the heartbeat schema's bound on errors and tamper reports


# -- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CoreConfig:
    heartbeat_s: float = 300.0
    flow_window_s: float = 600.0
    tamper_every_s: float = 2.0
    inventory_every_s: float = 300.0
    long_poll_s: float = 60.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    # follow the interval the server announces (activation, heartbeat answers): the server
    # marks an agent offline after ~3 of its intervals; False: `heartbeat_s` was configured
    server_heartbeat: bool = False


# -- events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    now: float
    paired: bool
    next_seq: int  # the spool's next batch sequence number
    spooled: tuple[str, ...] = ()  # batch ids waiting in the spool, oldest first
    last_good: tuple[str, Any] | None = None  # (version, wire document) applied before


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class Activated:
    now: float
    ok: bool
    error: str = ""
    heartbeat_s: float | None = None  # the server's interval (see CoreConfig.server_heartbeat)


@dataclass(frozen=True)
class PolicyFetched:
    now: float
    version: str | None  # None: unchanged (304) or failed
    document: Any = None
    error: str = ""
    unauthorized: bool = False


@dataclass(frozen=True)
class Applied:
    now: float
    version: str
    ok: bool
    enforcement: str = ""
    error: str = ""


@dataclass(frozen=True)
class WindowClosed:
    now: float
    rows: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Spooled:
    now: float
    batch_id: str
    ok: bool
    evicted: tuple[str, ...] = ()  # older batches dropped at the spool's bound
    dropped_flows: int = 0  # total flows ever dropped at the bound (persisted)
    error: str = ""


@dataclass(frozen=True)
class Uploaded:
    now: float
    batch_id: str
    ok: bool
    retryable: bool = True
    error: str = ""
    unauthorized: bool = False


@dataclass(frozen=True)
class HeartbeatDone:
    now: float
    ok: bool
    unpair: str | None = None  # final state: "remove" | "keep"
    unauthorized: bool = False
    error: str = ""
    heartbeat_s: float | None = None  # the server's interval, as in Activated


@dataclass(frozen=True)
class TamperChecked:
    now: float
    changed: bool
    detail: str = ""


@dataclass(frozen=True)
class InventoryCollected:
    now: float
    fingerprint: str
    warnings: tuple[str, ...] = ()  # other firewall managers found on the host


@dataclass(frozen=True)
class InventorySent:
    now: float
    fingerprint: str
    ok: bool
    error: str = ""


Event = (Started | Tick | Activated | PolicyFetched | Applied | WindowClosed | Spooled
         | Uploaded | HeartbeatDone | TamperChecked | InventoryCollected | InventorySent)


# -- commands --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activate:
    pass


@dataclass(frozen=True)
class FetchPolicy:
    known: str | None
    wait_s: float


@dataclass(frozen=True)
class Apply:
    version: str
    compiled: CompiledWorkload
    document: Any  # kept as the last good policy once applied
    reason: str  # policy | restore | tamper


@dataclass(frozen=True)
class CloseWindow:
    pass


@dataclass(frozen=True)
class SpoolBatch:
    batch_id: str
    seq: int
    rows: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Upload:
    batch_id: str


@dataclass(frozen=True)
class Heartbeat:
    payload: dict[str, Any]


@dataclass(frozen=True)
class CheckTamper:
    pass


@dataclass(frozen=True)
class CollectInventory:
    pass


@dataclass(frozen=True)
class SendInventory:
    fingerprint: str


@dataclass(frozen=True)
class Unpair:
    final_state: str  # remove | keep


@dataclass(frozen=True)
class SaveStatus:
    status: dict[str, Any]


@dataclass(frozen=True)
class Log:
    level: str  # info | warning | error
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sleep:
    until: float


Command = (Activate | FetchPolicy | Apply | CloseWindow | SpoolBatch | Upload | Heartbeat
           | CheckTamper | CollectInventory | SendInventory | Unpair | SaveStatus | Log | Sleep)


def batch_id(seq: int) -> str:
    """Deterministic id of the seq-th batch of this state directory (server pattern-safe)."""
    return f"b{seq:012d}"


def _iso(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat()


# -- the core --------------------------------------------------------------------------------
@dataclass
class _State:
    started: bool = False
    paired: bool = False
    activating: bool = False
    next_activate: float = 0.0
    activate_failures: int = 0
    polling: bool = False
    next_poll: float = 0.0
    poll_failures: int = 0
    known: str | None = None  # newest version received (applied or not)
    applied: str | None = None  # version running on the host
    applied_doc: Any = None
    applied_cw: CompiledWorkload | None = None
    enforcement: str | None = None
    applying: tuple[str, CompiledWorkload, Any, str] | None = None  # the apply in flight
    pending: tuple[str, CompiledWorkload, Any, str] | None = None  # waits for the apply
    errors: list[dict[str, Any]] = field(default_factory=list)
    tamper: list[dict[str, Any]] = field(default_factory=list)
    tamper_pending: dict[str, Any] | None = None  # report waiting for the restore's result
    next_window: float = 0.0
    closing: bool = False
    seq: int = 0
    queue: list[str] = field(default_factory=list)  # spooled batch ids, oldest first
    uploading: str | None = None
    next_upload: float = 0.0
    upload_failures: int = 0
    last_upload: float | None = None
    dropped_flows: int = 0
    dropped_batches: int = 0
    rejected_batches: int = 0
    heartbeat_in_flight: bool = False
    next_heartbeat: float = 0.0
    heartbeat_failures: int = 0
    heartbeat_s: float | None = None  # the server's interval, when followed
    last_heartbeat: float | None = None
    next_tamper: float = 0.0
    checking: bool = False
    next_inventory: float = 0.0
    collecting: bool = False
    inventory_sent: str | None = None
    inventory_sending: bool = False
    unpaired: str | None = None  # final state once unpaired
    warnings: list[str] = field(default_factory=list)  # other firewall managers
    now: float = 0.0


class AgentCore:
    """The agent's decisions. Feed `Started` first, then any event; see the module docstring."""

    def __init__(self, config: CoreConfig | None = None) -> None:
        self.cfg = config or CoreConfig()
        self.s = _State()

    # -- public ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once unpaired: the runtime stops after carrying out the last commands."""
        return self.s.unpaired is not None

    def status(self) -> dict[str, Any]:
        s = self.s
        return {
            "paired": s.paired, "applied_version": s.applied, "enforcement": s.enforcement,
            "known_version": s.known, "spooled_batches": len(s.queue),
            "dropped_flows": s.dropped_flows, "dropped_batches": s.dropped_batches,
            "rejected_batches": s.rejected_batches, "last_upload": s.last_upload,
            "last_heartbeat": s.last_heartbeat, "errors": list(s.errors),
            "warnings": list(s.warnings),
            "unpaired": s.unpaired, "updated": s.now,
        }

    def handle(self, ev: Event) -> list[Command]:
        s = self.s
        if ev.now > s.now:
            s.now = ev.now
        out: list[Command] = []
        if isinstance(ev, Started):
            self._started(ev, out)
        elif not s.started:
            raise ValueError(f"{type(ev).__name__} before Started")
        elif isinstance(ev, Activated):
            self._activated(ev, out)
        elif isinstance(ev, PolicyFetched):
            self._policy(ev, out)
        elif isinstance(ev, Applied):
            self._applied(ev, out)
        elif isinstance(ev, WindowClosed):
            self._window(ev, out)
        elif isinstance(ev, Spooled):
            self._spooled(ev, out)
        elif isinstance(ev, Uploaded):
            self._uploaded(ev, out)
        elif isinstance(ev, HeartbeatDone):
            self._heartbeat(ev, out)
        elif isinstance(ev, TamperChecked):
            self._tamper(ev, out)
        elif isinstance(ev, InventoryCollected):
            self._inventory(ev, out)
        elif isinstance(ev, InventorySent):
            s.inventory_sending = False
            if ev.ok:
                s.inventory_sent = ev.fingerprint
            else:
                out.append(Log("warning", "inventory upload failed", {"error": ev.error}))
        if s.unpaired is None:
            self._timers(out)
        out.append(SaveStatus(self.status()))
        out.append(Sleep(self._next_deadline()))
        return out

    # -- handlers ----------------------------------------------------------------------------
    def _started(self, ev: Started, out: list[Command]) -> None:
        s = self.s
        s.started = True
        s.paired = ev.paired
        s.seq = ev.next_seq
        s.queue = list(ev.spooled)
        s.next_window = ev.now + self.cfg.flow_window_s
        s.next_tamper = ev.now + self.cfg.tamper_every_s
        s.next_heartbeat = ev.now  # announce ourselves at once
        s.next_inventory = ev.now
        if ev.last_good is not None:
            version, doc = ev.last_good
            try:
                cw = from_data(doc)
            except WireError as exc:
                out.append(Log("warning", "ignoring the saved policy", {"error": str(exc)}))
            else:
                # re-assert what we enforced before the restart (the kernel may have lost it)
                s.known = version
                self._apply(version, cw, doc, "restore", out)

    def _activated(self, ev: Activated, out: list[Command]) -> None:
        s = self.s
        s.activating = False
        if ev.ok:
            s.paired = True
            s.activate_failures = 0
            self._server_interval(ev.heartbeat_s)
            s.next_heartbeat = ev.now
            s.next_inventory = ev.now
            s.next_upload = ev.now
            s.next_poll = ev.now
            s.poll_failures = s.upload_failures = 0
            out.append(Log("info", "paired with the control plane"))
        else:
            s.activate_failures += 1
            s.next_activate = ev.now + self._backoff(s.activate_failures)
            out.append(Log("error", "activation failed", {"error": ev.error}))

    def _policy(self, ev: PolicyFetched, out: list[Command]) -> None:
        s = self.s
        s.polling = False
        if ev.unauthorized:
            self._refused(ev.now, out)
            return
        if ev.error:
            s.poll_failures += 1
            s.next_poll = ev.now + self._backoff(s.poll_failures)
            out.append(Log("warning", "policy fetch failed", {"error": ev.error}))
            return
        s.poll_failures = 0
        s.next_poll = ev.now
        if ev.version is None or ev.version == s.known:
            return
        s.known = ev.version
        try:
            cw = from_data(ev.document)
        except WireError as exc:
            self._error("apply", f"policy {ev.version} unreadable: {exc}", ev.version, out)
            return
        self._apply(ev.version, cw, ev.document, "policy", out)

    def _apply(self, version: str, cw: CompiledWorkload, doc: Any, reason: str,
               out: list[Command]) -> None:
        s = self.s
        if s.applying is not None:  # one apply at a time; the newest waiting one wins
            s.pending = (version, cw, doc, reason)
            return
        s.applying = (version, cw, doc, reason)
        out.append(Apply(version, cw, doc, reason))

    def _applied(self, ev: Applied, out: list[Command]) -> None:
        s = self.s
        flight, s.applying = s.applying, None
        report = s.tamper_pending
        s.tamper_pending = None
        if ev.ok:
            if (ev.version, ev.enforcement or None) != (s.applied, s.enforcement):
                s.next_heartbeat = ev.now  # report the applied version at once
            s.applied = ev.version
            if flight is not None and flight[0] == ev.version:
                s.applied_cw, s.applied_doc = flight[1], flight[2]
            s.enforcement = ev.enforcement or None
            s.errors = [e for e in s.errors if e.get("kind") != "apply"]
            out.append(Log("info", "policy applied", {"version": ev.version,
                                                      "enforcement": ev.enforcement}))
        else:
            self._error("apply", ev.error, ev.version, out)
        if report is not None:
            report["restored"] = ev.ok
            self._push(s.tamper, report)
            s.next_heartbeat = ev.now  # make it visible now, not in five minutes
        if s.pending is not None:
            version, cw, doc, reason = s.pending
            s.pending = None
            self._apply(version, cw, doc, reason, out)

    def _window(self, ev: WindowClosed, out: list[Command]) -> None:
        s = self.s
        s.closing = False
        if not ev.rows:
            return
        seq = s.seq
        s.seq += 1
        out.append(SpoolBatch(batch_id(seq), seq, ev.rows))

    def _spooled(self, ev: Spooled, out: list[Command]) -> None:
        s = self.s
        if ev.evicted:
            s.queue = [b for b in s.queue if b not in ev.evicted]
            s.dropped_batches += len(ev.evicted)
            out.append(Log("warning", "spool full: oldest batches dropped",
                           {"batches": list(ev.evicted), "dropped_flows": ev.dropped_flows}))
        s.dropped_flows = max(s.dropped_flows, ev.dropped_flows)
        if ev.ok:
            s.queue.append(ev.batch_id)
        else:
            self._error("spool", f"batch {ev.batch_id} not spooled: {ev.error}", None, out)

    def _uploaded(self, ev: Uploaded, out: list[Command]) -> None:
        s = self.s
        s.uploading = None
        if ev.unauthorized:
            self._refused(ev.now, out)
            return
        if ev.ok or not ev.retryable:
            if ev.batch_id in s.queue:
                s.queue.remove(ev.batch_id)
            s.upload_failures = 0
            s.next_upload = ev.now
            if ev.ok:
                s.last_upload = ev.now
            else:
                s.rejected_batches += 1
                self._error("upload", f"batch {ev.batch_id} rejected: {ev.error}", None, out)
            return
        s.upload_failures += 1
        s.next_upload = ev.now + self._backoff(s.upload_failures)
        out.append(Log("warning", "upload failed; batch stays spooled",
                       {"batch": ev.batch_id, "error": ev.error,
                        "retry_in_s": round(s.next_upload - ev.now, 3)}))

    def _heartbeat(self, ev: HeartbeatDone, out: list[Command]) -> None:
        s = self.s
        s.heartbeat_in_flight = False
        if ev.unpair is not None:
            s.unpaired = ev.unpair
            s.paired = False
            out.append(Log("info", "unpaired by the control plane", {"final_state": ev.unpair}))
            out.append(Unpair(ev.unpair))
            return
        if ev.unauthorized:
            self._lost_credential(ev.now, out)
            return
        if ev.ok:
            s.heartbeat_failures = 0
            s.last_heartbeat = ev.now
            s.tamper.clear()  # delivered
            self._server_interval(ev.heartbeat_s)
            s.next_heartbeat = ev.now + self._heartbeat_s()
        else:
            s.heartbeat_failures += 1
            s.next_heartbeat = ev.now + min(self._heartbeat_s(),
                                            self._backoff(s.heartbeat_failures))
            out.append(Log("warning", "heartbeat failed", {"error": ev.error}))

    def _tamper(self, ev: TamperChecked, out: list[Command]) -> None:
        s = self.s
        s.checking = False
        s.next_tamper = ev.now + self.cfg.tamper_every_s
        if not ev.changed or s.applied is None:
            return
        out.append(Log("warning", "firewall tampered with; restoring", {"detail": ev.detail}))
        report = {"what": "ruleset", "detail": ev.detail[:2000], "restored": False,
                  "at": _iso(ev.now)}
        if s.applied_cw is None:
            self._push(s.tamper, report)
            s.next_heartbeat = ev.now
            return
        s.tamper_pending = report
        self._apply(s.applied, s.applied_cw, s.applied_doc, "tamper", out)

    def _inventory(self, ev: InventoryCollected, out: list[Command]) -> None:
        s = self.s
        s.collecting = False
        s.next_inventory = ev.now + self.cfg.inventory_every_s
        if list(ev.warnings) != s.warnings:
            s.warnings = list(ev.warnings)[:MAX_REPORTS]
            s.next_heartbeat = ev.now
            for w in s.warnings:
                out.append(Log("warning", w, {"kind": "firewall_manager"}))
        if s.paired and ev.fingerprint != s.inventory_sent and not s.inventory_sending:
            s.inventory_sending = True
            out.append(SendInventory(ev.fingerprint))

    # -- helpers -----------------------------------------------------------------------------
    def _server_interval(self, seconds: float | None) -> None:
        if self.cfg.server_heartbeat and isinstance(seconds, int | float) and seconds > 0:
            self.s.heartbeat_s = max(1.0, float(seconds))

    def _heartbeat_s(self) -> float:
        return self.s.heartbeat_s or self.cfg.heartbeat_s

    def _refused(self, now: float, out: list[Command]) -> None:
        """A poll or upload was refused: maybe we were unpaired. Only the heartbeat can say
        (it delivers the unpair instruction once), so ask it now and hold the other calls."""
        s = self.s
        s.poll_failures += 1
        s.next_poll = now + self._backoff(s.poll_failures)
        s.upload_failures += 1
        s.next_upload = now + self._backoff(s.upload_failures)
        s.next_heartbeat = now
        out.append(Log("warning", "request refused by the control plane; checking pairing"))

    def _lost_credential(self, now: float, out: list[Command]) -> None:
        """401: the credential is gone (unpaired elsewhere, or the server was reset)."""
        s = self.s
        if s.paired:
            out.append(Log("error", "credential refused; pairing again"))
        s.paired = False
        s.next_activate = now
        s.inventory_sent = None

    def _error(self, kind: str, message: str, version: str | None, out: list[Command]) -> None:
        self._push(self.s.errors, {"kind": kind, "message": message[:2000], "version": version})
        self.s.next_heartbeat = self.s.now
        out.append(Log("error", message, {"kind": kind, "version": version}))

    @staticmethod
    def _push(items: list[dict[str, Any]], item: dict[str, Any]) -> None:
        if item in items:
            return
        items.append(item)
        del items[:-MAX_REPORTS]

    def _backoff(self, failures: int) -> float:
        return float(min(self.cfg.backoff_max_s,
                         self.cfg.backoff_min_s * 2 ** min(failures - 1, 30)))

    def _heartbeat_payload(self) -> dict[str, Any]:
        s = self.s
        errors = list(s.errors)
        if s.dropped_flows:
            errors.append({"kind": "spool_dropped", "version": None,
                           "message": f"{s.dropped_flows} flow summaries in "
                                      f"{s.dropped_batches} batches dropped at the spool bound"})
        errors += [{"kind": "firewall_manager", "version": None, "message": w[:2000]}
                   for w in s.warnings]
        return {"status": "error" if s.errors else "ok", "applied_version": s.applied,
                "enforcement": s.enforcement, "agent_version": AGENT_VERSION,
                "errors": errors[-MAX_REPORTS:], "tamper": list(s.tamper)}

    def _timers(self, out: list[Command]) -> None:
        s, now = self.s, self.s.now
        if not s.paired:
            if not s.activating and now >= s.next_activate:
                s.activating = True
                out.append(Activate())
        else:
            if not s.polling and now >= s.next_poll:
                s.polling = True
                out.append(FetchPolicy(s.known, self.cfg.long_poll_s))
            if not s.heartbeat_in_flight and now >= s.next_heartbeat:
                s.heartbeat_in_flight = True
                out.append(Heartbeat(self._heartbeat_payload()))
            if s.queue and s.uploading is None and now >= s.next_upload:
                s.uploading = s.queue[0]
                out.append(Upload(s.queue[0]))
            if not s.collecting and now >= s.next_inventory:
                s.collecting = True
                out.append(CollectInventory())
        if not s.closing and now >= s.next_window:
            s.closing = True
            # windows stay on their grid even when a tick came late
            while s.next_window <= now:
                s.next_window += self.cfg.flow_window_s
            out.append(CloseWindow())
        if not s.checking and now >= s.next_tamper and (s.applied is not None):
            s.checking = True
            out.append(CheckTamper())

    def _next_deadline(self) -> float:
        s = self.s
        times = [s.next_window]
        if s.unpaired is not None:
            return s.now
        if s.applied is not None and not s.checking:
            times.append(s.next_tamper)
        if not s.paired:
            if not s.activating:
                times.append(s.next_activate)
        else:
            if not s.polling:
                times.append(s.next_poll)
            if not s.heartbeat_in_flight:
                times.append(s.next_heartbeat)
            if s.queue and s.uploading is None:
                times.append(s.next_upload)
            if not s.collecting:
                times.append(s.next_inventory)
        return max(s.now, min(times))
