"""The database a user points the service at: RETRIEVAL_DATABASE_URL as users write it (`postgresql://`, what docs
and most hosts show, and `postgres://`, Heroku's spelling, use the installed psycopg2 driver, against the real test
PostgreSQL server; an explicit driver is kept as written), and a service started before that database is set up
(`retrieval serve` before `retrieval db upgrade`): one log line saying what to do, and a /readyz that follows what
holds now."""

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


def _wait_for(client, check, timeout_s: float = 30.0) -> dict:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get("/readyz").json()
        if check(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_serve_before_db_upgrade_says_what_to_do_once(kind: str, request, tmp_path: Path, run_cli,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """`retrieval serve` on a fresh data dir (SQLite: no folder, no file; PostgreSQL: a database without tables):
    one warning naming `retrieval db upgrade` and the index commands, no traceback however many polls pass; after
    `retrieval db upgrade`, /readyz says the database is fine and that no index is active yet (not the stale
    error); after an index is published, ready."""
    import logging
    import time

    from app.db import migrate
    from app.deployment import NO_ACTIVE_INDEX
    from tests.conftest import make_settings
    from tests.test_api_helpers import app_client, save_tiny_embedder

    url = (f"sqlite:///{tmp_path / 'data' / 'retrieval.db'}" if kind == "sqlite"
           else request.getfixturevalue("postgres_server").create_database())
    settings = make_settings(tmp_path / "data", url, embedder=str(save_tiny_embedder(tmp_path / "tiny")))
    with caplog.at_level(logging.INFO), app_client(settings, swap_poll_s=0.1) as client:
        time.sleep(1.0)  # ten polls of the hot-swap watcher
        ready = client.get("/readyz")
        assert ready.status_code == 503
        said = ready.json()["detail"]["index"]
        assert "run `retrieval db upgrade`, then `retrieval index build SOURCE`" in said, said
        assert "is not set up: run `retrieval db upgrade`" in said, said
        database = ready.json()["detail"]["database"]  # not "ok" (SELECT 1 answered) nor "unreachable"
        assert database.endswith("is not set up: run `retrieval db upgrade`"), database
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("app")]
        assert [r.getMessage() for r in warnings] == [said], [r.getMessage() for r in warnings]
        assert not [r for r in caplog.records if r.exc_info], "no traceback"

        if kind == "sqlite":
            settings.data_dir.mkdir(parents=True)
        migrate.upgrade(url)
        body = _wait_for(client, lambda b: b["detail"]["index"] == NO_ACTIVE_INDEX)
        assert body["detail"] == body["detail"] | {"database": "ok", "index": NO_ACTIVE_INDEX}, body

        assert run_cli(settings, "index", "rebuild").returncode == 0  # an empty index, as the message says
        body = _wait_for(client, lambda b: b["status"] == "ready")
        assert body["status"] == "ready" and body["detail"]["vectors"] == 0, body
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


def test_a_database_that_does_not_answer_is_one_line_without_its_password(postgres_server) -> None:
    from app.db.session import database_problem, get_engine

    url = postgres_server.url("no_such_database").replace("postgres@", "postgres:s3cret@")
    with pytest.raises(Exception) as raised:
        get_engine(url).connect()
    problem, set_up = database_problem(raised.value, url)
    assert "does not answer" in problem and "no_such_database" in problem and not set_up
    assert "s3cret" not in problem and "\n" not in problem
