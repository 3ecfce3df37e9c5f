"""The agent's runtime: the one module that does I/O around the pure core.

Three threads:

* the **main loop** feeds the core (`AgentCore.handle`) and carries out its commands: HTTP
  calls (short timeouts: a dead server costs a refused connection, not a stall), firewall
  applies and tamper checks, spool writes, status files. Between events it waits on a queue
  until the core's `Sleep` deadline, then feeds a `Tick`;
* the **sensor thread** reads conntrack events and NFLOG packets (non-blocking netlink sockets
  under one `selectors` loop; NFLOG first, so a logged packet is usually seen before its
  conntrack entry), attributes processes and feeds the `Summarizer` under a lock;
* the **poll thread** parks in the policy long-poll and posts each answer as an event.

Everything the core decides is in core.py; this module only translates commands into system
calls and results into events.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bulkhead.agent import core as c
from bulkhead.agent.client import AgentClient, ChannelError, call_with_retry
from bulkhead.agent.enforce import ApplyError, Enforcer, cgroup2_root, host_context
from bulkhead.agent.spool import Spool, SpoolError
from bulkhead.agent.statefile import Credential, StateDir
from bulkhead.agent.summary import Summarizer
from bulkhead.agent.tamper import TamperWatch
from bulkhead.dataplane.model import CompiledWorkload, Endpoint

log = logging.getLogger("bulkhead.agent")
COALESCE_S = 0.05  # sensor batching delay: one wake-up per batch of netlink datagrams
SERVED_TTL_S = 5.0  # how long a local port's serving process is trusted without a lookup


@dataclass
class AgentOptions:
    server: str
    pairing_key: str | None
    state_dir: Path
    hostname: str | None = None
    flow_window_s: float = 600.0
    heartbeat_s: float | None = None  # None: the server's interval (300 s until it says)
    tamper_every_s: float = 1.0
    inventory_every_s: float = 60.0
    long_poll_s: float = 60.0
    metrics_port: int | None = None
    nflog_group: int = 7
    table: str = "bulkhead"
    backend: str | None = None  # nft | iptables (None: detect)
    spool_max_bytes: int = 64 << 20
    sensors: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# -- logging -----------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{self.formatTime(record)} {record.levelname.lower()} {record.getMessage()}" \
               + (f" {tail}" if tail else "")


def setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("bulkhead.agent")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def _log(level: str, msg: str, **fields: Any) -> None:
    log.log(getattr(logging, level.upper(), logging.INFO), msg, extra={"fields": fields})


# -- host facts --------------------------------------------------------------------------------
def local_addresses() -> list[str]:
    """Addresses of this network namespace (`ip -j addr`), loopback excluded."""
    try:
        cp = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, timeout=10,
                            check=False)
        data = json.loads(cp.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    out: list[str] = []
    for link in data:
        if link.get("ifname") == "lo":
            continue
        for a in link.get("addr_info", []):
            ip = a.get("local")
            if ip and not ip.startswith("fe80:"):
                out.append(ip)
    return out


def basic_inventory(hostname: str, resolver: Any) -> dict[str, Any]:
    """The inventory when `bulkhead.agent.inventory` is not available."""
    interfaces: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError, subprocess.TimeoutExpired):
        cp = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, timeout=10,
                            check=False)
        for link in json.loads(cp.stdout or "[]"):
            if link.get("ifname") == "lo":
                continue
            interfaces.append({"name": link.get("ifname", "?"), "mac": link.get("address"),
                               "addresses": [a["local"] for a in link.get("addr_info", [])
                                             if a.get("local")]})
    listening: list[dict[str, Any]] = []
    if resolver is not None:
        with contextlib.suppress(OSError, RuntimeError):
            for ls in resolver.listening():
                p = ls.process
                listening.append({"proto": ls.proto, "port": ls.port, "addr": ls.addr,
                                  "process": p.exe if p else None,
                                  "cmdline": p.cmdline if p else None,
                                  "unit": p.unit if p else None})
    listening.sort(key=lambda x: (x["proto"], x["port"], x["addr"]))
    return {"hostname": hostname, "os": "linux",
            "interfaces": sorted(interfaces, key=lambda i: i["name"]), "listening": listening}


def control_plane_endpoints(server: str) -> list[Endpoint]:
    u = urlsplit(server)
    host = u.hostname or "127.0.0.1"
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return [Endpoint(ip, port) for ip in sorted({str(i[4][0]) for i in infos})]


# -- the runtime -------------------------------------------------------------------------------
class Runtime:
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.state = StateDir(opts.state_dir)
        self.spool = Spool(self.state.spool_dir, max_bytes=opts.spool_max_bytes)
        self.client = AgentClient(opts.server)
        self.enforcer = Enforcer(table=opts.table, backend=opts.backend)
        self.tamper = TamperWatch(self.enforcer)
        self.events: queue.Queue[c.Event] = queue.Queue()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.hostname = opts.hostname or socket.gethostname()
        self.local_ips = local_addresses()
        self.resolver: Any = None
        self.inv_resolver: Any = None
        self._served: dict[tuple[int, str, int], tuple[float, tuple[str | None, str | None]]] = {}
        self.summary = Summarizer(self.local_ips, self._resolve)
        self.inventory: dict[str, Any] | None = None
        self.cred: Credential | None = self.state.credential()
        if self.cred is not None:
            self.client.set_credential(self.cred.agent_id, self.cred.credential)
        self.poll_requests: queue.Queue[tuple[str | None, float] | None] = queue.Queue()
        self.stats: dict[str, float] = {"ct_events": 0, "nflog_packets": 0, "overruns": 0,
                                        "uploaded_flows": 0, "applies": 0}
        self.apply_latency: list[float] = []
        heartbeat = opts.heartbeat_s or 300.0
        self.core = c.AgentCore(c.CoreConfig(
            heartbeat_s=heartbeat, flow_window_s=opts.flow_window_s,
            tamper_every_s=opts.tamper_every_s, inventory_every_s=opts.inventory_every_s,
            long_poll_s=opts.long_poll_s, backoff_max_s=min(60.0, max(5.0, heartbeat)),
            server_heartbeat=opts.heartbeat_s is None))
        self._last_status: dict[str, Any] | None = None
        self.sensing = False  # the sensor thread has its sockets open
        self.metrics: Any = None

    # -- process attribution (sensor thread) -------------------------------------------------
    def _resolve(self, direction: str, proto: int, lip: str, lport: int | None, rip: str,
                 rport: int | None) -> tuple[str | None, str | None]:
        r = self.resolver
        if r is None or lport is None:
            return None, None
        if direction == "in":
            # the serving process is the listener's: cached per local port for a few
            # seconds, so a busy service costs no socket lookup per connection
            key = (proto, lip, lport)
            now = time.monotonic()
            hit = self._served.get(key)
            if hit is not None and now - hit[0] < SERVED_TTL_S:
                return hit[1]
        try:
            info = r.listener(proto, lip, lport) if direction == "in" else None
            if info is None:
                info = r.lookup(proto, lip, lport, rip, rport or 0)
        except (OSError, RuntimeError):
            return None, None
        got = (info.exe, info.unit) if info is not None else (None, None)
        if direction == "in":
            if len(self._served) > 10_000:
                self._served.clear()
            self._served[key] = (now, got)
        return got

    # -- threads -----------------------------------------------------------------------------
    def _sensor_loop(self) -> None:
        try:
            from bulkhead.agent.conntrack import DESTROY, NEW, ConntrackSocket, enable_accounting
            from bulkhead.agent.nflog import NflogSocket
            from bulkhead.agent.procs import ProcessResolver
        except ImportError as exc:
            _log("error", "sensors unavailable: no flows will be reported", error=str(exc))
            return
        ct: Any = None
        try:
            enable_accounting()
            self.resolver = ProcessResolver()
            ct = ConntrackSocket.events(NEW | DESTROY)
            nf = NflogSocket(self.opts.nflog_group)
        except OSError as exc:
            if ct is not None:  # NFLOG failed: do not leak the conntrack socket
                ct.close()
            _log("error", "cannot open netlink sockets: no flows", error=str(exc))
            return
        self.sensing = True
        sel = selectors.DefaultSelector()
        sel.register(nf.fileno(), selectors.EVENT_READ, "nflog")
        sel.register(ct.fileno(), selectors.EVENT_READ, "ct")
        try:
            while not self.stop.is_set():
                ready = {key.data for key, _ in sel.select(timeout=0.5)}
                if ready:
                    # each conntrack event (and NFLOG packet) is its own datagram: let them
                    # gather, so one wake-up drains many (the 16 MiB receive buffer holds
                    # seconds of them). Waiting on `stop` keeps a shutdown from waiting out the
                    # delay. An NFLOG wake waits too: a logged packet's conntrack entry follows
                    # it within microseconds, and both must reach the summary together.
                    if self.stop.wait(COALESCE_S):
                        break
                    ready = {key.data for key, _ in sel.select(timeout=0)}
                pkts = nf.read() if "nflog" in ready else []
                evs = ct.read() if "ct" in ready else []
                now = time.time()
                # one lock hold: a window cannot close between a verdict and its connection
                # (the verdict would be summarised as a drop, the connection once more)
                with self.lock:
                    for p in pkts:
                        self.summary.logged(p, now)
                    for ev in evs:
                        if ev.kind == "new":
                            self.summary.connection(ev, now)
                        else:
                            self.summary.counters(ev, now)
                self.stats["nflog_packets"] += len(pkts)
                self.stats["ct_events"] += len(evs)
                self.stats["overruns"] = ct.overruns
        finally:
            sel.close()
            ct.close()
            nf.close()

    def _dump(self) -> None:
        """Byte counters of every conntrack entry, once per window right before it closes
        (short connections also report theirs in their DESTROY event). A dump costs ~10 us
        per entry; at 1,000 new connections/s the table holds ~120k (TCP TIME_WAIT lasts
        120 s), so it is done per window, not per second, and parsed buffer by buffer so
        that the table never exists as 100k Python objects at once."""
        if not self.sensing:
            return
        try:
            from bulkhead.agent.conntrack import ConntrackSocket, parse

            bufs = ConntrackSocket.dump_raw()
        except (ImportError, OSError) as exc:
            _log("warning", "conntrack dump failed", error=str(exc))
            return
        now = time.time()
        seen: set[int] = set()
        while bufs:
            entries = parse(bufs.pop())
            with self.lock:
                for ev in entries:
                    self.summary.counters(ev, now)
            seen.update(ev.ct_id for ev in entries)
        with self.lock:
            self.summary.dump_done(seen)

    def _poll_loop(self) -> None:
        while not self.stop.is_set():
            req = self.poll_requests.get()
            if req is None:
                return
            known, wait = req
            try:
                got = self.client.fetch_policy(known, wait)
            except ChannelError as exc:
                self.events.put(c.PolicyFetched(time.time(), None, error=str(exc),
                                                unauthorized=exc.unauthorized))
                continue
            except Exception as exc:  # this thread dying would end all polling
                self.events.put(c.PolicyFetched(time.time(), None,
                                                error=f"{type(exc).__name__}: {exc}"))
                continue
            if got is None:
                self.events.put(c.PolicyFetched(time.time(), None))
            else:
                self.events.put(c.PolicyFetched(time.time(), got[0], got[1]))

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        # Start-up objects (modules, the policy) never die: keep them out of every garbage
        # collection, and collect young objects less often (each new connection allocates a
        # few tuples; with the default threshold the collector ran ~10 times per second).
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        self._start_metrics()
        threads = [threading.Thread(target=self._poll_loop, name="poll", daemon=True)]
        if self.opts.sensors:
            threads.append(threading.Thread(target=self._sensor_loop, name="sensors",
                                            daemon=True))
        for t in threads:
            t.start()
        with contextlib.suppress(ValueError):  # not the main thread (tests)
            signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        _log("info", "agent starting", server=self.opts.server, hostname=self.hostname,
             state_dir=str(self.state.path), backend=self.enforcer.backend,
             paired=self.cred is not None)
        pending: list[c.Event] = [c.Started(time.time(), self.cred is not None,
                                            self.spool.next_seq, self.spool.ids(),
                                            self.state.policy())]
        deadline = time.time()
        try:
            while not self.stop.is_set():
                if pending:
                    ev = pending.pop(0)
                else:
                    try:
                        ev = self.events.get(timeout=max(0.0, min(deadline - time.time(), 1.0)))
                    except queue.Empty:
                        ev = c.Tick(time.time())
                for cmd in self.core.handle(ev):
                    if isinstance(cmd, c.Sleep):
                        deadline = cmd.until
                    else:
                        got = self._execute(cmd)
                        if got is not None:
                            pending.append(got)
                if self.core.done and not pending:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            self.stop.set()
            self.poll_requests.put(None)
            if not self.core.done:
                self._spool_open_window()
            self._save_status(self.core.status(), force=True)
            self.client.close()
        _log("info", "agent stopped")
        return 0

    def _execute(self, cmd: c.Command) -> c.Event | None:
        now = time.time
        if isinstance(cmd, c.Log):
            _log(cmd.level, cmd.message, **cmd.fields)
        elif isinstance(cmd, c.Activate):
            return self._activate()
        elif isinstance(cmd, c.FetchPolicy):
            self.poll_requests.put((cmd.known, cmd.wait_s))
        elif isinstance(cmd, c.Apply):
            return self._apply(cmd)
        elif isinstance(cmd, c.CloseWindow):
            self._dump()
            with self.lock:
                rows = self.summary.flush(now())
            return c.WindowClosed(now(), tuple(rows))
        elif isinstance(cmd, c.SpoolBatch):
            try:
                res = self.spool.put(cmd.batch_id, cmd.seq, list(cmd.rows))
            except (OSError, SpoolError) as exc:
                return c.Spooled(now(), cmd.batch_id, False, error=str(exc))
            return c.Spooled(now(), cmd.batch_id, True, res.evicted, res.dropped_flows)
        elif isinstance(cmd, c.Upload):
            return self._upload(cmd.batch_id)
        elif isinstance(cmd, c.Heartbeat):
            return self._heartbeat(cmd.payload)
        elif isinstance(cmd, c.CheckTamper):
            tr = self.tamper.check()
            if tr.error:
                _log("warning", "tamper check failed", error=tr.error)
            return c.TamperChecked(now(), tr.changed, tr.detail)
        elif isinstance(cmd, c.CollectInventory):
            return self._collect_inventory()
        elif isinstance(cmd, c.SendInventory):
            try:
                if self.inventory is not None:
                    self.client.inventory(self.inventory)
            except ChannelError as exc:
                return c.InventorySent(now(), cmd.fingerprint, False, str(exc))
            return c.InventorySent(now(), cmd.fingerprint, True)
        elif isinstance(cmd, c.Unpair):
            self._unpair(cmd.final_state)
        elif isinstance(cmd, c.SaveStatus):
            self._save_status(cmd.status)
        return None

    def _spool_open_window(self) -> None:
        """On a stop, the window in progress is summarised and spooled (not uploaded): the
        next start sends it, under the id it was given now."""
        with self.lock:
            rows = self.summary.flush(time.time())
        for cmd in self.core.handle(c.WindowClosed(time.time(), tuple(rows))):
            if isinstance(cmd, c.SpoolBatch):
                self._execute(cmd)

    # -- commands ----------------------------------------------------------------------------
    def _activate(self) -> c.Event:
        now = time.time()
        self.state.clear_credential()
        self.cred = None
        self.client.set_credential(None, None)
        if not self.opts.pairing_key:
            return c.Activated(now, False, "no pairing key given (--pairing-key)")
        self.local_ips = local_addresses() or self.local_ips
        try:
            data = call_with_retry(lambda: self.client.activate(
                pairing_key=self.opts.pairing_key or "", hostname=self.hostname,
                ips=self.local_ips, agent_version=c.AGENT_VERSION), attempts=2)
        except ChannelError as exc:
            return c.Activated(time.time(), False, str(exc))
        self.cred = Credential(self.opts.server, int(data["agent_id"]), str(data["credential"]),
                               str(data["workload"]))
        self.state.save_credential(self.cred)
        self.client.set_credential(self.cred.agent_id, self.cred.credential)
        return c.Activated(time.time(), True, heartbeat_s=data.get("heartbeat_interval_s"))

    def _apply(self, cmd: c.Apply) -> c.Event:
        t0 = time.monotonic()
        cw: CompiledWorkload = cmd.compiled
        try:
            processes: list[tuple[str | None, str | None, str | None]] = []
            if any(s.process or s.unit for r in cw.inbound for s in r.services):
                processes = self._listening_processes()
            ctx = host_context(cw, control_plane_endpoints(self.opts.server), processes,
                               table=self.opts.table, nflog_group=self.opts.nflog_group,
                               cgroup_base=cgroup2_root())
            with self.lock:  # verdicts logged from now on follow the new state
                self.summary.set_policy(cw.enforcement, {r.instance: r.rule_id
                                                         for r in cw.inbound + cw.outbound})
            enforcement = self.enforcer.apply(cw, ctx)
        except ApplyError as exc:
            with self.lock:
                self._restore_summary_policy()
            return c.Applied(time.time(), cmd.version, False, error=str(exc))
        self.state.save_policy(cmd.version, cmd.document)
        self._applied_cw = cw
        took = time.monotonic() - t0
        self.apply_latency.append(took)
        self.stats["applies"] += 1
        _log("info", "ruleset programmed", version=cmd.version, reason=cmd.reason,
             seconds=round(took, 4))
        return c.Applied(time.time(), cmd.version, True, enforcement)

    _applied_cw: CompiledWorkload | None = None

    def _restore_summary_policy(self) -> None:
        cw = self._applied_cw
        if cw is None:
            self.summary.set_policy(None, {})
        else:
            self.summary.set_policy(cw.enforcement, {r.instance: r.rule_id
                                                     for r in cw.inbound + cw.outbound})

    def _listening_processes(self) -> list[tuple[str | None, str | None, str | None]]:
        r = self.inv_resolver or self.resolver
        if r is None:
            return []
        out = []
        with contextlib.suppress(OSError, RuntimeError):
            for ls in r.listening():
                if ls.process is not None:
                    out.append((ls.process.exe, ls.process.unit, ls.process.cgroup))
        return out

    def _upload(self, batch_id: str) -> c.Event:
        now = time.time
        try:
            rows = self.spool.rows(batch_id)
        except SpoolError as exc:
            self.spool.ack(batch_id)  # unreadable on disk: cannot ever be sent
            return c.Uploaded(now(), batch_id, False, retryable=False, error=str(exc))
        try:
            got = self.client.upload_flows(batch_id, rows)
        except ChannelError as exc:
            return c.Uploaded(now(), batch_id, False, retryable=exc.retryable,
                              error=str(exc), unauthorized=exc.unauthorized)
        self.spool.ack(batch_id)
        if not got.get("duplicate"):
            self.stats["uploaded_flows"] += len(rows)
        return c.Uploaded(now(), batch_id, True)

    def _heartbeat(self, payload: dict[str, Any]) -> c.Event:
        try:
            data = self.client.heartbeat(payload)
        except ChannelError as exc:
            return c.HeartbeatDone(time.time(), False, unauthorized=exc.unauthorized,
                                   error=str(exc))
        unpair = data.get("unpair") or None
        final = unpair.get("final_state") if isinstance(unpair, dict) else None
        return c.HeartbeatDone(time.time(), True, unpair=final,
                               heartbeat_s=data.get("heartbeat_interval_s"))

    def _collect_inventory(self) -> c.Event:
        if self.inv_resolver is None:
            with contextlib.suppress(ImportError, OSError):
                from bulkhead.agent.procs import ProcessResolver
                self.inv_resolver = ProcessResolver()
        inv: dict[str, Any]
        try:
            from bulkhead.agent import inventory as inventory_mod
        except ImportError:
            inv = basic_inventory(self.hostname, self.inv_resolver)
        else:
            try:
                inv = inventory_mod.collect(self.hostname, self.inv_resolver)
            except (OSError, RuntimeError, ValueError) as exc:
                _log("warning", "inventory collection failed", error=str(exc))
                inv = basic_inventory(self.hostname, self.inv_resolver)
        ips = [a for i in inv.get("interfaces", []) for a in i.get("addresses", [])
               if not a.startswith("fe80:")]
        if ips:
            self.local_ips = ips
            with self.lock:
                self.summary.set_local(ips)
        self.inventory = inv
        try:
            from bulkhead.agent.inventory import fingerprint
            digest = fingerprint(inv)
        except ImportError:
            digest = hashlib.sha256(json.dumps(inv, sort_keys=True).encode()).hexdigest()
        return c.InventoryCollected(time.time(), digest, self._firewall_warnings())

    def _firewall_warnings(self) -> tuple[str, ...]:
        try:
            from bulkhead.agent.firewalls import scan
        except ImportError:
            return ()
        try:
            found = scan(self.opts.table)
        except (OSError, RuntimeError, ValueError) as exc:
            return (f"scan: could not look for other firewall managers: {exc}",)
        return tuple(f"{w.manager}: {w.detail}" for w in found)

    def _unpair(self, final_state: str) -> None:
        if final_state == "remove":
            try:
                self.enforcer.remove(host_context(
                    CompiledWorkload(self.hostname, (), "idle", "linux", "enforce"), (), (),
                    table=self.opts.table, nflog_group=self.opts.nflog_group))
            except ApplyError as exc:
                _log("error", "could not remove our rules", error=str(exc))
        self.enforcer.expected = None
        self.state.clear_credential()
        self.state.clear_policy()
        self.cred = None
        _log("info", "unpaired; firewall " + ("rules removed" if final_state == "remove"
                                               else "left with the last policy"))

    def _save_status(self, status: dict[str, Any], *, force: bool = False) -> None:
        status = dict(status)
        status.update({"server": self.opts.server, "hostname": self.hostname,
                       "agent_id": self.cred.agent_id if self.cred else None,
                       "workload": self.cred.workload if self.cred else None,
                       "spool_bytes": self.spool.size_bytes(), "backend": self.enforcer.backend,
                       "tamper_detected": self.tamper.detected})
        same = {k: v for k, v in status.items() if k != "updated"}
        if not force and same == self._last_status:
            return
        self._last_status = same
        with contextlib.suppress(OSError):
            self.state.save_status(status)
        self._update_metrics(status)

    # -- metrics -----------------------------------------------------------------------------
    def _start_metrics(self) -> None:
        if self.opts.metrics_port is None:
            return
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        reg = CollectorRegistry()
        g = {name: Gauge(f"bulkhead_agent_{name}", doc, registry=reg) for name, doc in (
            ("paired", "1 when paired"), ("spooled_batches", "batches waiting in the spool"),
            ("spool_bytes", "bytes in the spool"),
            ("dropped_flows", "flow summaries dropped at the spool bound"),
            ("conntrack_events", "conntrack events read"),
            ("nflog_packets", "NFLOG packets read"),
            ("uploaded_flows", "flow summaries acknowledged by the server"),
            ("tamper_detected", "tamper events detected"),
            ("applies", "rulesets programmed"))}
        start_http_server(self.opts.metrics_port, addr="127.0.0.1", registry=reg)
        self.metrics = g

    def _update_metrics(self, status: dict[str, Any]) -> None:
        g = self.metrics
        if g is None:
            return
        g["paired"].set(1 if status.get("paired") else 0)
        g["spooled_batches"].set(status.get("spooled_batches") or 0)
        g["spool_bytes"].set(status.get("spool_bytes") or 0)
        g["dropped_flows"].set(status.get("dropped_flows") or 0)
        g["conntrack_events"].set(self.stats["ct_events"])
        g["nflog_packets"].set(self.stats["nflog_packets"])
        g["uploaded_flows"].set(self.stats["uploaded_flows"])
        g["tamper_detected"].set(self.tamper.detected)
        g["applies"].set(self.stats["applies"])
