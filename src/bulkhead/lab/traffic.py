"""Traffic generator run inside one lab host's network namespace.

Usage::

    python -I traffic.py SPEC.json

(stdlib only, run by path like the responder.) SPEC is written by `bulkhead.lab.runner`::

    {"host": "web-1", "timeout": 1.0, "status": "/run/bulkhead-lab/traffic/web-1.status",
     "schedules": [{"path": "traffic[0]", "proto": "tcp", "port": 8080, "every": 2.0,
                    "phase": 0.73, "first": 1, "dst": ["10.77.0.4", "10.77.0.5"]}]}

Each schedule opens one connection at ``start + phase + k * every`` to ``dst[(first + k) %
len(dst)]`` - the schedule `bulkhead.lab.synth` computes, so recorded and synthesized flows
agree. A TCP connection reads the responder's line and closes; a UDP one waits for the echo.
Connections never delay the schedule (each is its own task). Every 2 s and at exit the
counters (per schedule and destination: ok, failed, last error) are written to `status` as
JSON (atomically). SIGTERM/SIGINT stop it with exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any


class Counters:
    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def add(self, path: str, dst: str, ok: bool, error: str | None) -> None:
        entry = self.data.setdefault(f"{path} {dst}", {"path": path, "dst": dst, "ok": 0,
                                                       "failed": 0, "last_error": None})
        if ok:
            entry["ok"] += 1
        else:
            entry["failed"] += 1
            entry["last_error"] = error

    def write(self, path: str, host: str, started: float) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"host": host, "pid": os.getpid(), "started": started, "at": time.time(),
                       "edges": list(self.data.values())}, fh)
        os.replace(tmp, path)


async def connect_tcp(dst: str, port: int, timeout: float) -> str | None:
    """None when connected (and the line read), else what went wrong."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(dst, port), timeout)
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), timeout)
    return None


async def exchange_udp(dst: str, port: int, timeout: float) -> str | None:
    loop = asyncio.get_running_loop()
    token = os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect((dst, port))
            sock.send(token)
        except OSError as exc:
            return exc.strerror or str(exc)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), left)
            except TimeoutError:
                return "timeout"
            except OSError as exc:
                return exc.strerror or str(exc)
            if data == token:
                return None
    return "timeout"


async def run_schedule(s: dict[str, Any], start: float, timeout: float, counters: Counters,
                       tasks: set[asyncio.Task[None]]) -> None:
    dsts: list[str] = list(s["dst"])
    every, phase, first = float(s["every"]), float(s["phase"]), int(s["first"])
    proto, port, path = s["proto"], int(s["port"]), s["path"]

    async def one(dst: str) -> None:
        if proto == "tcp":
            err = await connect_tcp(dst, port, timeout)
        else:
            err = await exchange_udp(dst, port, timeout)
        counters.add(path, dst, err is None, err)

    k = 0
    loop = asyncio.get_running_loop()
    while True:
        due = start + phase + k * every
        # Behind schedule (a stalled machine): skip missed slots rather than burst.
        now = loop.time()
        if due < now - every:
            k += int((now - due) // every)
            continue
        await asyncio.sleep(max(0.0, due - now))
        task = asyncio.create_task(one(dsts[(first + k) % len(dsts)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        k += 1


async def main_async(spec: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counters = Counters()
    timeout = float(spec.get("timeout", 1.0))
    status, host = spec.get("status"), str(spec.get("host", ""))
    started = time.time()
    start = loop.time()
    tasks: set[asyncio.Task[None]] = set()
    runners = [asyncio.create_task(run_schedule(s, start, timeout, counters, tasks))
               for s in spec.get("schedules", []) if s.get("dst")]
    print(f"READY pid={os.getpid()} schedules={len(runners)}", flush=True)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)
        if status:
            with contextlib.suppress(OSError):
                counters.write(status, host, started)
    for t in runners + list(tasks):
        t.cancel()
    await asyncio.gather(*runners, *tasks, return_exceptions=True)
    if status:
        with contextlib.suppress(OSError):
            counters.write(status, host, started)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: traffic.py SPEC.json", file=sys.stderr)
        return 2
    try:
        with open(args[0], encoding="utf-8") as fh:
            spec = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"traffic: cannot read {args[0]}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(main_async(spec))


if __name__ == "__main__":
    sys.exit(main())
