#!/usr/bin/env bash
# The demo: install, generate the synthetic benchmark, convert it to shards, train with DeepSpeed
# on 2 processes, evaluate the best checkpoint on test and print the leaderboard.
#   bash scripts/demo.sh                   # text + image (all three units)
#   bash scripts/demo.sh --modality text   # ablation: text unit only
#   bash scripts/demo.sh --modality image  # ablation: vision unit only
# Extra arguments go to launch/train.py (e.g. --set train.epochs=4). Re-running continues or
# re-reports the same run (--resume auto).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODALITY=both
if [ "${1:-}" = "--modality" ]; then MODALITY="${2:?--modality needs both, text or image}"; shift 2; fi
case "$MODALITY" in
    both)  UNITS=() ;;
    text)  UNITS=(--set model.matcher.units.vision=false --set model.matcher.units.cross=false) ;;
    image) UNITS=(--set model.matcher.units.text=false --set model.matcher.units.cross=false) ;;
    *) echo "--modality must be both, text or image" >&2; exit 2 ;;
esac
source scripts/env.sh
RAW=data/synthetic/raw
SHARDS=data/synthetic/shards
if [ ! -f "$RAW/generation.json" ]; then
    python -m data_shards.synthetic --out "$RAW" --preset demo --quiet
fi
if [ ! -f "$SHARDS/manifest.json" ]; then
    python -m data_shards.convert --dataset synthetic --root "$RAW" --out "$SHARDS" --image-size 64
fi
NPROC=2
if python -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
    NPROC=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
fi
deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29533}" launch/train.py \
    --config launch/configs/synthetic.yaml --set "train.run_name=demo-$MODALITY" "${UNITS[@]}" --resume auto "$@"
