"""`bulkhead agent`: run the host agent, and inspect it locally.

`bulkhead agent --server URL --pairing-key KEY` is `bulkhead agent run …`: options given to the
group itself run the agent. `python -m bulkhead.cli.agent …` is the same command without the
rest of the CLI (the server's database layer alone costs ~15 MB of RSS): the systemd unit uses it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from bulkhead.agent.statefile import DEFAULT_STATE_DIR, StateDir, StateError

app = typer.Typer(add_completion=False,
                  help="The host agent: pair, report flows, enforce policy.")

Server = Annotated[str | None, typer.Option("--server", envvar="BULKHEAD_SERVER",
                                            help="Control plane URL, e.g. http://10.0.0.1:8443",
                                            show_default=False)]
PairingKey = Annotated[str | None, typer.Option(
    "--pairing-key", envvar="BULKHEAD_PAIRING_KEY",
    help="Pairing key (bhp_…); not needed once paired.", show_default=False)]
StateDirOpt = Annotated[Path, typer.Option("--state-dir", envvar="BULKHEAD_AGENT_STATE_DIR",
                                           help="State directory (one per agent).")]
Hostname = Annotated[str | None, typer.Option(
    "--hostname", help="Hostname to report (the workload name); default: this host's.",
    show_default=False)]
Window = Annotated[float, typer.Option("--flow-window", min=0.2,
                                       help="Seconds per flow summary window.")]
HeartbeatOpt = Annotated[float | None, typer.Option(
    "--heartbeat", min=0.2, help="Seconds between heartbeats (default: the server's interval).",
    show_default=False)]
Metrics = Annotated[int | None, typer.Option(
    "--metrics-port", min=1, max=65535, help="Serve Prometheus /metrics on 127.0.0.1:PORT.",
    show_default=False)]
LogFormat = Annotated[str, typer.Option("--log-format", help="json or text (to stderr).")]


def _run(server: str | None, pairing_key: str | None, state_dir: Path, hostname: str | None,
         flow_window: float, heartbeat: float | None, metrics_port: int | None,
         log_format: str) -> None:
    from bulkhead.agent.runtime import AgentOptions, Runtime, setup_logging
    from bulkhead.agent.spool import SpoolError

    if log_format not in ("json", "text"):
        typer.echo(f"error: --log-format: {log_format!r} is not json or text", err=True)
        raise typer.Exit(2)
    if not server:
        typer.echo("error: --server is required", err=True)
        raise typer.Exit(2)
    setup_logging(log_format)
    try:
        rt = Runtime(AgentOptions(server=server, pairing_key=pairing_key, state_dir=state_dir,
                                  hostname=hostname, flow_window_s=flow_window,
                                  heartbeat_s=heartbeat, metrics_port=metrics_port,
                                  tamper_every_s=1.0 if flow_window < 10 else 2.0,
                                  inventory_every_s=min(60.0, max(5.0, flow_window * 5))))
    except (StateError, SpoolError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if rt.cred is None and not pairing_key:
        typer.echo(f"error: not paired (no credential in {state_dir}) and no --pairing-key",
                   err=True)
        raise typer.Exit(2)
    raise typer.Exit(rt.run())


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context, server: Server = None, pairing_key: PairingKey = None,
         state_dir: StateDirOpt = DEFAULT_STATE_DIR, hostname: Hostname = None,
         flow_window: Window = 600.0, heartbeat: HeartbeatOpt = None,
         metrics_port: Metrics = None, log_format: LogFormat = "json") -> None:
    """The host agent. With options and no command, runs it (like `run`)."""
    if ctx.invoked_subcommand is not None:
        return
    if server is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0 if pairing_key is None else 2)
    _run(server, pairing_key, state_dir, hostname, flow_window, heartbeat, metrics_port,
         log_format)


@app.command()
def run(server: Server = None, pairing_key: PairingKey = None,
        state_dir: StateDirOpt = DEFAULT_STATE_DIR, hostname: Hostname = None,
        flow_window: Window = 600.0, heartbeat: HeartbeatOpt = None,
        metrics_port: Metrics = None, log_format: LogFormat = "json") -> None:
    """Pair (first time), then report flows and enforce the policy until stopped."""
    _run(server, pairing_key, state_dir, hostname, flow_window, heartbeat, metrics_port,
         log_format)


@app.command()
def status(state_dir: StateDirOpt = DEFAULT_STATE_DIR,
           as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False) -> None:
    """What the local agent last recorded: paired?, applied version, enforcement, spool."""
    if not state_dir.is_dir():
        typer.echo(f"error: no agent state in {state_dir}", err=True)
        raise typer.Exit(1)
    try:
        sd = StateDir(state_dir)
        cred = sd.credential()
        st = sd.status() or {}
    except (StateError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    out = {
        "paired": cred is not None, "server": cred.server if cred else st.get("server"),
        "agent_id": cred.agent_id if cred else None,
        "workload": cred.workload if cred else None,
        "applied_version": st.get("applied_version"), "enforcement": st.get("enforcement"),
        "spooled_batches": st.get("spooled_batches", 0), "spool_bytes": st.get("spool_bytes", 0),
        "dropped_flows": st.get("dropped_flows", 0), "last_upload": st.get("last_upload"),
        "last_heartbeat": st.get("last_heartbeat"), "errors": st.get("errors", []),
        "warnings": st.get("warnings", []), "updated": st.get("updated"),
    }
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    for k, v in out.items():
        if k == "errors":
            v = "; ".join(str(e.get("message")) for e in v) or "-"
        elif k == "warnings":
            v = "; ".join(v) or "-"
        elif k in ("last_upload", "last_heartbeat", "updated") and isinstance(v, int | float):
            v = datetime.fromtimestamp(v, UTC).isoformat(timespec="seconds")
        typer.echo(f"{k + ':':17} {'-' if v is None else v}")


if __name__ == "__main__":
    import sys

    # httpx imports its own command line (rich, click, pygments: ~9 MB resident) when those
    # are installed; the agent never uses it, and httpx falls back without it.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    app(prog_name="bulkhead agent")
