#!/usr/bin/env bash
# Every GPU figure in one run (about 5 minutes on one GPU): the inference benchmarks of
# `python -m bench` with --device cuda, then the prefix-training throughput
# (`python -m bench.train_prefix`). Results go to $OUT (default: bench-results/).
#   bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
# Offline machines: packages brought as wheels in .whl/ (pip install --no-index from there)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, transformers, open_clip; print('torch', torch.__version__, 'transformers', transformers.__version__, 'open_clip', open_clip.__version__)"
status=0
timeout 330 "$PYTHON" -m bench --device cuda --only caption,zeroshot,index,memory \
  --out "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.log" || status=1
timeout 240 "$PYTHON" -m bench.train_prefix --device cuda --out "$OUT/train_prefix_cuda.json" \
  2>&1 | tee "$OUT/train_prefix_cuda.log" || status=1
exit $status
