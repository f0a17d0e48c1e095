#!/usr/bin/env bash
# One device call: vprhub's GPU benchmarks next to the official code's anchors, same GPU, same run.
#
#   OUT=/some/folder bash benchmarks/gpu_run.sh          # preparation and the call: benchmarks/GPU_RUN.md
#
# Steps run in order of importance, each under its own timeout. A step starts only while at least
# its usual duration is left of BUDGET_S (default 470 s from the start), and its timeout is cut to
# what is left, so the script returns in about BUDGET_S + 20 s even if a step hangs; a failing step
# does not stop the others. Files written under OUT (at most 8 come back from a device call):
#   gpu.txt       GPU, driver, CPU count, Python, torch / transformers / faiss / pml versions
#   vprhub.txt    vprhub's figures (benchmarks/extract_throughput.py, benchmarks/train_throughput.py)
#   anchor.jsonl  the official code's figures, one JSON line per measurement (benchmarks/anchors)
#   summary.txt   the figures set against the goals of issue 12 (also printed at the end)
#   log.txt       every step's command, standard error (warnings, tracebacks), exit status and time
# STEPS='train_throughput|bench_ceiling' runs only the steps whose command line matches (a rerun).
# Dry run on a CPU machine (2 cores: 4 to 6 minutes; the anchors run with --small, the official
# training and ceiling scripts need CUDA and are skipped):
#   DEVICE=cpu PYTHON=.venv/bin/python OUT=/tmp/gpu-dry bash benchmarks/gpu_run.sh
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:?set OUT to an output folder}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
if [[ $DEVICE == cuda ]]; then
  BACKBONE=${BACKBONE:-vitb14} LARGE_BACKBONE=${LARGE_BACKBONE:-vitl14}
  IMAGES=${IMAGES:-2048} HEAD_IMAGES=${HEAD_IMAGES:-4096} E2E_IMAGES=${E2E_IMAGES:-16384} BATCH=${BATCH:-64}
  TRAIN_STEPS=${TRAIN_STEPS:-10} BUDGET_S=${BUDGET_S:-470} SCALE=${SCALE:-1} SITE=${SITE:-/tmp/site}
  TRAIN_EXTRA=() ANCHOR_FLAGS=() CUDA_ANCHORS=yes
else  # dry run: tiny models, few images, reduced training batches, small anchors
  BACKBONE=${BACKBONE:-tiny} LARGE_BACKBONE=${LARGE_BACKBONE:-tiny}
  IMAGES=${IMAGES:-32} HEAD_IMAGES=${HEAD_IMAGES:-32} E2E_IMAGES=${E2E_IMAGES:-64} BATCH=${BATCH:-8}
  TRAIN_STEPS=${TRAIN_STEPS:-1} BUDGET_S=${BUDGET_S:-1800} SCALE=${SCALE:-4} SITE=${SITE:-/tmp/gpu-dry-site}
  TRAIN_EXTRA=(--backbone facebook/dinov2-small --image_size 126 126 --cpu_places 2 --warmup 1 --data_batches 1)
  ANCHOR_FLAGS=(--small) CUDA_ANCHORS=no
fi
# The JPEGs of extract_throughput.py: written once (in parallel) by its first run, reused by the others.
JPEGS=${JPEGS:-${TMPDIR:-/tmp}/vprhub-bench-jpegs}
export PYTHONUNBUFFERED=1 REF_DIR=${REF_DIR:-$PWD/.ref} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
G=$OUT/gpu.txt V=$OUT/vprhub.txt A=$OUT/anchor.jsonl S=$OUT/summary.txt LOG=$OUT/log.txt
: >"$V"; : >"$A"; : >"$LOG"

# What the device lacks (benchmarks/GPU_RUN.md): transformers >= 5.20 for vprhub, faiss (imported by
# vprhub.training) and pytorch-metric-learning (vprhub's loss and the official training anchor).
if [[ ${INSTALL_WHEELS:-yes} == yes ]]; then
  wheels=()
  for w in transformers faiss_cpu pytorch_metric_learning; do
    f=$(compgen -G ".whl/$w-*.whl" | head -1) && wheels+=("$f") || echo "missing wheel .whl/$w-*.whl" | tee -a "$LOG"
  done
  if ((${#wheels[@]})) && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1; then
    echo "installed into $SITE: ${wheels[*]}" | tee -a "$LOG"
  else
    echo "installing the wheels failed (log.txt); going on: the anchors need none of them" | tee -a "$LOG"
  fi
  export PYTHONPATH=$SITE:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi

# DataLoader workers hand batches over through /dev/shm (the training data pipeline holds about
# 3 GB at once); a small one fails with 'No space left on device' or a bus error. If it cannot be
# enlarged, fewer workers: extract_throughput holds up to 4 batches of 20 MB per worker (SALAD,
# batch 64), the SALAD recipe's pipeline 2 batches of 145 MB per worker (0 workers: no /dev/shm).
EXTRACT_WORKERS=() TRAIN_SALAD_WORKERS=() TRAIN_CRICAVPR_WORKERS=()
shm_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $2 }')
if [[ $DEVICE == cuda && -n $shm_kib ]] && ((shm_kib < 16 * 1024 * 1024)); then
  if mount -o remount,size=32g /dev/shm >>"$LOG" 2>&1; then
    echo "remounted /dev/shm at 32 GiB" | tee -a "$LOG"
  else
    shm_mib=$(($(df -Pk /dev/shm | awk 'NR == 2 { print $4 }') / 1024))
    extract_workers=$((shm_mib / 100 < $(nproc) ? shm_mib / 100 : $(nproc))) train_workers=$((shm_mib / 300))
    EXTRACT_WORKERS=(--num-workers "$extract_workers")
    ((train_workers < 10)) && TRAIN_SALAD_WORKERS=(--num_workers "$train_workers")
    ((train_workers < 4)) && TRAIN_CRICAVPR_WORKERS=(--num_workers "$train_workers")
    echo "FEWER WORKERS: /dev/shm could not be enlarged ($shm_mib MiB free): extract_throughput $extract_workers" \
      "decoding workers, training data pipeline at most $train_workers (recipes: 10 and 4)" | tee -a "$LOG" "$V"
  fi
fi

{
  date -u
  df -h /dev/shm /tmp 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  echo "cpus: $(nproc)"
  "$PY" - <<'EOF'
import sys, importlib
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "accelerate", "huggingface_hub", "numpy", "faiss", "pytorch_metric_learning",
             "timm", "torchvision", "triton", "vprhub"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as e:
        print(f"{name}: {e!r}"[:300])
import torch
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} >"$G" 2>&1
cat "$G"

step() {  # step MIN LIMIT FILE COMMAND...: run it if MIN*SCALE s are left, under min(LIMIT*SCALE, left) s
  local min=$(($1 * SCALE)) limit=$(($2 * SCALE)) file=$3 left=$((BUDGET_S - SECONDS)) start=$SECONDS rc
  shift 3
  [[ -n ${STEPS:-} && ! "$*" =~ $STEPS ]] && return  # STEPS='regex': only the steps whose command matches
  if ((left < min)); then
    echo "-- skipped at ${SECONDS} s (${left} s left, needs ${min}): ${*:2}" | tee -a "$file" "$LOG"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== [${SECONDS} s, limit ${limit} s] ${*:2}" | tee -a "$file" "$LOG"
  timeout -k 15 "$limit" "$@" >>"$file" 2>>"$LOG"
  rc=$?
  echo "   exit $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)') after $((SECONDS - start)) s" |
    tee -a "$file" "$LOG"
}

EXTRACT=("$PY" benchmarks/extract_throughput.py --device "$DEVICE" --batch-size "$BATCH" --skip-build
  --jpeg-dir "$JPEGS" --num-jpegs "$HEAD_IMAGES" "${EXTRACT_WORKERS[@]}")
TRAIN=("$PY" benchmarks/train_throughput.py --steps "$TRAIN_STEPS" --mixed_precision bf16 "${TRAIN_EXTRA[@]}")
ANCHOR=("$PY" benchmarks/anchors/bench_official.py)
ANCHOR_TRAIN=("$PY" benchmarks/anchors/bench_train_official.py)

# 1. SALAD bf16, eager and compiled (one compilation, at batch 64: the identity probe runs uncompiled).
#    Each variant's line is printed when it is done, so a timeout in the compiled one keeps the eager one.
#    End to end: one run of HEAD_IMAGES files, then one of E2E_IMAGES for the steady rate.
step 60 210 "$V" "${EXTRACT[@]}" --backbone "$BACKBONE" --models salad --precisions bfloat16 --compile \
  --num-images "$HEAD_IMAGES" --e2e-images "$E2E_IMAGES"
step 20 90 "$A" "${ANCHOR[@]}" salad "${ANCHOR_FLAGS[@]}"
# 2. Training steps at the recipes' batches, bf16 autocast (two goals for about a minute).
step 30 120 "$V" "${TRAIN[@]}" --recipe training/salad.yaml "${TRAIN_SALAD_WORKERS[@]}"
step 30 120 "$V" "${TRAIN[@]}" --recipe training/cricavpr.yaml "${TRAIN_CRICAVPR_WORKERS[@]}"
# 3. SelaVPR ViT-L/14 (global + local features), bf16 then fp32.
step 45 150 "$V" "${EXTRACT[@]}" --backbone "$LARGE_BACKBONE" --models selavpr --precisions bfloat16 float32 \
  --num-images "$IMAGES"
step 20 90 "$A" "${ANCHOR[@]}" selavpr "${ANCHOR_FLAGS[@]}"
# 4. CricaVPR and MegaLoc ViT-B/14, bf16 then fp32.
step 45 150 "$V" "${EXTRACT[@]}" --backbone "$BACKBONE" --models cricavpr megaloc --precisions bfloat16 float32 \
  --num-images "$IMAGES"
step 20 90 "$A" "${ANCHOR[@]}" cricavpr "${ANCHOR_FLAGS[@]}"
# 5. The official training recipes (SALAD fp16-mixed 240 images, CricaVPR fp32 288 images).
if [[ $CUDA_ANCHORS == yes ]]; then
  step 30 90 "$A" "${ANCHOR_TRAIN[@]}" salad
  step 30 90 "$A" "${ANCHOR_TRAIN[@]}" cricavpr
fi
# 6. Lower priority: SALAD fp32, the backbone alone, small anchors, compiled training, the ceiling.
step 30 90 "$V" "${EXTRACT[@]}" --backbone "$BACKBONE" --models salad --precisions float32 --num-images "$IMAGES"
step 20 90 "$A" "${ANCHOR[@]}" hf_dinov2 "${ANCHOR_FLAGS[@]}"
for w in matmul salad_agg selavpr_rerank; do step 10 45 "$A" "${ANCHOR[@]}" "$w" "${ANCHOR_FLAGS[@]}"; done
[[ $DEVICE == cuda ]] && step 90 180 "$V" "${TRAIN[@]}" --recipe training/salad.yaml --torch_compile true \
  "${TRAIN_SALAD_WORKERS[@]}"
[[ $CUDA_ANCHORS == yes ]] && step 90 180 "$A" "$PY" benchmarks/anchors/bench_ceiling.py
echo "steps done at ${SECONDS} s" | tee -a "$LOG"

# The figures against the goals (issue 12), from vprhub.txt and anchor.jsonl.
timeout 30 "$PY" - "$V" "$A" >"$S" 2>>"$LOG" <<'EOF'
import json, re, sys
vprhub, anchors = open(sys.argv[1]).read().splitlines(), open(sys.argv[2]).read().splitlines()
goals = {"salad": 4000, "selavpr": 2500, "cricavpr": 2 * 2369}
official = {}  # this run's official fp16 forward images/s per model
for line in anchors:
    try:
        d = json.loads(line)
    except ValueError:
        continue
    for key, label in (("salad", "official SALAD ViT-B"), ("selavpr", "official SelaVPR ViT-L"),
                       ("cricavpr", "official CricaVPR ViT-B")):
        if str(d.get("what", "")).startswith(label) and d.get("precision") == "fp16" and d.get("images_per_s"):
            official[key] = d["images_per_s"]
print("vprhub embedding, images/s. model-only = 1000 / model ms (inputs on the GPU, nothing copied back, as the")
print("official anchors); fwd+copy = 1000 / (forward + copy of the outputs to the host) ms; e2e = one embed_to_store")
print("run from 640x480 JPEG files, all cores decoding, start-up included; steady = (n2 - n1) / (t2 - t1) of two runs")
print("(start-up cancels; nan: not measured). The SALAD e2e goal is judged on steady when measured, else on e2e.")
print(f"{'model':<9}{'precision':<10}{'compile':<8}{'model-only':>11}{'fwd+copy':>9}{'e2e':>7}{'steady':>7}{'GPU MiB':>8}  goal")
for line in vprhub:
    t = line.split()
    if line.startswith("  check: "):
        print("  " + line.strip())
    if len(t) == 13 and t[0] in ("salad", "selavpr", "cricavpr", "megaloc") and t[2] in ("True", "False"):
        model, forward, e2e, steady, gpu = float(t[6]), float(t[7]), float(t[9]), float(t[10]), float(t[12])
        rate = 1000 / model if model > 0 else float("nan")
        with_copy = 1000 / forward if forward > 0 else float("nan")
        e2e_goal = steady if steady == steady else e2e  # steady unless NaN
        goal = goals.get(t[0])
        note = f">= {goal} model-only" + (", >= 3000 e2e" if t[0] == "salad" else "") if goal else ""
        if goal and t[1] == "bfloat16":
            note += "  MET" if rate >= goal and (t[0] != "salad" or e2e_goal >= 3000) else "  not met"
        if t[0] in official:
            note += f"; {rate / official[t[0]]:.2f}x official fp16 of this run ({official[t[0]]:.0f})"
        print(f"{t[0]:<9}{t[1]:<10}{t[2]:<8}{rate:>11.0f}{with_copy:>9.0f}{e2e:>7.0f}{steady:>7.0f}{gpu:>8.0f}  {note}")
print("\nvprhub training (goals: SALAD >= 4000 images/s at <= 10 GB, CricaVPR >= 1500 at <= 20 GB)")
recipe = ""
for line in vprhub:
    if line.startswith("== ") and "train_throughput" in line:
        recipe = line.split("--recipe ")[-1]
    m = re.match(r"optimisation: ([\d.]+) images/s \((\d+) ms/step\), peak memory (\d+) MiB .*?([\d.]+ M of [\d.]+ M)", line)
    if m:
        print(f"  {recipe}: {float(m[1]):.0f} images/s, {m[2]} ms/step, peak {int(m[3]) / 1024:.1f} GiB, "
              f"{m[4]} parameters trained")
print("\nofficial code (anchor.jsonl)")
for line in anchors:
    try:
        d = json.loads(line)
    except ValueError:
        continue
    figure = d.get("images_per_s") or d.get("train_images_per_s") or d.get("tflops") or d.get("ms_per_batch") \
        or d.get("ms_per_query") or d.get("bf16_matmul_tflops")
    what = d.get("what") or d.get("model") or "matmul"
    extra = d.get("precision") or d.get("mode") or ""
    mem = d.get("peak_mib")
    print(f"  {what} {extra}: {figure if 'error' not in d else d['error'][:120]}"
          + (f", peak {mem / 1024:.1f} GiB" if isinstance(mem, (int, float)) else ""))
EOF
echo "== summary (summary.txt)"
cat "$S"
echo "done at ${SECONDS} s"
