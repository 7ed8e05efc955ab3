"""bench/soak.py runs end to end for a few seconds against a real server (tiny embedder, 20 images): it prints
its capacity line and one row per interval with RSS and open handles, and the mix of searches, adds, deletes,
compaction and a hot swap gives no error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.test_api_helpers import save_tiny_embedder


def test_soak_runs_briefly_without_errors(tmp_path: Path) -> None:
    embedder = save_tiny_embedder(tmp_path / "tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")}
    env |= {"RETRIEVAL_EMBEDDER": str(embedder), "RETRIEVAL_RUNTIME": "torch", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "bench/soak.py", "--seconds", "4", "--interval", "2", "--corpus", "20", "--clients", "2",
         "--capacity-s", "2", "--swap-every", "2", "--compact-every", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines()
            if line.startswith("|") and line.split("|")[1].strip().isdigit()]
    assert "capacity" in result.stdout and len(rows) == 2, result.stdout
    assert all(line.split("|")[5].strip() == "0" for line in rows), result.stdout  # the errors column
    assert "errors in total: 0" in result.stdout
