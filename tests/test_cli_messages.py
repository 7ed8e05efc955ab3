"""What a new user sees from `retrieval` when a command cannot do what was asked: one line on stderr that says
what to do, exit 1 (2 for a bad option), never a traceback; and a line on stdout when a command did its work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import make_settings, migrated_url


def one_line(text: str) -> str:
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    return text.strip()


@pytest.fixture
def queue(tmp_path: Path, request: pytest.FixtureRequest):
    """Settings over a migrated, empty SQLite database: a job queue with nothing in it."""
    return make_settings(tmp_path / "data", migrated_url("sqlite", request, tmp_path))


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
