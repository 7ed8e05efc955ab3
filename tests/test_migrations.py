"""Alembic migrations go up and down on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from sqlalchemy import inspect

from app.db import migrate
from app.db.session import get_engine

TABLES = {"images", "model_versions", "index_versions", "jobs", "api_keys"}


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    # The fixture has already upgraded to head.
    assert TABLES <= set(inspect(get_engine(database_url)).get_table_names())
    head = migrate.current(database_url)
    migrate.downgrade(database_url, "base")
    assert not TABLES & set(inspect(get_engine(database_url)).get_table_names())
    assert migrate.current(database_url) is None
    migrate.upgrade(database_url)
    assert migrate.current(database_url) == head
    assert TABLES <= set(inspect(get_engine(database_url)).get_table_names())


def test_cli_db_upgrade(tmp_path, monkeypatch, capsys) -> None:
    from app import cli
    from app.settings import get_settings

    monkeypatch.setenv("RETRIEVAL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("RETRIEVAL_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert cli.main(["db", "upgrade"]) == 0
    finally:
        get_settings.cache_clear()
    assert "database at revision" in capsys.readouterr().out
    assert (tmp_path / "data" / "retrieval.db").exists()
