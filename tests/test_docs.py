"""The README stays true: every setting and every CLI command is documented, and CI runs the README's command."""

from __future__ import annotations

from pathlib import Path

from app.cli import build_parser
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    missing = [f"RETRIEVAL_{name.upper()}" for name in Settings.model_fields
               if f"`RETRIEVAL_{name.upper()}`" not in README]
    assert not missing, f"add these to README.md (python -m app.settings prints the table): {missing}"


def test_every_setting_has_a_description() -> None:
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


def test_every_cli_command_is_in_the_readme() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [name for name in commands if f"retrieval {name}" not in README]
    assert not missing, f"document these `retrieval` subcommands in README.md: {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README
