#!/usr/bin/env bash
# One lent-GPU session: train the classifier's every layer from a carried crop bundle and measure
# training throughput. Run through the device tool from the repo root with .whl and .gpu carried.
# A cache larger than one 64 MiB carry is packed in parts (tools/cache_bundle.py pack --max-mib 60)
# and carried in consecutive calls on the warm machine; every .gpu/crops*.npz part is unpacked.
# Writes to $OUT: chest_densenet121.pt (fp16, the model of the schedule's last checkpoint: the
# candidate, since the best epoch by validation fold 0 would be judged by the fold that chose it),
# val_report.json (its assessment on fold 0), metrics.csv, progress.jsonl, train_bench.txt, train.log,
# and resume/: the run's last checkpoint in parts of at most CARRY_MIB (60) MiB with its SHA-256.
#
# A machine can be taken back in the middle of a call, and then returns nothing: so each call trains
# for MINUTES (4) at most, writes a checkpoint every CHECKPOINT_MINUTES (1), and brings the last one
# back in resume/. Carried into the next call as .gpu/resume/ (one part per call if need be: the warm
# machine keeps what earlier calls carried), it is joined, checked against its SHA-256 and resumed
# exactly (weights, optimiser, schedule, the sampler's place): a machine taken back loses one call.
#
# The schedule is the CPU long run's (docs/ADULT.md): every layer from INIT (.gpu/init.pt, the
# shipped model, when carried), cosine with a warm-up, validation on crossval's patient fold 0.
# Everything is an environment variable, so that CI runs this very script on the CPU with two
# steps (tests/test_gpu_script.py): DEVICE=cpu, EPOCHS=1, EPOCH_SIZE=2 … and a local cache.
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
PY="${PY:-python3}"
OUT="${OUT:?set OUT to the folder for the results}"
CACHE="${CACHE:-/tmp/cache}"
RUN="${RUN:-/tmp/run}"
if compgen -G ".whl/*.whl" >/dev/null; then  # the device machine: the package and its wheels, no network
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src"
fi
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/train_bench.txt"
else
  echo "device: $DEVICE" > "$OUT/train_bench.txt"
fi
if [ -z "${KEEP_CACHE:-}" ]; then
  rm -rf "$CACHE" "$RUN"
  "$PY" tools/cache_bundle.py unpack ${BUNDLE:-.gpu/crops*.npz} "$CACHE"
fi
timeout "${BENCH_SECONDS:-120}" "$PY" benchmarks/train_bench.py --device "$DEVICE" --batch-size ${BENCH_BATCHES:-16 64} \
  --size ${BENCH_SIZES:-224} --all-modes --steps "${BENCH_STEPS:-20}" --warmup "${BENCH_WARMUP:-5}" 2>&1 | tee -a "$OUT/train_bench.txt"
CARRIED="${CARRIED:-.gpu/resume}"  # the checkpoint the last call brought back, if carried
if compgen -G "$CARRIED/last.ckpt.part*" >/dev/null; then
  mkdir -p "$RUN/checkpoints"
  cat "$CARRIED"/last.ckpt.part* > "$RUN/checkpoints/last.ckpt"
  (cd "$RUN/checkpoints" && sha256sum --quiet -c -) < "$CARRIED/last.ckpt.sha256" \
    || { echo "the carried checkpoint's parts do not join into the file they were cut from"; exit 1; }
  echo "resuming from the carried checkpoint ($(du -h "$RUN/checkpoints/last.ckpt" | cut -f1))"
fi
INIT="${INIT:-$( [ -f .gpu/init.pt ] && echo .gpu/init.pt || echo random )}"
# TRAIN_ARGS: the schedule and sampling (defaults: the CPU long run's).
TRAIN_ARGS="${TRAIN_ARGS:---schedule cosine --warmup-epochs 1 --val-fold 0 --frozen-bn --select all --view-balance --source-balance 0 --adult-share 0.8 --lr 1e-4}"
# One set of options for the run and for its candidate below: --from-checkpoint refuses a run
# that validated on other films.
# shellcheck disable=SC2206  # TRAIN_ARGS is split into words on purpose
TRAIN=("$PY" -m pneumoscan.apps.cli train --cache "$CACHE" --init "$INIT" $TRAIN_ARGS --epochs "${EPOCHS:-40}"
       --epoch-size "${EPOCH_SIZE:-0}" --batch-size "${BATCH:-32}" --workers "${WORKERS:-8}"
       --checkpoint-minutes "${CHECKPOINT_MINUTES:-1}"
       --description "${DESCRIPTION:-dev data}")
status=0
timeout "${TRAIN_SECONDS:-330}" "${TRAIN[@]}" --out "$RUN" --max-minutes "${MINUTES:-4}" > "$OUT/train.log" 2>&1 || status=$?
tail -c 3000 "$OUT/train.log"
if [ -f "$RUN/checkpoints/last.ckpt" ]; then  # brought back first: whatever follows, the next call resumes here
  mkdir -p "$OUT/resume"
  (cd "$RUN/checkpoints" && sha256sum last.ckpt) > "$OUT/resume/last.ckpt.sha256"
  split -b "${CARRY_MIB:-60}m" -d "$RUN/checkpoints/last.ckpt" "$OUT/resume/last.ckpt.part"
fi
[ "$status" -eq 0 ] || { echo "training failed (exit $status)"; exit "$status"; }
# The candidate: the schedule's last checkpoint, written as a model file without more training.
timeout 300 "${TRAIN[@]}" --out "$RUN/last" --from-checkpoint "$RUN/checkpoints/last.ckpt" >> "$OUT/train.log" 2>&1 \
  || { tail -c 2000 "$OUT/train.log"; echo "the model of the last checkpoint failed"; exit 1; }
cp "$RUN/last/val_report.json" "$RUN/progress.jsonl" "$OUT/"
cp "$RUN/logs/version_0/metrics.csv" "$OUT/"
RUN="$RUN/last" "$PY" - <<'PY'
import os
from pneumoscan.classify import Classifier
c = Classifier.load(os.environ["RUN"] + "/model.pt")
meta = c.save(os.environ["OUT"] + "/chest_densenet121.pt", half=True)
print("saved fp16 model", meta["weights_sha256"], "epochs", meta["epochs_trained"], "from", meta["from_checkpoint"])
print("validation (selection metric)", meta["selection"])
PY
