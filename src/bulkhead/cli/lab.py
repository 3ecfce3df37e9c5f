"""`bulkhead lab`: a data centre of network namespaces on one machine.

Exit status: 0 done (for `probe`: it connected), 1 failure (for `probe`: refused or
dropped), 2 usage errors (bad arguments, invalid topology, no lab up).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bulkhead.domain.errors import PolicyError

if TYPE_CHECKING:
    from bulkhead.lab.runner import Lab

P = ParamSpec("P")
T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Lab hosts in network namespaces with real services, agents and traffic.")

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON output.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, max=30,
                                           help="Seconds to wait for an answer.")]


def _err() -> Console:
    return Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    _err().print(f"[red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _need_root() -> None:
    if os.geteuid() != 0:
        _fail("the lab needs root (network namespaces, cgroups, nftables)", 1)


def _lab() -> Lab:
    from bulkhead.lab.runner import Lab  # lazily: keeps `bulkhead --help` fast

    return Lab()


def _run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call fn, turning lab errors into messages and exit statuses."""
    from bulkhead.lab.netns import NetnsError
    from bulkhead.lab.runner import LabError, UsageError

    try:
        return fn(*args, **kwargs)
    except UsageError as exc:
        _fail(str(exc), 2)
    except PolicyError as exc:
        _fail(f"invalid topology:\n{exc}", 2)
    except (LabError, NetnsError) as exc:
        _fail(str(exc), 1)


@app.command()
def up(
    topology: Annotated[Path, typer.Argument(help="Topology file (YAML), see docs/lab.md.")],
    server: Annotated[str | None, typer.Option(
        "--server", help="Use this control plane (URL) instead of starting a local one.")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="BULKHEAD_API_KEY",
        help="API key for --server (admin: imports workloads, creates a pairing key).")] = None,
    no_agents: Annotated[bool, typer.Option("--no-agents", help="Start no agents.")] = False,
    no_labels: Annotated[bool, typer.Option(
        "--no-labels", help="Import workloads without labels (label them later with "
                            "`bulkhead lab import-labels`).")] = False,
    no_traffic: Annotated[bool, typer.Option("--no-traffic", help="Start no traffic.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the traffic schedule.")] = 0,
    agent_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for every agent to report in.")] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Build the hosts, start services, control plane, agents and traffic; return when every
    agent has reported in. An earlier lab (even a crashed one) is removed first."""
    from bulkhead.lab.topology import load_topology

    _run(load_topology, str(topology))  # exit 2 on a bad file before needing root
    _need_root()
    lab = _lab()
    err = _err()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("starting the lab", total=None)

        def say(message: str) -> None:
            progress.update(task, description=message)
            progress.console.print(f"[dim]·[/] {message}", highlight=False)

        st = _run(lab.up, topology, server=server, api_key=api_key, agents=not no_agents,
                  labels=not no_labels, traffic=not no_traffic, seed=seed,
                  agent_timeout=agent_timeout, progress=say)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    _print_status(st)
    srv = lab.state()["server"]
    if srv.get("local"):
        err.print(f"console: {srv['url']}  (user {srv['user']}, password {srv['password']})",
                  highlight=False)
    err.print("[green]lab is up[/]; `bulkhead lab down` removes it")


def _print_status(st: dict[str, Any]) -> None:
    console = Console()
    console.print(f"lab [bold]{st['name']}[/] ({st['status']}), network {st['network']}, "
                  f"gateway {st['gateway']}, control plane {st['server'].get('url', '-')}",
                  highlight=False)
    t = Table()
    for col in ("host", "address", "up", "agent", "enforcement", "policy", "conns ok/failed"):
        t.add_column(col, no_wrap=True)
    t.add_column("labels")
    for h in st["hosts"]:
        a = h["agent"]
        if a is None:
            agent, enf, pol = ("-" if h["managed"] else "unmanaged"), "-", "-"
        else:
            agent = "online" if a["online"] else "offline"
            enf = a["enforcement"]
            pol = f"{a['applied_version'] or '-'}" + ("" if a["in_sync"] else
                                                      f" (want {a['policy_version']})")
        tr = h["traffic"]
        t.add_row(h["name"], h["ip"], "yes" if h["up"] else "[red]no[/]", agent, enf, pol,
                  "-" if tr is None else f"{tr['ok']}/{tr['failed']}",
                  " ".join(f"{k}={v}" for k, v in h["labels"].items()))
    console.print(t)
    if st["internet"]["externals"]:
        console.print(f"internet ({st['internet']['ip']}) serves "
                      f"{', '.join(st['internet']['externals'])}", highlight=False)
    dead = [p for p in st["processes"] if not p["alive"]]
    if dead:
        console.print(f"[yellow]{len(dead)} lab process(es) not running:[/] " + ", ".join(
            f"{p['role']} {p['host'] or ''}".strip() for p in dead), highlight=False)
    if st.get("server_error"):
        console.print(f"[yellow]control plane:[/] {st['server_error']}", highlight=False)


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Hosts, addresses, agent state, applied policy version."""
    _need_root()
    st = _run(_lab().status)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
    else:
        _print_status(st)


@app.command()
def probe(
    source: Annotated[str, typer.Argument(metavar="FROM", help="Lab host name.")],
    target: Annotated[str, typer.Argument(metavar="TO",
                                          help="Lab host name, address or external:IP.")],
    port: Annotated[str, typer.Argument(help="tcp/N, udp/N or icmp.")],
    timeout: TimeoutOpt = 1.5,
) -> None:
    """One real connection attempt: exit 0 when it connects, 1 when refused or dropped."""
    _need_root()
    r = _run(_lab().probe, source, target, port, timeout=timeout)
    what = {"open": "connected", "refused": "refused",
            "timeout": "dropped (no answer)"}[r.result]
    typer.echo(f"{r.source} -> {r.target} ({r.ip}) {r.port}: {what}")
    raise typer.Exit(0 if r.connected else 1)


@app.command()
def attack(name: Annotated[str, typer.Argument(help="Attack name from the topology.")],
           timeout: TimeoutOpt = 1.5, as_json: JsonOpt = False) -> None:
    """Run a named attack and print what got through."""
    _need_root()
    results = _run(_lab().attack, name, timeout=timeout)
    reached = [r for r in results if r.connected]
    if as_json:
        typer.echo(json.dumps({"attack": name, "attempts": len(results),
                               "reached": [r.as_dict() for r in reached],
                               "results": [r.as_dict() for r in results]}, indent=2))
        return
    console = Console()
    t = Table("from", "to", "address", "port", "result")
    for r in results:
        style = "bold red" if r.connected else "green"
        word = {"open": "GOT THROUGH", "refused": "refused", "timeout": "dropped"}[r.result]
        t.add_row(r.source, r.target, r.ip, r.port, f"[{style}]{word}[/]")
    console.print(t)
    console.print(f"attack {name}: {len(reached)} of {len(results)} attempts got through",
                  highlight=False)


@app.command("import-labels")
def import_labels() -> None:
    """Import the topology's labels into the control plane (CSV, as from a CMDB)."""
    _need_root()
    report = _run(_lab().import_labels)
    typer.echo(f"labels imported: {json.dumps(report.get('summary', {}))}")


@app.command()
def down() -> None:
    """Remove everything the lab created; safe to run twice."""
    _need_root()
    lab = _lab()
    removed = _run(lab.down)
    left = lab.leftovers()
    if left:
        _fail("still present: " + ", ".join(left))
    typer.echo(f"lab removed ({len(removed)} items)" if removed else "no lab was up")
