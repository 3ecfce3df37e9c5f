"""`bulkhead demo`: from visibility to a contained attack, end to end.

As root (with nftables and iproute2) the story runs live in a lab of network namespaces with
real services, agents and traffic and a local control plane; otherwise it says why and runs
the same story on recorded flows, with the evaluator standing in for the firewalls."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from bulkhead.demo.recorded import Recorded
from bulkhead.demo.story import DEFAULT_TOPOLOGY, Summary, examples_dir, render


def _topology(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    shipped = examples_dir() / "topologies" / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.exists():
        return shipped
    raise typer.BadParameter(f"no topology file {name!r} (and no example of that name in "
                             f"{shipped.parent})", param_hint="--topology")


def _why_not_live() -> str | None:
    if os.geteuid() != 0:
        return "not running as root (the lab needs network namespaces and nftables)"
    from bulkhead.lab.netns import privileged_available

    return privileged_available()


def _hold(console: Console, url: str | None) -> None:
    """Keep the lab and console up until Ctrl-C (or SIGTERM: see `_sigterm_interrupts`)."""
    console.print(f"\nThe console is up at [bold]{url}[/]. Press Ctrl-C to stop the demo "
                  "and remove the lab.")
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


def _serve_recorded(console: Console, s: Summary, rec: Recorded) -> None:
    """The console on the story's result, until Ctrl-C; its data is removed afterwards."""
    import shutil
    import tempfile

    from bulkhead.demo.console import serve_recorded

    directory = Path(tempfile.mkdtemp(prefix="bulkhead-demo-"))
    try:
        serve_recorded(directory, rec.before, rec.draft, rec.flows,
                       note=f"generated from recorded traffic ({s.candidate})",
                       announce=lambda url: console.print(
                           f"\nThe console is up at [bold]{url}[/]: the recorded flows and "
                           "the generated policy, provisioned. Press Ctrl-C to stop."))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a stopped service, `timeout`) unwinds like Ctrl-C, so the cleanup runs."""
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(topology: Path, *, live: bool | None, exit_: bool, traffic_s: float,
        summary_file: Path | None, console: Console) -> Summary:
    with _sigterm_interrupts():
        return _run(topology, live=live, exit_=exit_, traffic_s=traffic_s,
                    summary_file=summary_file, console=console)


def _run(topology: Path, *, live: bool | None, exit_: bool, traffic_s: float,
         summary_file: Path | None, console: Console) -> Summary:
    why = _why_not_live()
    if live and why:
        raise typer.BadParameter(f"--live is not possible here: {why}")
    if live is None:
        live = why is None
    if not live:
        if why:
            console.print(f"[yellow]Running on recorded flows: {why}.")
        from bulkhead.demo.recorded import run_recorded

        s, rec = run_recorded(topology, console)
        render(console, s)
        if summary_file:
            s.write(summary_file)
        if not exit_:
            _serve_recorded(console, s, rec)
        return s
    from bulkhead.demo.live import run_live
    from bulkhead.lab.runner import Lab

    existing = Lab()
    if existing.state_path.exists():  # the demo's lab would replace it (same network)
        raise typer.BadParameter(
            f"a lab is up ({existing.state_path}); take it down first with `bulkhead lab "
            "down`, or run the demo on recorded flows with --recorded")
    lab = None
    try:
        s, lab = run_live(topology, console, traffic_s=traffic_s)
        render(console, s)
        if summary_file:
            s.write(summary_file)
        if not exit_:
            _hold(console, s.console_url)
        return s
    finally:
        # No second SIGTERM half-way through the teardown.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if lab is not None:
            with console.status("removing the lab"):
                lab.down()
        else:  # a failure half-way: leave nothing behind but the logs
            from bulkhead.lab.runner import Lab

            failed = Lab()
            failed.down(keep_logs=True)
            console.print(f"[red]The demo failed; the lab's logs are in {failed.dir / 'logs'}")


def demo(topology: str = typer.Option(DEFAULT_TOPOLOGY, "--topology", "-t",
                                      help="A topology file, or the name of a shipped example "
                                           "(shop, microservices, office)."),
         live: bool = typer.Option(None, "--live/--recorded",
                                   help="Live hosts or recorded flows (default: live when "
                                        "root and the lab can run)."),
         exit_: bool = typer.Option(False, "--exit",
                                    help="Exit when done instead of keeping the console up."),
         traffic_s: float = typer.Option(40.0, "--traffic-seconds", min=10,
                                         help="How long traffic flows in visibility (live)."),
         summary: Path = typer.Option(None, "--summary",
                                      help="Also write the summary as JSON to this file.")
         ) -> None:
    """Run the story: visibility, labels, the map, generated policy tested on recorded
    traffic, enforcement, and an attack contained."""
    from bulkhead.domain.errors import PolicyError
    from bulkhead.lab.netns import NetnsError
    from bulkhead.lab.runner import LabError
    from bulkhead.lab.topology import load_topology

    console = Console()
    path = _topology(topology)
    err = Console(stderr=True)
    try:
        load_topology(str(path))  # a bad file is a usage error, before anything starts
    except PolicyError as exc:
        err.print(f"[red]error:[/] invalid topology:\n{exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    try:
        s = run(path, live=live, exit_=exit_, traffic_s=traffic_s, summary_file=summary,
                console=console)
    except (LabError, NetnsError) as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted (what the demo started was removed)")
        raise typer.Exit(130) from None
    raise typer.Exit(0 if s.contained and s.legitimate_ok else 1)
