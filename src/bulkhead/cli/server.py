"""`bulkhead server …`: set up and run the control plane, and manage users and API keys from
the machine it runs on (whoever can open the database is an owner in effect; these commands
are audited as `cli:<login name>`).

Settings come from the environment (`BULKHEAD_DATA_DIR`, `BULKHEAD_DATABASE_URL`, …) or from
`--data-dir` / `--database-url`. Secrets are printed once and never logged; database URLs are
shown with their password hidden.
"""

from __future__ import annotations

import getpass
import json
import secrets
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from bulkhead.server.auth import ROLES, Principal, permissions_for
from bulkhead.server.db import Database, utcnow
from bulkhead.server.errors import DomainError
from bulkhead.server.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Run the control plane; manage users and keys.")
user_app = typer.Typer(no_args_is_help=True, help="Users (operators on the server host).")
key_app = typer.Typer(no_args_is_help=True, help="API keys (for scripts, CI, Prometheus).")
app.add_typer(user_app, name="user")
app.add_typer(key_app, name="api-key")

DataDir = Annotated[Path | None, typer.Option("--data-dir", envvar="BULKHEAD_DATA_DIR",
                                              help="Data directory.", show_default=False)]
DbUrl = Annotated[str | None, typer.Option("--database-url", envvar="BULKHEAD_DATABASE_URL",
                                           help="SQLAlchemy URL (default: SQLite in the data "
                                                "directory).", show_default=False)]
PasswordOpt = Annotated[str | None, typer.Option(
    "--password", help="The password (visible to other local users in the process list: "
                       "prefer --password-stdin).", show_default=False)]
PasswordStdin = Annotated[bool, typer.Option("--password-stdin",
                                             help="Read the password from standard input.")]
ScopeOpt = Annotated[list[str] | None, typer.Option(
    "--scope", help="Policy editors: KEY=V1,V2 (repeatable); rulesets they edit must be "
                    "scoped inside these labels.", show_default=False)]
REQUIRED_TABLES = ("users", "api_keys", "user_sessions", "audit_log")


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings(data_dir: Path | None, database_url: str | None) -> Settings:
    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if database_url is not None:
        overrides["database_url"] = database_url
    return Settings.from_env(**overrides)


def shown_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _open(settings: Settings) -> Database:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.db_url)
    db.migrate()
    missing = [t for t in REQUIRED_TABLES if not inspect(db.engine).has_table(t)]
    if missing:
        db.dispose()
        _fail(f"the database schema lacks {', '.join(missing)} after migrating "
              f"{shown_url(settings.db_url)}: this build has no migration for them")
    return db


def operator() -> Principal:
    """The local operator: owner rights, audited as `cli:<login>`."""
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = "unknown"
    return Principal("cli", 0, who, "owner", None, permissions_for("owner"))


@contextmanager
def _transaction(data_dir: Path | None, database_url: str | None) -> Iterator[Session]:
    db = _open(_settings(data_dir, database_url))
    try:
        with db.transaction() as session:
            yield session
    except DomainError as err:
        for e in err.errors:
            typer.echo(f"error: {e.path}: {e.message}", err=True)
        _fail(err.detail)
    finally:
        db.dispose()


def _password(password: str | None, from_stdin: bool) -> tuple[str, bool]:
    """(password, generated?)"""
    if password is not None and from_stdin:
        _fail("give --password or --password-stdin, not both", 2)
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            _fail("no password on standard input", 2)
        return line, False
    if password is not None:
        return password, False
    return secrets.token_urlsafe(18), True


def _scope(items: list[str] | None) -> dict[str, list[str]] | None:
    if not items:
        return None
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            _fail(f"--scope {item!r}: expected KEY=VALUE[,VALUE…]", 2)
        out.setdefault(key.strip(), []).extend(v.strip() for v in values.split(",")
                                               if v.strip())
    return out


def _role(role: str) -> str:
    if role not in ROLES:
        _fail(f"unknown role {role!r}: one of {', '.join(ROLES)}", 2)
    return role


# -- init / run ------------------------------------------------------------------------------

@app.command()
def init(data_dir: DataDir = None, database_url: DbUrl = None,
         name: Annotated[str, typer.Option("--name", help="The first owner's name.")] = "owner",
         password: PasswordOpt = None, password_stdin: PasswordStdin = False,
         host: Annotated[str, typer.Option(help="Where `run` will listen (for the "
                                                "printed URL).")] = "127.0.0.1",
         port: Annotated[int, typer.Option(help="Port (for the printed URL).")] = 8443) -> None:
    """Set up the data directory, database and first owner.

    Refused if an owner exists. Without --password/--password-stdin a password is generated
    and printed once."""
    from bulkhead.server.services import users as svc

    settings = _settings(data_dir, database_url)
    secret, generated = _password(password, password_stdin)
    with _transaction(data_dir, database_url) as session:
        if svc.owner_exists(session):
            _fail("an owner already exists; use `bulkhead server user add` to add users")
        svc.create_user(session, actor=operator(), name=name, password=secret, role="owner")
    base = f"http://{host}:{port}"
    typer.echo(f"Initialised Bulkhead in {settings.data_dir}")
    typer.echo(f"  database: {shown_url(settings.db_url)}")
    typer.echo(f"  owner:    {name}")
    if generated:
        typer.echo(f"  password: {secret}")
        typer.echo("  (shown only now: store it, or change it after logging in with "
                   "POST /api/v1/auth/password)")
    typer.echo("")
    where = f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else ""
    typer.echo("Start the server" + (" (with the same --database-url or "
                                      "BULKHEAD_DATABASE_URL):" if database_url else ":"))
    typer.echo(f"  bulkhead server run{where} --host {host} --port {port}")
    typer.echo("Log in (the token goes into `Authorization: Bearer <token>`):")
    typer.echo(f"  curl -s -X POST {base}/api/v1/auth/login -H 'content-type: application/json'"
               f" -d '{{\"name\": \"{name}\", \"password\": \"<password>\"}}'")
    typer.echo(f"API documentation: {base}/api/docs")


@app.command()
def run(data_dir: DataDir = None, database_url: DbUrl = None,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8443,
        ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
        ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
        log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info") -> None:
    """Serve the API (and `/healthz`, `/metrics`) with uvicorn."""
    import uvicorn

    from bulkhead.server.app import create_app

    if (ssl_certfile is None) != (ssl_keyfile is None):
        _fail("give both --ssl-certfile and --ssl-keyfile, or neither", 2)
    if ssl_certfile is None and host not in ("127.0.0.1", "::1", "localhost"):
        typer.echo("warning: serving plain HTTP on a non-loopback address: passwords and "
                   "tokens cross the network in clear text; use --ssl-certfile/--ssl-keyfile "
                   "or a TLS-terminating proxy", err=True)
    settings = _settings(data_dir, database_url)
    _open(settings).dispose()  # migrate, and refuse clearly if the schema is incomplete
    application = create_app(settings)
    uvicorn.run(application, host=host, port=port, log_level=log_level, server_header=False,
                ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)


# -- users -----------------------------------------------------------------------------------

@user_app.command("add")
def user_add(name: str, role: Annotated[str, typer.Option("--role", help=f"One of "
                                                          f"{', '.join(ROLES)}.")],
             password: PasswordOpt = None, password_stdin: PasswordStdin = False,
             scope: ScopeOpt = None, data_dir: DataDir = None,
             database_url: DbUrl = None) -> None:
    """Add a user.

    Without --password/--password-stdin a password is generated and printed once."""
    from bulkhead.server.services import users as svc

    secret, generated = _password(password, password_stdin)
    with _transaction(data_dir, database_url) as session:
        user = svc.create_user(session, actor=operator(), name=name, password=secret,
                               role=_role(role), scope=_scope(scope))
        typer.echo(f"added user {user.name} (id {user.id}, role {user.role})")
    if generated:
        typer.echo(f"password: {secret}  (shown only now)")


@user_app.command("list")
def user_list(as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
              data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """List users."""
    from bulkhead.server.services import users as svc

    with _transaction(data_dir, database_url) as session:
        rows = [{"id": u.id, "name": u.name, "role": u.role, "scope": u.scope,
                 "disabled": u.disabled, "locked": svc.is_locked(u),
                 "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None}
                for u in svc.list_users(session)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'ID':>4}  {'NAME':<24} {'ROLE':<14} {'STATE':<9} LAST LOGIN")
    for r in rows:
        state = "disabled" if r["disabled"] else "locked" if r["locked"] else "active"
        scope = f"  scope={json.dumps(r['scope'])}" if r["scope"] else ""
        typer.echo(f"{r['id']:>4}  {r['name']:<24} {r['role']:<14} {state:<9} "
                   f"{r['last_login_at'] or '-'}{scope}")


@user_app.command("set-role")
def user_set_role(name: str, role: str, scope: ScopeOpt = None, data_dir: DataDir = None,
                  database_url: DbUrl = None) -> None:
    """Change a user's role (and editor scope).

    The last enabled owner cannot be demoted."""
    from bulkhead.server.services import users as svc

    with _transaction(data_dir, database_url) as session:
        user = svc.find_user(session, name=name)
        svc.update_user(session, actor=operator(), user_id=user.id, role=_role(role),
                        scope=_scope(scope))
        typer.echo(f"{user.name}: role {user.role}")


@user_app.command("disable")
def user_disable(name: str, data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Disable a user (their sessions end, their API keys stop working)."""
    from bulkhead.server.services import users as svc

    with _transaction(data_dir, database_url) as session:
        user = svc.find_user(session, name=name)
        svc.update_user(session, actor=operator(), user_id=user.id, disabled=True)
        typer.echo(f"{user.name}: disabled")


@user_app.command("enable")
def user_enable(name: str, data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Enable a disabled user again."""
    from bulkhead.server.services import users as svc

    with _transaction(data_dir, database_url) as session:
        user = svc.find_user(session, name=name)
        svc.update_user(session, actor=operator(), user_id=user.id, disabled=False)
        typer.echo(f"{user.name}: enabled")


@user_app.command("set-password")
def user_set_password(name: str, password: PasswordOpt = None,
                      password_stdin: PasswordStdin = False, data_dir: DataDir = None,
                      database_url: DbUrl = None) -> None:
    """Reset a password (clears a lock-out, ends the user's sessions)."""
    from bulkhead.server.services import users as svc

    secret, generated = _password(password, password_stdin)
    with _transaction(data_dir, database_url) as session:
        user = svc.find_user(session, name=name)
        svc.update_user(session, actor=operator(), user_id=user.id, password=secret)
        typer.echo(f"{user.name}: password reset")
    if generated:
        typer.echo(f"password: {secret}  (shown only now)")


# -- API keys --------------------------------------------------------------------------------

@key_app.command("create")
def key_create(user: Annotated[str, typer.Option("--user", help="Owner of the key.")],
               name: Annotated[str, typer.Option("--name", help="What it is for.")] = "cli",
               role: Annotated[str | None, typer.Option(
                   "--role", help="A lower role than the user's.", show_default=False)] = None,
               expires_days: Annotated[float | None, typer.Option(
                   "--expires-days", help="Expire after this many days.",
                   show_default=False)] = None,
               scope: ScopeOpt = None, data_dir: DataDir = None,
               database_url: DbUrl = None) -> None:
    """Create an API key.

    The token is printed once, alone on standard output (for scripts)."""
    from bulkhead.server.services import users as svc

    expires = utcnow() + timedelta(days=expires_days) if expires_days else None
    with _transaction(data_dir, database_url) as session:
        owner = svc.find_user(session, name=user)
        key, token = svc.create_api_key(session, actor=operator(), user_id=owner.id,
                                        name=name, role=_role(role) if role else None,
                                        scope=_scope(scope), expires_at=expires)
        typer.echo(f"created API key {key.id} for {owner.name} (role {key.role}"
                   f"{', expires ' + key.expires_at.isoformat() if key.expires_at else ''})",
                   err=True)
    typer.echo(token)


@key_app.command("list")
def key_list(user: Annotated[str, typer.Option("--user", help="Whose keys.")],
             data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """List a user's API keys (never the tokens)."""
    from bulkhead.server.services import users as svc

    with _transaction(data_dir, database_url) as session:
        owner = svc.find_user(session, name=user)
        for k in svc.list_api_keys(session, user_id=owner.id):
            state = ("revoked" if k.revoked_at else
                     "expired" if k.expires_at and k.expires_at <= utcnow() else "active")
            typer.echo(f"{k.id:>4}  {k.name:<24} {k.role:<14} {state:<8} {k.hint}…")


@key_app.command("revoke")
def key_revoke(key_id: int, data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Revoke an API key by id."""
    from bulkhead.server.services import users as svc

    with _transaction(data_dir, database_url) as session:
        key = svc.revoke_api_key(session, actor=operator(), key_id=key_id)
        typer.echo(f"API key {key.id} revoked")
