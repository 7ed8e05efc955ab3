"""RETRIEVAL_DATABASE_URL as users write it: `postgresql://` (what docs and most hosts show) and `postgres://`
(Heroku's spelling) use the installed psycopg2 driver, against the real test PostgreSQL server; an explicit
driver is kept as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings, normalize_database_url

PLAIN = "postgresql+psycopg2://u:p%40ss@db.example:5432/retrieval?sslmode=require"


@pytest.mark.parametrize(("written", "used"), [
    ("postgresql://u:p%40ss@db.example:5432/retrieval?sslmode=require", PLAIN),
    ("postgres://u:p%40ss@db.example:5432/retrieval?sslmode=require", PLAIN),
    ("POSTGRES://u:p%40ss@db.example:5432/retrieval?sslmode=require", PLAIN),
    (PLAIN, PLAIN),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),  # an explicit driver is the user's choice
    ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ("sqlite:////srv/retrieval.db", "sqlite:////srv/retrieval.db"),
    ("sqlite://", "sqlite://"),
])
def test_a_url_without_a_driver_gets_the_installed_one(written: str, used: str) -> None:
    assert normalize_database_url(written) == used
    assert Settings(database_url=written).resolved_database_url == used


def test_the_environment_variable_is_normalised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETRIEVAL_DATABASE_URL", "postgres://retrieval@db/retrieval")
    assert Settings().resolved_database_url == "postgresql+psycopg2://retrieval@db/retrieval"
    monkeypatch.delenv("RETRIEVAL_DATABASE_URL")
    assert Settings(data_dir=tmp_path).resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'retrieval.db'}"


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_db_upgrade_and_a_query_through_a_plain_url(scheme: str, postgres_server, tmp_path: Path, run_cli) -> None:
    """The user's commands with the URL as they wrote it: `retrieval db upgrade`, `retrieval db current`, and the
    service's engine (get_engine) answering over it."""
    from sqlalchemy import text

    from app.db.session import get_engine
    from tests.conftest import make_settings

    explicit = postgres_server.create_database()
    plain = explicit.replace("postgresql+psycopg2://", f"{scheme}://", 1)
    settings = make_settings(tmp_path / "data", explicit)
    upgraded = run_cli(settings, "db", "upgrade", database_url=plain)
    assert upgraded.returncode == 0, upgraded.stderr
    current = run_cli(settings, "db", "current", database_url=plain)
    assert current.returncode == 0 and current.stdout.strip(), current.stderr
    with get_engine(plain).connect() as conn:  # a caller that skipped the settings gets the same driver
        assert conn.execute(text("SELECT count(*) FROM images")).scalar_one() == 0
        assert conn.dialect.driver == "psycopg2"
