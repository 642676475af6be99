#!/usr/bin/env bash
# The performance benchmarks on one GPU, CLEX beside plain RoPE in one process each, SmolLM2-135M's
# shape (random init, nothing downloaded), bfloat16. JSON (+ the printed Markdown tables) go to $OUT
# (default results/bench-gpu). ~6 minutes on one H100.
#
#   OUT=results/bench-gpu bash experiments/speed/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-results/bench-gpu}
mkdir -p "$OUT"
run() {  # run NAME SECONDS CMD...: one benchmark under its own time limit; a failure is logged, the next one runs
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.md" 2>&1 || echo "== $name failed or timed out (limit $limit s)"
  cat "$OUT/$name.md"
}
run solve 80 python benchmarks/solve.py --device cuda --times 2 8 16 --rounds 3 \
  --variants reference "rk4 graded" "fused graded" --out "$OUT/solve.json"
run train_step 200 python benchmarks/train_step.py --device cuda --dtype bfloat16 --threads 0 --shapes smollm2-135m \
  --seq 2048 4096 8192 16384 --rounds 10 --variants plain ours-stock-rotation ours --out "$OUT/train_step.json"
run prefill 110 python benchmarks/prefill.py --device cuda --dtype bfloat16 --threads 0 --model smollm2 \
  --tokens 2048 4096 8192 16384 --rounds 10 --no-memory --out "$OUT/prefill.json"
run decode 150 python benchmarks/decode.py --device cuda --dtype bfloat16 --clock wall --threads 4 --model smollm2 \
  --factors 2 4 8 --rounds 6 --out "$OUT/decode.json"
