#!/usr/bin/env bash
# The GPU checks in one command (needs a CUDA GPU):
#   1. the GPU-only tests (tests/unit/test_gpu.py tests/integration/test_gpu.py): bf16 autocast ranks vs fp32, NCCL with one process,
#      the faiss-gpu index (skipped, and said so, when the installed faiss has no GPU support);
#   2. bench.bench_eval at WikiMEL size (110,000 entities x 5,000 mentions), in bf16 and in fp32,
#      each writing its figures as JSON;
#   3. bench.bench_train: the paper-size training step (ViT-B/32 CLIP, batch 32), ours vs the published
#      step, in bf16 (with the eager-attention and torch.compile options) and in fp32, each writing its
#      figures as JSON.
# Usage: bash bench/gpu_check.sh [OUT_DIR]     (default: runs/gpu_check)
# Exits non-zero when a test or a benchmark fails; a benchmark below its target only prints NOT met.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" || exit 1
cd "$ROOT"
OUT_DIR="${1:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
python -c "
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f'gpu_check: no CUDA GPU visible (torch {torch.__version__}); run it on a GPU machine')
print(f'GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, '
      f'bf16 {torch.cuda.is_bf16_supported()}')
" || exit 1
status=0
echo "== GPU-only tests"
python -m pytest -q -rs tests/unit/test_gpu.py tests/integration/test_gpu.py || status=1
WIKIMEL=(--device cuda --entities 110000 --mentions 5000 --baseline-mentions 20 --baseline-entities 6000)
echo "== bench.bench_eval at WikiMEL size, bf16 autocast"
python -m bench.bench_eval "${WIKIMEL[@]}" --bf16 --json "$OUT_DIR/bench_eval_bf16.json" || status=1
echo "== bench.bench_eval at WikiMEL size, fp32"
python -m bench.bench_eval "${WIKIMEL[@]}" --json "$OUT_DIR/bench_eval_fp32.json" || status=1
echo "== bench.bench_train at paper size, bf16"
python -m bench.bench_train --device cuda --bf16 --iters 10 --variants published,ours,ours+eager,ours+compile-encoder,ours+compile \
    --json "$OUT_DIR/bench_train_bf16.json" || status=1
echo "== bench.bench_train at paper size, fp32"
python -m bench.bench_train --device cuda --iters 10 --json "$OUT_DIR/bench_train_fp32.json" || status=1
echo "figures: $OUT_DIR/bench_eval_bf16.json $OUT_DIR/bench_eval_fp32.json $OUT_DIR/bench_train_bf16.json" \
    "$OUT_DIR/bench_train_fp32.json"
exit $status
