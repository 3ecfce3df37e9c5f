"""`bulkhead policy …`: validate, evaluate, compile, lint, diff, test, fmt, schema.

These are interfaces users script against (docs/policy-semantics.md §5): stdout carries the
result, stderr the errors (one per line), exit 1 on invalid input or failed checks, 2 on usage.
"""

from __future__ import annotations

import csv
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import NoReturn

import typer

from bulkhead.domain.errors import PolicyError
from bulkhead.domain.model import Policy

app = typer.Typer(no_args_is_help=True, help="Policy as code: check, evaluate, compile.")


class Fmt(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


class Target(StrEnum):
    nftables = "nftables"
    iptables = "iptables"
    windows = "windows"
    kubernetes = "kubernetes"


class TextFmt(StrEnum):
    text = "text"
    json = "json"


def _fail(err: PolicyError, code: int = 1) -> NoReturn:
    for issue in err.issues:
        typer.echo(str(issue), err=True)
    raise typer.Exit(code)


def _load(path: Path) -> Policy:
    from bulkhead.policy.fileformat import load_policy

    try:
        return load_policy(str(path))
    except PolicyError as err:
        _fail(err)


@app.command()
def validate(file: Path) -> None:
    """Exit 0 when FILE is a valid policy; else exit 1 with one error per line."""
    from bulkhead.policy.fileformat import policy_from_document
    from bulkhead.policy.lint import has_errors, lint
    from bulkhead.policy.source import read_file

    try:
        doc = read_file(str(file))
        policy = policy_from_document(doc)
    except PolicyError as err:
        _fail(err)
    findings = lint(policy, doc)
    if has_errors(findings):
        for f in findings:
            if f.severity == "error":
                typer.echo(str(f), err=True)
        raise typer.Exit(1)
    rules = sum(len(rs.rules) for rs in policy.rulesets)
    typer.echo(f"{file}: valid ({len(policy.workloads)} workloads, {len(policy.rulesets)} "
               f"rulesets, {rules} rules)")


@app.command()
def lint(file: Path,
         fmt: TextFmt = typer.Option(TextFmt.text, "--format", help="text or json"),
         strict: bool = typer.Option(False, help="Exit 1 on warnings too.")) -> None:
    """Report rules that can never match, dangling references, shadowed, redundant and
    over-broad rules, empty groups. Exit 1 when there are errors."""
    from bulkhead.policy.fileformat import policy_from_document
    from bulkhead.policy.lint import has_errors
    from bulkhead.policy.lint import lint as run_lint
    from bulkhead.policy.source import read_file

    try:
        doc = read_file(str(file))
        policy = policy_from_document(doc)
    except PolicyError as err:
        _fail(err)
    findings = run_lint(policy, doc)
    if fmt == TextFmt.json:
        typer.echo(json.dumps([{"severity": f.severity, "code": f.code, "path": f.path,
                                "line": f.line, "message": f.message} for f in findings],
                              indent=2))
    else:
        for f in findings:
            typer.echo(f"{f.severity}: {f.code}: {f}")
        if not findings:
            typer.echo(f"{file}: no findings")
    if has_errors(findings) or (strict and any(f.severity == "warning" for f in findings)):
        raise typer.Exit(1)


@app.command()
def evaluate(file: Path,
             flows: Path = typer.Option(..., "--flows", help="CSV with src_ip,dst_ip,proto,"
                                        "dst_port[,process,unit,user,ts,count]"),
             fmt: Fmt = typer.Option(Fmt.csv, "--format"),
             out: Path | None = typer.Option(None, "--out", help="Write here, not stdout.")
             ) -> None:
    """Decide every flow: the input columns plus decision, side and rules."""
    from bulkhead.flows.csvflows import read_flows_file
    from bulkhead.policy.batch import BatchEvaluator

    policy = _load(file)
    try:
        table = read_flows_file(str(flows))
    except PolicyError as err:
        _fail(err)
    result = BatchEvaluator(policy).evaluate(
        table.src_ip, table.dst_ip, table.proto, table.dst_port, process=table.process,
        unit=table.unit, user=table.user)
    decisions = result.decisions()
    sides = result.sides()
    rules = [";".join(p) for p in result.patterns]
    pattern = result.pattern.tolist()
    sink = open(out, "w", encoding="utf-8", newline="") if out else sys.stdout  # noqa: SIM115
    try:
        if fmt == Fmt.csv:
            w = csv.writer(sink, lineterminator="\n")
            w.writerow([*table.header, "decision", "side", "rules"])
            for i, row in enumerate(table.rows):
                w.writerow([*row, decisions[i], sides[i], rules[pattern[i]]])
        else:
            for i, row in enumerate(table.rows):
                rec = dict(zip(table.header, row, strict=True))
                rec.update(decision=decisions[i], side=sides[i], rules=rules[pattern[i]])
                sink.write(json.dumps(rec) + "\n")
    finally:
        if out:
            sink.close()


def _parse_context(control_plane: list[str], cgroup: list[str], uid: list[str],
                   nflog_group: int) -> object:
    from bulkhead.dataplane.model import Endpoint, HostContext
    from bulkhead.domain.addresses import canonical_ip

    eps = []
    for cp in control_plane:
        addr, port = cp, None
        if cp.startswith("["):
            addr, _, rest = cp[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else None
        elif cp.count(":") == 1:
            addr, _, p = cp.partition(":")
            port = int(p)
        try:
            eps.append(Endpoint(canonical_ip(addr), port))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--control-plane") from None
    groups: dict[str, tuple[str, int]] = {}
    for item in cgroup:
        name, eq, rest = item.partition("=")
        path, colon, level = rest.rpartition(":")
        if not eq or not colon or not (level.isascii() and level.isdigit()):
            raise typer.BadParameter(f"expected NAME=PATH:LEVEL, got {item!r}",
                                     param_hint="--cgroup")
        groups[name] = (path, int(level))
    uids: dict[str, int] = {}
    for item in uid:
        name, eq, num = item.partition("=")
        if not eq or not (num.isascii() and num.isdigit()):
            raise typer.BadParameter(f"expected USER=UID, got {item!r}", param_hint="--uid")
        uids[name] = int(num)
    return HostContext(control_plane=tuple(eps), cgroups=groups, uids=uids,
                       nflog_group=nflog_group)


@app.command()
def compile(file: Path,
            workload: str = typer.Option(..., "--workload", help="Workload name."),
            target: Target = typer.Option(Target.nftables, "--target"),
            control_plane: list[str] = typer.Option(
                [], "--control-plane", help="ADDR[:PORT] of the control plane (repeatable); "
                "its traffic is never blocked."),
            cgroup: list[str] = typer.Option(
                [], "--cgroup", help="NAME=PATH:LEVEL: cgroup v2 of a process or unit that a "
                "service is bound to (repeatable)."),
            uid: list[str] = typer.Option([], "--uid", help="USER=UID for user-group rules."),
            nflog_group: int = typer.Option(7, "--nflog-group")) -> None:
    """Print the firewall artefact for one workload."""
    from bulkhead.dataplane.model import HostContext
    from bulkhead.policy.compile import Compiler

    policy = _load(file)
    if policy.workload(workload) is None:
        typer.echo(f"{file}: no workload named {workload!r}", err=True)
        raise typer.Exit(1)
    ctx = _parse_context(control_plane, cgroup, uid, nflog_group)
    assert isinstance(ctx, HostContext)
    w = policy.workload(workload)
    if w is not None and not w.managed:
        typer.echo(f"note: {workload} is unmanaged: no agent applies this artefact to it",
                   err=True)
    cw = Compiler(policy).compiled[workload]
    try:
        if target == Target.nftables:
            from bulkhead.dataplane.nftables import render_nftables

            typer.echo(render_nftables(cw, ctx), nl=False)
            return
        if target == Target.iptables:
            from bulkhead.dataplane.iptables import render_iptables

            typer.echo(render_iptables(cw, ctx).text(), nl=False)
            return
    except ValueError as exc:
        typer.echo(f"{file}: cannot compile {workload} for {target.value}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"target {target.value!r} is not available in this release "
               "(available: nftables, iptables)", err=True)
    raise typer.Exit(2)


@app.command()
def diff(old: Path, new: Path,
         fmt: TextFmt = typer.Option(TextFmt.text, "--format"),
         exit_code: bool = typer.Option(False, "--exit-code",
                                        help="Exit 1 when the policies differ.")) -> None:
    """Semantic diff: which (consumer, provider, service) triples become allowed or blocked."""
    from bulkhead.policy.diff import diff as run_diff

    result = run_diff(_load(old), _load(new))
    if fmt == TextFmt.json:
        typer.echo(json.dumps(result.to_data(), indent=2))
    else:
        typer.echo(result.to_text(), nl=False)
    if exit_code and not result.is_empty():
        raise typer.Exit(1)


@app.command("test")
def test_cmd(file: Path) -> None:
    """Run the file's `tests`; exit 0 when all hold, else 1 with each failure."""
    from bulkhead.policy.intent import run_tests

    policy = _load(file)
    outcomes = run_tests(policy)
    failed = [o for o in outcomes if not o.passed]
    for o in outcomes:
        t = o.test
        label = t.name or f"tests[{o.index}]"
        src = t.source if isinstance(t.source, str) else json.dumps(_actor(t.source))
        dst = t.target if isinstance(t.target, str) else json.dumps(_actor(t.target))
        head = f"{label}: {src} -> {dst} {t.port} expect {t.expect}"
        if o.passed:
            typer.echo(f"PASS {head} ({o.checked} flow{'s' if o.checked != 1 else ''})")
            continue
        typer.echo(f"FAIL {head}")
        if o.problem:
            typer.echo(f"  {o.problem}")
        for f in o.failures:
            rules = ", ".join(f.decision.rules) or "no rule matched"
            typer.echo(f"  {f.source} -> {f.target}: {f.decision.decision} "
                       f"(side: {f.decision.side}; rules: {rules})")
    typer.echo(f"{len(outcomes) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


def _actor(a: object) -> object:
    from bulkhead.domain.model import Actor
    from bulkhead.policy.fileformat import actor_data

    assert isinstance(a, Actor)
    return actor_data(a)


@app.command()
def fmt(file: Path,
        write: bool = typer.Option(False, "--write", help="Rewrite FILE in place."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML.")
        ) -> None:
    """Print FILE in canonical form (stable key order, defaults omitted)."""
    from bulkhead.policy.fileformat import dump_policy

    policy = _load(file)
    text = dump_policy(policy, "json" if as_json else "yaml")
    if write:
        tmp = file.with_name(f".{file.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(file)
    else:
        typer.echo(text, nl=False)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the policy file."""
    from bulkhead.policy.schema import policy_schema

    typer.echo(json.dumps(policy_schema(), indent=2))


def _train_until(text: str | None) -> float | None:
    from bulkhead.flows.csvflows import parse_ts

    if text is None:
        return None
    try:
        return parse_ts(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--train-until") from None


def _write_all(files: list[tuple[Path, str]]) -> None:
    """Write every file or none: each goes to a temporary file first, renamed at the end."""
    done: list[Path] = []
    try:
        for path, text in files:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            done.append(tmp)
        for (path, _), tmp in zip(files, done, strict=True):
            tmp.replace(path)
    except OSError as exc:
        for tmp in done:
            tmp.unlink(missing_ok=True)
        typer.echo(f"cannot write {exc.filename or ''}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def generate(file: Path,
             flows: Path = typer.Option(..., "--flows", help="CSV with src_ip,dst_ip,proto,"
                                        "dst_port,ts[,count,process]"),
             out: Path = typer.Option(..., "--out", help="Write the draft policy here "
                                      "(.json for JSON, else YAML)."),
             granularity: str | None = typer.Option(
                 None, "--granularity", help="env|app|tier|service|process (default: the "
                 "recommended point of the default curve)"),
             scope: str = typer.Option("", "--scope", help="KEY=VALUE[,KEY=VALUE]: only flows "
                                       "with an end in this selector (default: everything)"),
             train_until: str | None = typer.Option(
                 None, "--train-until", help="epoch seconds or ISO 8601: later flows are held "
                 "out to measure the result"),
             report: Path | None = typer.Option(None, "--report", help="Write the JSON "
                                                "report here."),
             external: str = typer.Option("cidr", "--external", help="cidr (one IP list per "
                                          "/24) or internet (one list)"),
             noise: str = typer.Option("all", "--noise", help="comma list of noise filters, "
                                       "'all' or 'none'"),
             crown_jewel: list[str] = typer.Option(
                 [], "--crown-jewel", help="KEY=VALUE[,…]: workloads whose unobserved consumers "
                 "must stay denied (a generated test; repeatable)")) -> None:
    """Generate allow rules from observed flows: DRAFT = FILE + the recommended candidate."""
    from bulkhead.flows.csvflows import read_flows_file
    from bulkhead.generate import FlowColumns, Options, generate, label_selector
    from bulkhead.generate.noise import DEFAULT_NOISE
    from bulkhead.policy.fileformat import dump_policy, loads_policy

    policy = _load(file)
    try:
        table = read_flows_file(str(flows))
    except PolicyError as err:
        _fail(err)
    until = _train_until(train_until)
    if until is not None and table.ts is None:
        typer.echo(f"{flows}: --train-until needs a 'ts' column", err=True)
        raise typer.Exit(1)
    names = (DEFAULT_NOISE if noise == "all" else () if noise == "none"
             else tuple(n.strip() for n in noise.split(",") if n.strip()))
    try:
        opts = Options(granularity=granularity, scope=label_selector(scope, "--scope"),
                       train_until=until, external=external, noise=names,
                       crown_jewels=tuple(label_selector(c, "--crown-jewel")
                                          for c in crown_jewel))
        opts.check()
        result = generate(policy, FlowColumns(table.src_ip, table.dst_ip, table.proto,
                                              table.dst_port, table.process, table.ts,
                                              table.count), opts)
    except ValueError as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(2 if not isinstance(exc, PolicyError) else 1) from None
    chosen = result.candidates[result.recommended]
    text = dump_policy(chosen.draft, "json" if out.suffix == ".json" else "yaml")
    loads_policy(text, str(out))  # the draft must load with every other command
    data = result.full_report()
    files = [(out, text)]
    if report is not None:
        files.append((report, json.dumps(data, indent=2) + "\n"))
    _write_all(files)
    test = data["coverage_test"]
    typer.echo(f"{out}: {chosen.name}: {data['rules']} rules, coverage train "
               f"{data['coverage_train']:.3f}, test "
               f"{'n/a' if test is None else format(test, '.3f')}, over-permission "
               f"{data['over_permission']:.3f} ({data['over_permission_count']} triples)")
