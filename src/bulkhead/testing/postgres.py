"""A throwaway PostgreSQL cluster for tests: `initdb` + `pg_ctl` into a temporary directory,
listening on a Unix socket only. As root the server runs as the `postgres` user (it refuses
to run as root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def unavailable() -> str | None:
    """None when a throwaway cluster can be started here; else the reason."""
    if pg_bin() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TempPostgres:
    def __init__(self) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL binaries not found")
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="bulkhead-pg-"))
        self.port = _free_port()
        self.user: str | None = "postgres" if os.geteuid() == 0 else None

    def _run(self, *argv: str) -> None:
        cmd = list(argv)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> TempPostgres:
        if self.user:
            shutil.chown(self.dir, self.user)
        data = self.dir / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = (f"-c listen_addresses='' -c unix_socket_directories={self.dir} "
                f"-c port={self.port} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-w", "-l",
                  str(self.dir / "log"), "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.dir}&port={self.port}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host=str(self.dir), port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        data = self.dir / "data"
        if data.exists():
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                          "-w", "stop")
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        shutil.rmtree(self.dir, ignore_errors=True)
