#!/usr/bin/env bash
# The training step at LLaMA-2-7B's layer shape and a ~1B TinyLlama-like shape on one GPU (random weights, nothing
# downloaded): plain RoPE / YaRN / CLEX with stock autograd through cos/sin / CLEX with the fused rotation (Triton,
# and its eager-torch backward), 4k and 16k tokens, gradient checkpointing off and on, two layer counts each (2 and
# as many as fit); first the rotation alone (correctness against float64 + its cost). JSON + Markdown into OUT
# (default results/bench-7b; copy them to experiments/speed/llama-7b-shape).
#
#   bash experiments/speed/llama-7b-shape/run.sh [OUT] [ROUNDS]
#
# Time limits: the rotation stage is a few seconds of work (two lengths, a float64 reference each), 120 s; the step
# stage took 229 s on one H200 with ROUNDS=5 and 2 warm-up rounds (experiments/speed/llama-7b-shape/train_step.log:
# about 33 s a round), so its limit (TRAIN_LIMIT) is 600 s, grown in proportion for more than 5 rounds.
# Every finished case is written as it finishes, so a stage cut by its limit still leaves what it measured.
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${1:-results/bench-7b}
ROUNDS=${2:-5}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
if ! $py -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  echo "== skipped: these benchmarks need a CUDA GPU and Triton (torch.cuda.is_available() and import triton)"
  exit 0
fi
$py -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
T0=$SECONDS
timeout 120 $py benchmarks/rotation.py --device cuda --tokens 4096 16384 --out "$OUT/rotation.json" > "$OUT/rotation.md" 2>&1 \
    || echo "== rotation failed or timed out after $((SECONDS - T0)) s (limit 120 s)"
cat "$OUT/rotation.md"
echo "== rotation: $((SECONDS - T0)) s"
T1=$SECONDS
LIMIT=${TRAIN_LIMIT:-$(((ROUNDS + 2) * 600 / 7 > 600 ? (ROUNDS + 2) * 600 / 7 : 600))}
timeout "$LIMIT" $py benchmarks/train_step.py --device cuda --dtype bfloat16 --threads 0 --shapes llama2-7b tinyllama-1b \
    --seq 4096 16384 --layers 2 max --checkpointing off on --rounds "$ROUNDS" --warmup 2 \
    --variants plain yarn ours-stock-rotation ours ours-fused-torch --out "$OUT/train_step.json" 2> "$OUT/train_step.log" \
    || echo "== train_step failed or timed out after $((SECONDS - T1)) s (limit $LIMIT s; what it measured is in $OUT/train_step.json / .md)"
tail -20 "$OUT/train_step.log"
cat "$OUT/train_step.md" 2>/dev/null
echo "== train_step: $((SECONDS - T1)) s; total: $((SECONDS - T0)) s"
