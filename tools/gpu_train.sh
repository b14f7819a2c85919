#!/usr/bin/env bash
# One lent-GPU session: train the shipped classifier from a carried crop bundle and measure
# training throughput. Run through the device tool from the repo root with .whl and .gpu carried.
# A cache larger than one 64 MiB carry is packed in parts (tools/cache_bundle.py pack --max-mib 60)
# and carried in consecutive calls on the warm machine; every .gpu/crops*.npz part is unpacked.
# Writes to $OUT: chest_densenet121.pt (fp16), val_report.json, metrics.csv, train_bench.txt, train.log
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/train_bench.txt"
rm -rf /tmp/cache /tmp/run; "${PY:-python3}" tools/cache_bundle.py unpack ${BUNDLE:-.gpu/crops*.npz} /tmp/cache || exit 1
timeout 120 "${PY:-python3}" benchmarks/train_bench.py --device cuda --batch-size 16 64 --all-modes --steps 20 --warmup 5 \
  2>&1 | tee -a "$OUT/train_bench.txt"
# INIT: random, or a carried classifier file (.gpu/init.pt: every layer fine-tuned from it);
# TRAIN_ARGS: further train options (e.g. "--select all --source-balance 1.0 --adult-share 0.8").
timeout 420 "${PY:-python3}" -m pneumoscan.apps.cli train --cache /tmp/cache --out /tmp/run --init "${INIT:-random}" ${TRAIN_ARGS:-} \
  --epochs "${EPOCHS:-40}" --batch-size 32 --workers 8 --max-minutes "${MINUTES:-5}" \
  --description "${DESCRIPTION:-dev data}" > "$OUT/train.log" 2>&1
tail -c 3000 "$OUT/train.log"
cp /tmp/run/val_report.json "$OUT/" 2>/dev/null
cp /tmp/run/logs/version_0/metrics.csv "$OUT/" 2>/dev/null
"${PY:-python3}" - <<'PY'
import os
from pneumoscan.classify import Classifier
c = Classifier.load("/tmp/run/model.pt")
meta = c.save(os.environ["OUT"] + "/chest_densenet121.pt", half=True)
print("saved fp16 model", meta["weights_sha256"], "epochs", meta["epochs_trained"], "best", meta["best_epoch"])
print("val", meta["validation"]["auc"])
PY
