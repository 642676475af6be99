#!/usr/bin/env bash
# CLEX's training cost at 7B scale on one GPU (random weights, nothing downloaded): the training step at LLaMA-2-7B's layer shape and a
# ~1B TinyLlama-like shape, plain RoPE / YaRN / CLEX with stock autograd through cos/sin / CLEX with the fused
# rotation (Triton, and its eager-torch backward), 4k and 16k tokens, gradient checkpointing off and on, two
# layer counts each (2 and as many as fit); first the rotation alone (correctness against float64 + its cost).
# JSON + Markdown into OUT (default results/bench-7b; copy them to experiments/speed/llama-7b-shape). ~4-6 minutes on one H200 (the step benchmark capped at TRAIN_LIMIT=330 s: every finished case is kept).
#
#   bash experiments/speed/llama-7b-shape/run.sh [OUT] [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${1:-results/bench-7b}
ROUNDS=${2:-5}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
$py -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
T0=$SECONDS
timeout 60 $py benchmarks/rotation.py --device cuda --tokens 4096 16384 --out "$OUT/rotation.json" > "$OUT/rotation.md" 2>&1 \
    || echo "== rotation failed or timed out"
cat "$OUT/rotation.md"
echo "== rotation: $((SECONDS - T0)) s"
timeout ${TRAIN_LIMIT:-330} $py benchmarks/train_step.py --device cuda --dtype bfloat16 --threads 0 --shapes llama2-7b tinyllama-1b \
    --seq 4096 16384 --layers 2 max --checkpointing off on --rounds "$ROUNDS" --warmup 2 \
    --variants plain yarn ours-stock-rotation ours ours-fused-torch --out "$OUT/train_step.json" 2> "$OUT/train_step.log" \
    || echo "== train_step failed or timed out (what it measured is in $OUT/train_step.json / .md)"
tail -20 "$OUT/train_step.log"
cat "$OUT/train_step.md" 2>/dev/null
echo "== total: $((SECONDS - T0)) s"
