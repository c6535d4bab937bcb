#!/usr/bin/env bash
# The README's demo: synthetic chest X-rays -> TFRecords -> small CNN trained with Horovod on 1 and
# 2 ranks (Gloo; see README on MPI busy-polling on small CPUs) -> validation AUROC and a scaling
# table. Sizes are chosen to finish in a few minutes on 2 cores; override with the variables below.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo}
IMAGES=${IMAGES:-4000}
SIZE=${SIZE:-64}
EPOCHS=${EPOCHS:-15}
BATCH=${BATCH:-32}
PY=.venv/bin/python
start=$(date +%s)

$PY -m chexnet_hvd.synthetic --out "$OUT/raw" --images "$IMAGES" --size "$SIZE" --seed 0
$PY -m chexnet_hvd.records --csv "$OUT/raw/Data_Entry_2017.csv" --images "$OUT/raw/images" \
  --out "$OUT/records" --shard-size 256
for np in 1 2; do
  rm -rf "$OUT/runs/np$np"
  .venv/bin/horovodrun --gloo -np "$np" $PY -m chexnet_hvd.train --data "$OUT/records" \
    --run-dir "$OUT/runs/np$np" --model small_cnn --image-size "$SIZE" --batch-size "$BATCH" \
    --epochs "$EPOCHS" --lr 2e-3 --reference-batch 32 --verbose 2
done
echo
$PY - "$OUT/runs" <<'PY'
import sys
from chexnet_hvd.runlog import read_runlog
for np in (1, 2):
    last = [r for r in read_runlog(f"{sys.argv[1]}/np{np}") if r["event"] == "epoch"][-1]
    print(f"{np} rank(s): validation mean AUROC {last['val_mean_auroc']:.4f} after epoch {last['epoch']}")
PY
echo
$PY tools/scaling_report.py "$OUT/runs/np1" "$OUT/runs/np2" --csv "$OUT/scaling.csv" --plot "$OUT/scaling.png"
echo "demo finished in $(( $(date +%s) - start )) s; table: $OUT/scaling.csv, plot: $OUT/scaling.png"
