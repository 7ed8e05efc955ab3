"""What a new user sees from `retrieval` when a command cannot do what was asked: one line on stderr that says
what to do, exit 1 (2 for a bad option), never a traceback; and a line on stdout when a command did its work."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest

from tests.conftest import make_settings, migrated_url, settings_env
from tests.test_api_helpers import build_served_corpus
from tests.test_indexing import make_corpus

NOT_SET_UP = "is not set up: run `retrieval db upgrade` first"
# Read commands: none of them migrates the database itself (index build, demo and keys do).
READ_COMMANDS = (["index", "verify"], ["index", "rebuild", "--no-progress"], ["index", "compact"], ["jobs", "list"],
                 ["jobs", "submit", "train"], ["jobs", "show", "1"], ["jobs", "logs", "1"], ["jobs", "cancel", "1"])


def one_line(text: str) -> str:
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    return text.strip()


@pytest.fixture
def queue(tmp_path: Path, request: pytest.FixtureRequest):
    """Settings over a migrated, empty SQLite database: a job queue with nothing in it."""
    return make_settings(tmp_path / "data", migrated_url("sqlite", request, tmp_path))


def test_a_fresh_data_dir_says_to_run_db_upgrade(tmp_path: Path, run_cli) -> None:
    from app.db import migrate

    data = tmp_path / "data"  # RETRIEVAL_DATA_DIR of a user who has run nothing yet: not even the folder
    settings = make_settings(data, f"sqlite:///{data / 'retrieval.db'}")
    for args in READ_COMMANDS:
        result = run_cli(settings, *args)
        assert result.returncode == 1, (args, result)
        assert one_line(result.stderr) == f"retrieval: the database at sqlite:///{data}/retrieval.db {NOT_SET_UP}"
    data.mkdir()  # the folder there: SQLite opens an empty file, whose tables are missing
    for args in READ_COMMANDS:
        result = run_cli(settings, *args)
        assert result.returncode == 1 and NOT_SET_UP in one_line(result.stderr), (args, result)
    assert migrate.current(settings.resolved_database_url) is None  # nothing migrated behind the user's back
    assert run_cli(settings, "db", "upgrade").returncode == 0
    listed = run_cli(settings, "jobs", "list")
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "", "")


def test_a_database_behind_the_code_names_its_revision(tmp_path: Path, run_cli) -> None:
    from app.db import migrate

    url = f"sqlite:///{tmp_path / 'retrieval.db'}"
    migrate.upgrade(url, "0001")  # before the leases table compaction takes its lease in
    result = run_cli(make_settings(tmp_path / "data", url), "index", "compact")
    assert result.returncode == 1
    assert one_line(result.stderr).endswith(
        "is at revision 0001, not this version's 0002: run `retrieval db upgrade` first")


def test_an_unmigrated_postgresql_database_says_so_without_its_password(postgres_server, tmp_path: Path,
                                                                        run_cli) -> None:
    url = postgres_server.create_database().replace("postgres@", "postgres:s3cret@")  # trust auth ignores it
    result = run_cli(make_settings(tmp_path / "data", url), "jobs", "list")
    line = one_line(result.stderr)
    assert result.returncode == 1 and NOT_SET_UP in line and "postgres:***@" in line and "s3cret" not in line


def test_demo_options_and_sources_are_checked_before_anything_is_exported(
        tmp_path: Path, run_cli, tiny_embedder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import demo

    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'retrieval.db'}", embedder=str(tiny_embedder))
    for per_class in ("-3", "0"):  # -3 was a [:-3] slice: every image but the last 3 of each class
        result = run_cli(settings, "demo", "--per-class", per_class, "--no-serve")
        assert result.returncode == 2 and f"--per-class: needs an integer >= 1; got {per_class}" in result.stderr
    assert not (settings.data_dir / "demo").exists()
    missing = tmp_path / "nonexistent"
    result = run_cli(settings, "demo", "--no-serve", demo_source=missing)
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"retrieval demo: RETRIEVAL_DEMO_SOURCE={missing} does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(settings, "demo", "--no-serve", demo_source=empty)
    assert result.returncode == 1 and "Traceback" not in result.stderr  # under the register bar, one line:
    assert result.stderr.splitlines()[-1].startswith(f"retrieval demo: no image file under {empty}")
    # Fashion-MNIST not installed (Debian's dataset-fashion-mnist): the line says what to install.
    monkeypatch.setattr(demo, "export_fashion_mnist", functools.partial(demo.export_fashion_mnist,
                                                                         source_dir=tmp_path / "no-fashion-mnist"))
    result = run_cli(settings, "demo", "--no-serve")
    assert result.returncode == 1 and "install Debian's dataset-fashion-mnist" in one_line(result.stderr)


def test_a_demo_run_again_with_fewer_per_class_serves_that_many(tmp_path: Path, run_cli, tiny_embedder: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`retrieval demo --per-class 3` after a run with 4 built all 4 per class (the export folder kept them)."""
    import gzip

    import numpy as np

    from app import demo
    from app.db.session import session_scope
    from app.indexing import verify_index
    from app.registry import active_index

    source = tmp_path / "fashion-mnist"
    source.mkdir()
    labels = np.repeat(np.arange(10, dtype=np.uint8), 5)  # 5 of each of the 10 classes
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    for split in ("train", "t10k"):  # IDX: a zero, the type (8: ubyte), the dimension count, each size, the bytes
        for name, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
            (source / f"{split}-{name}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    monkeypatch.setattr(demo, "export_fashion_mnist", functools.partial(demo.export_fashion_mnist, source_dir=source))
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'retrieval.db'}", embedder=str(tiny_embedder))
    for per_class in (4, 3):
        result = run_cli(settings, "demo", "--per-class", str(per_class), "--no-serve")
        assert result.returncode == 0, result.stderr
        assert verify_index(settings).ok
        with session_scope(settings.resolved_database_url) as session:
            assert active_index(session).ntotal == 10 * per_class, result.stdout


def test_the_submit_help_example_is_a_job_the_queue_takes(queue, run_cli) -> None:
    shown = run_cli(queue, "jobs", "submit", "--help")
    assert shown.returncode == 0
    example = re.search(r"e\.g\. ((?:--set \S+ ?)+)", " ".join(shown.stdout.split()))
    assert example, shown.stdout
    submitted = run_cli(queue, "jobs", "submit", "train", *example.group(1).split())
    assert (submitted.returncode, submitted.stdout, submitted.stderr) == (0, "job 1 queued\n", "")
    params = json.loads(run_cli(queue, "jobs", "show", "1").stdout)["params"]
    assert params == {"steps": 200, "lr": 0.0003}
    assert "reembed: factory, model_version" in " ".join(shown.stdout.split())  # what each kind takes


def test_job_options_are_refused_as_the_api_refuses_them(queue, run_cli) -> None:
    for args, said in ((["submit", "train", "--max-attempts", "0"], "--max-attempts: a job gets 1-20 runs; got 0"),
                       (["submit", "train", "--max-attempts", "21"], "a job gets 1-20 runs; got 21"),
                       (["list", "--limit", "-1"], "--limit: needs an integer >= 1; got -1"),
                       (["list", "--limit", "0"], "--limit: needs an integer >= 1; got 0"),
                       (["logs", "1", "--tail", "0"], "--tail: needs an integer >= 1; got 0")):
        result = run_cli(queue, "jobs", *args)
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, args
    assert run_cli(queue, "jobs", "list").stdout == ""  # nothing was queued
    assert run_cli(queue, "jobs", "submit", "train", "--max-attempts", "20").returncode == 0
    assert run_cli(queue, "jobs", "submit", "rebuild_index").returncode == 0
    newest = run_cli(queue, "jobs", "list", "--limit", "1").stdout.splitlines()
    assert len(newest) == 1 and newest[0].split()[:2] == ["2", "rebuild_index"]
    assert "attempts 0/20" in run_cli(queue, "jobs", "list", "--kind", "train").stdout


def test_a_job_that_does_not_exist_is_one_line(queue, run_cli) -> None:
    for action in ("show", "logs", "cancel", "follow"):
        result = run_cli(queue, "jobs", action, "99")
        assert (result.returncode, result.stdout) == (1, ""), action
        assert one_line(result.stderr) == "retrieval: job 99 does not exist", action


def test_cancel_and_follow_say_what_became_of_the_job(queue, run_cli) -> None:
    from app import jobs

    url = queue.resolved_database_url
    assert run_cli(queue, "jobs", "submit", "rebuild_index").returncode == 0
    result = run_cli(queue, "jobs", "follow", "1", "--timeout", "0")
    assert result.returncode == 1 and "1 rebuild_index queued" in " ".join(result.stdout.split())
    assert one_line(result.stderr).startswith("retrieval: job 1 still queued after 0.0s; only the watching stopped")
    job = jobs.claim(url, "w1")
    assert job is not None and jobs.finish(url, job.id, "w1", "succeeded", message="done")
    result = run_cli(queue, "jobs", "cancel", "1")  # the API answers 409
    assert result.returncode == 1 and one_line(result.stderr) == "retrieval: job 1 already succeeded"
    assert run_cli(queue, "jobs", "logs", "1").returncode == 0  # a job that exists but wrote no log: no lines


def test_rebuild_and_merge_say_what_they_published(tmp_path: Path, request: pytest.FixtureRequest, run_cli) -> None:
    settings = build_served_corpus(tmp_path, migrated_url("sqlite", request, tmp_path), per_class=1)
    rebuilt = run_cli(settings, "index", "rebuild", "--no-progress")
    assert rebuilt.returncode == 0
    assert re.search(r"^published index index-\S+ \(Flat, 4 vectors\)$", rebuilt.stdout, re.M), rebuilt.stdout
    merged = run_cli(settings, "index", "merge", "--no-progress")
    assert merged.returncode == 0 and re.search(r"^index index-\S+ is up to date: nothing to publish$",
                                                merged.stdout, re.M), merged.stdout


def test_verify_says_which_command_mends_the_index(tmp_path: Path, request: pytest.FixtureRequest, run_cli) -> None:
    url = migrated_url("sqlite", request, tmp_path)
    result = run_cli(make_settings(tmp_path / "empty", url), "index", "verify")
    assert result.returncode == 1
    assert "no active index version yet: `retrieval index build FOLDER` builds one" in one_line(result.stderr)
    settings = build_served_corpus(tmp_path, url, per_class=1)
    for version in settings.indexes_dir.iterdir():
        if version.is_dir():
            (version / "index.faiss").unlink()
    result = run_cli(settings, "index", "verify")
    assert result.returncode == 1 and "index files of" in result.stderr
    assert "`retrieval index rebuild`" in result.stderr.splitlines()[-1]
    assert run_cli(settings, "index", "rebuild", "--no-progress").returncode == 0  # what it said to run
    assert run_cli(settings, "index", "verify").returncode == 0


def test_demo_builds_a_folder_of_the_users_own(tmp_path: Path, request: pytest.FixtureRequest,
                                                       run_cli, tiny_embedder: Path) -> None:
    """The demo on a folder of the user's own (RETRIEVAL_DEMO_SOURCE), built and not served."""
    settings = make_settings(tmp_path / "data", migrated_url("sqlite", request, tmp_path), embedder=str(tiny_embedder))
    result = run_cli(settings, "demo", "--no-serve", demo_source=make_corpus(tmp_path / "photos", per_class=1))
    assert result.returncode == 0 and "(Flat, 4 vectors)" in result.stdout, result.stderr


def test_a_real_process_says_only_its_one_line(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """In its own process, as the user runs it: FAISS's loader lines (which of its builds it tried) are not said
    around the one line unless -v asks for them."""
    import subprocess
    import sys

    settings = make_settings(tmp_path / "data", migrated_url("sqlite", request, tmp_path))
    command = [sys.executable, "-m", "app.cli", "index", "verify"]
    result = subprocess.run(command, env=settings_env(settings), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and one_line(result.stderr).startswith("retrieval index verify: no active index")


def test_a_database_server_that_does_not_answer_is_one_line(tmp_path: Path, run_cli) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = make_settings(tmp_path / "data", f"postgresql://retrieval:s3cret@127.0.0.1:{port}/retrieval")
    result = run_cli(settings, "jobs", "list")
    line = one_line(result.stderr)
    assert result.returncode == 1 and "does not answer" in line and "retrieval:***@" in line and "s3cret" not in line
