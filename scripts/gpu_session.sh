#!/usr/bin/env bash
# One lent GPU machine: the GPU benchmarks and checks of the engine, then a warm-started training
# run of the bundled base-16 model on band-limited exit-wave libraries. Each step runs when what
# it needs was carried (ignored here; name them in the device tool's `carry`):
#   benchmarks (BENCH=1, the default; BENCH=e2e: only bench engine --e2e with device
#     post-processing; BENCH=0: none): .whl/pyzmq-*.whl (absent there); .devcarry/gpu_ceilings.py
#     (a copy of ../shared/tools/gpu_ceilings.py); .devframes/e2e_<side>.h5 (frames for
#     bench engine --e2e: `segdepth simulate --out F.h5 --count 4 --size 512` (and 1024), of
#     which only the images travel, rounded to float16 and gzipped: 1.1 and 4.5 MB, made with
#     h5py: f.create_dataset("images", data=im[:4].astype("f2").astype("f4"), compression="gzip",
#     compression_opts=9, shuffle=True));
#   training (TRAIN=1, the default; SEED: train's --seed, 3 unless set; LR: its peak --lr, 1e-3
#     unless set: four warm restarts at 1e-3 traded false columns for exact reads in the last,
#     training/models/candidates/; BG: its --background-weight, 0.2 unless set: 0.5 cut the
#     false columns on every suite row and found fewer columns in a CPU fine-tune,
#     candidates/segdepth-b16-a6f4f54d8a.md): .devcarry/{train600_b3,
#     val_b3}.h5 (segdepth band-limit of data/waves_train600.h5 and data/waves_val.h5 at 3 1/Å).
# One call does both (2026-11-26, H100: BUDGET_S=585, 537 s of which 5.3 min training at ~340
# samples/s, rendered on the GPU; 2026-11-27, H200: BENCH=e2e BUDGET_S=575, 529 s of which 6.4 min
# training at 293-363 samples/s): carry [".devframes", ".devcarry", ".whl"]. The working tree
# travels too and all of it must stay under 64 MiB: check `du` first, and move
# training/models/previous/ out of the tree for the call if it does not fit.
# Results land in $OUT: session.log (all that was printed, gpu_ceilings.py's output too),
# engine.json, engine_e2e_{device,host}.json (BENCH=e2e: engine_e2e_device{,_steady}.json),
# engine_e2e_device_tta.json (serve --tta),
# train.log, the
# run's config.json, metrics.jsonl and model.pt (checkpoint.pt, ~24 MB, stays behind).
# BUDGET_S: seconds the whole script may take; training gets what the benchmarks leave, less 80 s
# for loading and the final save (its learning-rate schedule follows that wall time).
set -u
T0=$(date +%s)
OUT=${OUT:-out}
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT"
# everything printed goes to $OUT/session.log too (a call brings back 8 files at most)
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
if ! python3 -c "import zmq" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import os; print(os.cpu_count(), 'CPUs')"

HAS_CUDA=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
if [ "${BENCH:-1}" = 1 ] && [ "$HAS_CUDA" = 1 ]; then
    timeout 100 python3 -m segdepth bench engine --backends torch-cuda,tensorrt \
        --sizes 512 1024 --batches 1 8 32 --iterations 20 --max-seconds 2 \
        --json "$OUT/engine.json" 2>&1 | tail -30
fi
if [ "${BENCH:-1}" != 0 ] && [ "$HAS_CUDA" = 1 ]; then
    # post-processing on the GPU against the CPU reference (tests needing abTEM skip there)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine_device_maps.py 2>&1 | tail -8
fi
# bench engine --e2e through serve (BENCH=1: device and host post-processing; BENCH=e2e: device
# only), then scripts/profile_post.py. The GPU machine has no abTEM: the e2e frames travel as
# dataset files (header above)
FRAMES=$(ls .devframes/e2e_*.h5 2>/dev/null)
if [ "${BENCH:-1}" != 0 ] && [ "$HAS_CUDA" = 1 ] && [ -n "$FRAMES" ]; then
    SIDES=$(for f in $FRAMES; do basename "$f" .h5 | cut -d_ -f2; done)
    POSTS="device host"; [ "${BENCH:-1}" = e2e ] && POSTS=device
    for POST in $POSTS; do
        timeout 120 python3 -m segdepth bench engine --e2e --backends torch-cuda \
            --sizes $SIDES --max-batch 32 --e2e-frames 128 --frames-from $FRAMES \
            --postprocess $POST --json "$OUT/engine_e2e_$POST.json" 2>&1 | tail -30
    done
    # the steady state alone: the session's column reference (first 8 frames) out of the timing
    [ "${BENCH:-1}" = e2e ] && timeout 120 python3 -m segdepth bench engine --e2e \
        --backends torch-cuda --sizes $SIDES --max-batch 32 --e2e-frames 128 --warmup 8 \
        --frames-from $FRAMES --postprocess device --json "$OUT/engine_e2e_device_steady.json" \
        2>&1 | tail -30
    # serve --tta (8 passes a frame, the views summed on the GPU): what the README's TTA
    # section only estimates from the network's rate
    timeout 120 python3 -m segdepth bench engine --e2e --tta --backends torch-cuda \
        --sizes $SIDES --max-batch 32 --e2e-frames 64 --warmup 8 --frames-from $FRAMES \
        --postprocess device --json "$OUT/engine_e2e_device_tta.json" 2>&1 | tail -30
    # where device post-processing spends its time per frame (cProfile, into session.log)
    for f in $FRAMES; do
        # the project is not installed there: the repository root on the path
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 60 python3 scripts/profile_post.py \
            --backend torch-cuda --frames-from "$f" \
            --size "$(basename "$f" .h5 | cut -d_ -f2)" --frames 96 --batch 32 --top 20 2>&1
    done
fi
if [ "${BENCH:-1}" = 1 ] && [ "$HAS_CUDA" = 1 ]; then
    # the shared yardstick (a copy of ../shared/tools/gpu_ceilings.py), cut short: base-16 rows
    [ -f .devcarry/gpu_ceilings.py ] && timeout 30 python3 .devcarry/gpu_ceilings.py 2>&1
fi

if [ "${TRAIN:-1}" != 1 ] || [ ! -f .devcarry/train600_b3.h5 ]; then
    echo "no training in this call (TRAIN=${TRAIN:-1}; library carried: $(ls .devcarry/*.h5 2>/dev/null))"
    ls -la "$OUT"
    exit 0
fi
RUN=/tmp/run_gpu
# render on the GPU (training/device_render.py) if a smoke test passes there, else in processes
RENDER="--render-workers $(python3 -c "import os; print(max(1, os.cpu_count() - 2))")"
python3 - <<'PY' && RENDER=--render-on-device
import torch
from training.device_render import DeviceRenderer
from training.labels import TargetConfig
from training.library_data import RenderConfig, load_library
lib = load_library(".devcarry/val_b3.h5", limit=2)
r = DeviceRenderer(lib, RenderConfig(crop=256, views_per_wave=8), TargetConfig(), 0, torch.device("cuda"))
print("device rendering works:", [tuple(t.shape) for t in r.item(1)])
PY
echo "rendering: $RENDER"
LEFT=$((T0 + BUDGET_S - $(date +%s)))
TRAIN_MIN=$(python3 -c "print(round(max(0.5, ($LEFT - 80) / 60), 2))")
echo "training for $TRAIN_MIN min"
# one thread per render worker (when they are many); the main process takes --threads
OMP_NUM_THREADS=1 timeout $((LEFT - 5)) python3 -m segdepth train \
    --data .devcarry/train600_b3.h5 --val .devcarry/val_b3.h5 --out "$RUN" --force \
    --init training/models/segdepth_base16.pt --base-channels 16 --max-channels 128 \
    --dose-range 0.5 10 --views-per-wave 8 --crop 256 --batch-size 32 --lr "${LR:-1e-3}" \
    --background-weight "${BG:-0.2}" \
    --epochs 400 --patience 400 --time-limit-min "$TRAIN_MIN" --val-count 160 \
    $RENDER --threads 2 --seed "${SEED:-3}" --no-progress \
    >"$OUT/train.log" 2>&1
tail -5 "$OUT/train.log"
for f in config.json metrics.jsonl model.pt; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
[ -f "$OUT/model.pt" ] || { [ -f "$RUN/best.pt" ] && cp "$RUN/best.pt" "$OUT/"; }
ls -la "$OUT"
