"""A worker train job on graded labels: `loss: {name: log_ratio, label_key: KEY}` learns from a number stored in
each image's metadata (set through the API), judged by Spearman of distances; real SQL (SQLite and PostgreSQL)."""

from __future__ import annotations

from app.db.models import ModelVersion
from app.db.session import session_scope
from app.settings import Settings
from tests.conftest import CLASS_COLOURS
from tests.test_api_helpers import app_client
from tests.test_worker import TRAIN, enqueue, job_row, worker_in_process, world  # noqa: F401 (fixture)

GRADE = {name: float(i) for i, name in enumerate(CLASS_COLOURS)}  # red 0, green 1, blue 2, yellow 3


def test_a_train_job_learns_a_metadata_number_with_the_log_ratio_loss(world: Settings) -> None:  # noqa: F811
    settings = world
    with app_client(settings) as client:
        images = client.get("/v1/images", params={"limit": 100}).json()["items"]
        for n, image in enumerate(images):
            grade = GRADE[image["label"]] + 0.01 * n  # distinct values, ordered by class
            assert client.patch(f"/v1/images/{image['id']}", json={"metadata": {"grade": grade}}).status_code == 200
        # One image says its grade in words: it is left out, not a failure.
        client.patch(f"/v1/images/{images[0]['id']}", json={"metadata": {"grade": "high"}})
    params = {**TRAIN, "loss": {"name": "log_ratio", "label_key": "grade", "neighbors": 3}, "eval_every": 4}
    job_id = enqueue(settings, "train", params)
    assert worker_in_process(settings, "graded", 240, once=True) == 1
    job = job_row(settings, job_id)
    assert job.status == "succeeded", job.error
    metrics = job.metrics
    assert {"spearman", "ndcg@10"} <= set(metrics["candidate"]) and "spearman" in metrics["baseline"]
    assert metrics["better"] == (metrics["candidate"]["spearman"] > metrics["baseline"]["spearman"])
    assert "spearman=" in job.message or metrics["promoted"]
    with session_scope(settings.resolved_database_url) as session:
        candidate = session.query(ModelVersion).filter_by(name=metrics["model_version"]).one()
        assert "spearman" in candidate.metrics


def test_a_graded_job_without_a_label_key_or_numbers_fails_saying_so(world: Settings) -> None:  # noqa: F811
    no_key = enqueue(world, "train", {**TRAIN, "loss": {"name": "log_ratio"}})
    missing = enqueue(world, "train", {**TRAIN, "loss": {"name": "log_ratio", "label_key": "nowhere"}})
    assert worker_in_process(world, "graded", 120, once=True) == 2  # once: until the queue is empty
    assert "label_key" in job_row(world, no_key).message
    failed = job_row(world, missing)
    assert failed.status == "failed" and "'nowhere'" in failed.message and "found 0" in failed.message
