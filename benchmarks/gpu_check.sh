#!/usr/bin/env bash
# Everything BENCHMARKS.md wants measured on a CUDA machine, in one go (about 10 minutes on one GPU):
#   1. keyframe / non-keyframe paths on CUDA: resnet18, resnet50, pvt_v2_b2 at 512x1024
#   2. the segment job on a synthetic 720p corpus with --gpus-per-actor 1 (k = 1 and k = 6)
#   3. the pipeline's ceiling with a zero-cost model on CUDA (720p and 1080p sources, masks at source size)
#   4. training for 20 steps with 1 and 2 Ray Train workers (NCCL; the second needs two GPUs)
#
#   benchmarks/gpu_check.sh [OUT_DIR]            on a machine with CUDA
#   benchmarks/gpu_check.sh --cpu-smoke [OUT]    the same steps, tiny and on CPU: checks the script runs
#
# Run from the repository root with the project's Python (PYTHON=..., default .venv/bin/python or python).
# Every step's output goes to OUT_DIR/<step>.log (default gpu-check-<time>), and to the terminal.
set -euo pipefail

SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; shift; fi
OUT=${1:-gpu-check-$(date -u +%Y%m%dT%H%M%S)}
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ $SMOKE == 1 ]]; then
  DEVICE=cpu; GPUS=0; SIZES=64x128; BACKBONES=resnet18; CORPUS_SIZE=72x128; FRAMES=12; MODEL=32x64
  STEPS=2; CROP=64x128; CEILING=72x128; CEILING_FRAMES=12
else
  DEVICE=cuda; GPUS=1; SIZES=512x1024; BACKBONES=resnet18,resnet50,pvt_v2_b2; CORPUS_SIZE=720x1280
  FRAMES=240; MODEL=512x1024; STEPS=20; CROP=512x1024; CEILING=720x1280,1080x1920
  CEILING_FRAMES=48
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu-smoke')"
  nvidia-smi | tee "$OUT/nvidia-smi.log"
fi

step() {  # step NAME COMMAND...: run, log, and keep going so one failure does not hide the rest
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.log"
  if ! "$@" 2>&1 | tee -a "$OUT/$name.log"; then echo "== $name FAILED" | tee -a "$OUT/$name.log"; FAILED+=("$name"); fi
}
FAILED=()

step paths "$PY" benchmarks/bench_paths.py --device "$DEVICE" --backbones "$BACKBONES" --sizes "$SIZES"

"$PY" -m dcfm synth "$WORK/corpus" --videos 2 --frames "$FRAMES" --size "$CORPUS_SIZE" > /dev/null
"$PY" - "$WORK/ckpt" "$MODEL" <<'PYEOF'
import sys, torch
from dcfm.checkpoint import ModelCard, save_checkpoint
from dcfm.model import DCFM, DCFMConfig
h, w = (int(v) for v in sys.argv[2].split("x"))
torch.manual_seed(0)
config = DCFMConfig("resnet18", num_classes=19)
card = ModelCard(config, [f"c{i}" for i in range(19)], [(i * 13 % 256,) * 3 for i in range(19)], (h, w))
save_checkpoint(sys.argv[1], DCFM(config).eval(), card)
PYEOF
for k in 1 6; do
  step "segment-k$k" "$PY" -m dcfm segment "$WORK/corpus/videos" --output "$WORK/out-k$k" \
    --checkpoint "$WORK/ckpt" -k "$k" --chunk-frames 64 --gpus-per-actor "$GPUS" --device "$DEVICE"
  "$PY" -c "import json,glob,sys; m=json.load(open(sorted(glob.glob(sys.argv[1]+'/runs/*/*.json'))[-1])); \
print('k=$k manifest timings', json.dumps(m['timings']), 'resources', json.dumps(m['resources']))" \
    "$WORK/out-k$k" | tee -a "$OUT/segment-k$k.log"
done

step ceiling "$PY" benchmarks/bench_postprocess.py --skip-postprocess --device "$DEVICE" --sizes "$CEILING" \
  --model-size "$MODEL" --frames "$CEILING_FRAMES"

for workers in 1 2; do
  if [[ $SMOKE == 0 && $workers == 2 && $("$PY" -c "import torch; print(torch.cuda.device_count())") -lt 2 ]]; then
    echo "== train-$workers skipped: one GPU" | tee "$OUT/train-$workers.log"; continue
  fi
  step "train-$workers" "$PY" -m dcfm train --data "$WORK/corpus" --output "$WORK/run-$workers" \
    --workers "$workers" --gpus-per-worker "$GPUS" --steps "$STEPS" --crop "$CROP" --log-every 5 \
    --checkpoint-every "$STEPS"
done

if (( ${#FAILED[@]} )); then echo "FAILED: ${FAILED[*]} (logs in $OUT)"; exit 1; fi
echo "all steps done; logs in $OUT"
