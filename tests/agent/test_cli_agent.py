"""`bulkhead agent` start-up errors: a clear message naming the file, not a traceback."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from bulkhead.cli.agent import app


def test_corrupt_spool_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "state.json").write_text("{not json")
    res = CliRunner().invoke(app, ["run", "--server", "http://127.0.0.1:9",
                                   "--state-dir", str(tmp_path)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "spool" in res.output and "state.json" in res.output and "unreadable" in res.output
