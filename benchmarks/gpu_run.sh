#!/usr/bin/env bash
# One device call: vprhub's GPU benchmarks next to the official code's anchors, same GPU, same run.
#
#   OUT=/some/folder bash benchmarks/gpu_run.sh          # preparation and the call: benchmarks/GPU_RUN.md
#
# Steps run in order of importance, each under its own timeout; a step that would not end
# within BUDGET_S seconds of the start (default 480) is skipped, so the call returns in time
# with what it has. Files written under OUT (at most 8 come back from a device call):
#   gpu.txt       GPU, driver, torch and transformers versions
#   vprhub.txt    vprhub's figures (benchmarks/extract_throughput.py, benchmarks/train_throughput.py)
#   anchor.jsonl  the official code's figures, one JSON line per measurement (benchmarks/anchors)
#   log.txt       standard error of every step (warnings, tracebacks, progress bars)
# Dry run on a CPU machine (vprhub installed in .venv, the wheels, for Python 3.12, left alone):
#   DEVICE=cpu BACKBONE=tiny LARGE_BACKBONE=tiny IMAGES=32 TRAIN_STEPS=1 INSTALL_WHEELS=no PYTHON=.venv/bin/python
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to an output folder}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-vitb14}
LARGE_BACKBONE=${LARGE_BACKBONE:-vitl14}
IMAGES=${IMAGES:-2048}
TRAIN_STEPS=${TRAIN_STEPS:-10}
BUDGET_S=${BUDGET_S:-480}
export PYTHONUNBUFFERED=1 REF_DIR=${REF_DIR:-$PWD/.ref}
LOG=$OUT/log.txt V=$OUT/vprhub.txt A=$OUT/anchor.jsonl

if [[ ${INSTALL_WHEELS:-yes} == yes ]] && compgen -G ".whl/*.whl" >/dev/null; then  # what the device lacks
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>>"$LOG" || { echo "installing .whl failed (see log.txt)" | tee -a "$V"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi

step() {  # step SECONDS FILE COMMAND...: COMMAND under a timeout, its standard output appended to FILE
  local limit=$1 file=$2
  shift 2
  if ((SECONDS + limit > BUDGET_S)); then
    echo "skipped (would pass the ${BUDGET_S} s budget): $*" | tee -a "$file"
    return
  fi
  echo "== [${SECONDS} s] $*" | tee -a "$file" >>"$LOG"
  timeout "$limit" "$@" >>"$file" 2>>"$LOG"
  echo "   exit $? at ${SECONDS} s" | tee -a "$file"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  nproc
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

EXTRACT=("$PY" benchmarks/extract_throughput.py --device "$DEVICE" --num-images "$IMAGES" --batch-size 64 --skip-build)
TRAIN=("$PY" benchmarks/train_throughput.py --steps "$TRAIN_STEPS" --mixed_precision bf16)
ANCHOR=("$PY" benchmarks/anchors/bench_official.py)
anchors=$([[ $DEVICE == cuda ]] && echo yes || echo no)  # the official ViT-B/L models are far too slow on a CPU

# SALAD first: the headline comparison (official fp16 2,043 images/s; goals 4,000 model-only, 3,000 from JPEGs).
step 240 "$V" "${EXTRACT[@]}" --backbone "$BACKBONE" --models salad --precisions float32 bfloat16 --compile
[[ $anchors == yes ]] && step 120 "$A" "${ANCHOR[@]}" salad
[[ $anchors == yes ]] && step 120 "$A" "${ANCHOR[@]}" hf_dinov2
step 90 "$V" "${EXTRACT[@]}" --backbone "$LARGE_BACKBONE" --models selavpr --precisions float32 bfloat16
[[ $anchors == yes ]] && step 60 "$A" "${ANCHOR[@]}" selavpr
step 90 "$V" "${EXTRACT[@]}" --backbone "$BACKBONE" --models cricavpr megaloc --precisions float32 bfloat16
[[ $anchors == yes ]] && step 60 "$A" "${ANCHOR[@]}" cricavpr
step 90 "$V" "${TRAIN[@]}" --recipe training/salad.yaml
step 90 "$V" "${TRAIN[@]}" --recipe training/cricavpr.yaml
[[ $anchors == yes ]] && step 60 "$A" "$PY" benchmarks/anchors/bench_train_official.py salad
[[ $anchors == yes ]] && step 60 "$A" "$PY" benchmarks/anchors/bench_train_official.py cricavpr
[[ $anchors == yes ]] && step 30 "$A" "${ANCHOR[@]}" matmul
echo "done at ${SECONDS} s" | tee -a "$V"
