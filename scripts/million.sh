#!/usr/bin/env bash
# The million preset end to end on one machine: generate it (1,000,000 entities, 32-pixel KB images),
# convert it, train the demo-size model with mined negatives against the whole KB on 2 processes, and
# evaluate dev and test two-stage with the KB sharded over the 2 processes (inside the training run).
#   bash scripts/million.sh                     # the million preset, in data/million and runs/million
#   ENTITIES=20000 bash scripts/million.sh      # the same at another KB size (data/million-20000, ...)
#   OUT_DIR=/scratch/runs bash scripts/million.sh   # run folders elsewhere (default: runs)
# Extra arguments go to launch/train.py. Each stage prints its wall time and the peak resident memory of
# its largest process (GNU time), and the lines are collected in data/million*/stages.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh
ENTITIES="${ENTITIES:-1000000}"
NAME=million
[ "$ENTITIES" = 1000000 ] || NAME="million-$ENTITIES"
WORK="data/$NAME"
OUT_DIR="${OUT_DIR:-runs}"
mkdir -p "$WORK"
STAGES="$WORK/stages.txt"

stage() {  # stage NAME COMMAND...: run it, then one line with its wall time and peak memory
    local name="$1"; shift
    local out="$WORK/.time-$name"
    /usr/bin/time -f "%e %M" -o "$out" "$@"
    read -r secs kib < "$out"
    printf '[million] %-9s %8.1f s, peak RSS of its largest process %8.0f MiB\n' "$name" "$secs" "$((kib / 1024))" \
        | tee -a "$STAGES"
}

if [ ! -f "$WORK/raw/generation.json" ]; then
    stage generate python -m data_shards.synthetic --out "$WORK/raw" --preset million --set "num_entities=$ENTITIES" --quiet
fi
if [ ! -f "$WORK/shards/manifest.json" ]; then
    stage convert python -m data_shards.convert --dataset synthetic --root "$WORK/raw" --out "$WORK/shards" --image-size 32
fi
NPROC=2
if python -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
    NPROC=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
fi
stage train deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29534}" launch/train.py \
    --config launch/configs/million.yaml --set "data.shards=$WORK/shards" --set "train.run_name=$NAME" --set "train.out_dir=$OUT_DIR" \
    --resume auto "$@"
python - "$OUT_DIR/$NAME" <<'PY' | tee -a "$STAGES"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
for r in rows:
    if "negatives/total_s" in r:
        print(f"[million] mining at step {r['step']}: " + ", ".join(
            f"{k.split('/')[1]} {r[k]:.1f}" for k in ("negatives/encode_kb_s", "negatives/index_s", "negatives/total_s")))
dev = [r for r in rows if "dev/H@1" in r]
if dev:
    d = dev[-1]
    print(f"[million] dev at step {d['step']}: H@1 {d['dev/H@1']:.2f} MRR {d['dev/MRR']:.2f} "
          f"recall@100 {d.get('dev/recall@100', float('nan')):.1f}")
res = json.loads((run / "results-test.json").read_text())
m, t = res["metrics"], res["timings"]
print(f"[million] test: H@1 {m['H@1']:.2f} MRR {m['MRR']:.2f} recall@100 {m.get('recall@100', float('nan')):.1f} "
      f"({int(m['mentions'])} mentions x {int(m['kb_size']):,} entities); seconds: "
      + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
      + "; peak RSS per rank (MiB): " + " / ".join(f"{b / 2**20:.0f}" for b in res["peak_rss_bytes_per_rank"]))
PY
