"""Shared fixtures: a migrated database on SQLite and on a real PostgreSQL server, settings on a temp data dir,
small generated images, the CLI run in-process.

Where a test runs: routes and error bodies through the app in-process (tests/test_api_helpers.py: app_client);
a real uvicorn server (tests/live_server.py) only where the server process is the point (kill -9, concurrency
and overload under real HTTP, the page in Chromium, the compose topology). Tests whose outcome depends on SQL
(queries, filters, migrations, the job queue, durability) take `database_url` and run on both databases; the
others run once, on SQLite (migrated_url("sqlite", ...))."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.postgres import PostgresServer, find_bin_dir

REPO = Path(__file__).resolve().parents[1]
# In CI PostgreSQL must be there: a missing server is a failure, not a skip.
REQUIRE_POSTGRES = os.environ.get("CI") == "true" or os.environ.get("RETRIEVAL_TEST_REQUIRE_POSTGRES") == "1"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if find_bin_dir() is None:
        if REQUIRE_POSTGRES:
            pytest.fail("PostgreSQL binaries are required here (apt-get install postgresql)")
        pytest.skip("PostgreSQL binaries not installed")
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


DATABASES = ["sqlite", "postgresql"]


def migrated_url(kind: str, request: pytest.FixtureRequest, directory: Path) -> str:
    """An empty, migrated database of `kind`: SQLite under `directory`, or a fresh PostgreSQL database."""
    from app.db.migrate import upgrade

    if kind == "sqlite":
        url = f"sqlite:///{directory / 'retrieval.db'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database()
    upgrade(url)
    return url


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated database: SQLite in tmp_path, or a fresh database on the test PostgreSQL server."""
    return migrated_url(request.param, request, tmp_path)


def make_settings(data_dir: Path, database_url: str, **overrides):
    from app.settings import Settings

    # Lite0 unless a test names another: a third of the default three-trunk preset's compute, and the model is
    # not what these tests are about.
    values = {"data_dir": data_dir, "database_url": database_url, "num_workers": 0, "batch_size": 16,
              "embedder": "efficientnet_lite0"}
    values.update(overrides)
    return Settings(**values)


SETTINGS_ENV_FIELDS = ("data_dir", "database_url", "embedder", "num_workers", "batch_size", "device")


def settings_env(settings) -> dict[str, str]:
    """The same settings as RETRIEVAL_* environment variables, for subprocesses."""
    env = dict(os.environ)
    for name in SETTINGS_ENV_FIELDS:
        env[f"RETRIEVAL_{name.upper()}"] = str(getattr(settings, name))
    return env


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., CliResult]]:
    """`retrieval ARGS` run in this process: the console script's own main(), configured only through RETRIEVAL_*
    variables (`settings`' as settings_env() gives them to a subprocess, plus `env`), its exit status, stdout and
    stderr captured. A subprocess would spend seconds importing torch for each call; use one where the process
    itself is the point (a signal, a kill, a second process)."""
    from app import cli
    from app.settings import get_settings

    def run(settings, *args: str, **env: object) -> CliResult:
        for key in [k for k in os.environ if k.startswith("RETRIEVAL_")]:
            monkeypatch.delenv(key)
        for name in SETTINGS_ENV_FIELDS:
            monkeypatch.setenv(f"RETRIEVAL_{name.upper()}", str(getattr(settings, name)))
        for name, value in env.items():
            monkeypatch.setenv(f"RETRIEVAL_{name.upper()}", str(value))
        get_settings.cache_clear()  # read the variables above, as a new process would
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse errors exit(2)
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            get_settings.cache_clear()
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    yield run
    get_settings.cache_clear()


CLASS_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


def class_image(label: str, seed: int, size: int = 96) -> Image.Image:
    """A class-coloured image with a class-specific stripe pattern and per-image noise."""
    rng = np.random.default_rng(seed)
    base = np.array(CLASS_COLOURS[label], dtype=np.float32)
    img = np.tile(base, (size, size, 1))
    period = 8 + 6 * list(CLASS_COLOURS).index(label)
    stripes = (np.arange(size) // period) % 2
    img[:, stripes == 1] *= 0.55
    img += rng.normal(0, 18, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder corpus: <label>/<n>.jpg, 6 images for each of 4 classes."""
    root = tmp_path / "corpus"
    for label in CLASS_COLOURS:
        (root / label).mkdir(parents=True)
        for n in range(6):
            class_image(label, seed=hash((label, n)) % 10_000).save(root / label / f"{n}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-init timm checkpoint (resnet10t at 64 px, 32-d): fast enough for many index builds."""
    from models.checkpoint import save_checkpoint
    from models.embedder import EmbedderConfig, TimmEmbedder

    path = tmp_path_factory.mktemp("ckpt") / "tiny-resnet10t"
    config = EmbedderConfig(arch="timm", backbone="resnet10t", dim=32, image_size=64, resize_size=64,
                            pretrained="none")
    save_checkpoint(TimmEmbedder(config), path)
    return path
