#!/usr/bin/env bash
# The performance benchmarks on one GPU, CLEX beside plain RoPE in one process each, SmolLM2-135M's shape (random
# init, nothing downloaded), bfloat16. JSON (+ the printed Markdown tables) go to $OUT (default results/bench-gpu).
#
#   OUT=results/bench-gpu bash experiments/speed/gpu/run.sh
#
# Each stage runs under its own time limit, about three times the work it is given as measured on one H100 (the
# numbers of experiments/speed/gpu/*.md): the small stages are launch-bound (tiny kernels, one Python step at a
# time), so a slower host CPU or a busy machine stretches them, which is what overran the earlier, tighter limits
# on an H200 (solve > 80 s, decode > 150 s). Every stage prints its own seconds; a stage that still overruns is
# reported as such and the next one runs. About 8 minutes in all on one H100 or H200.
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-results/bench-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  echo "== skipped: torch finds no CUDA GPU here (these are GPU benchmarks; benchmarks/*.py --device cpu run on a CPU)"
  exit 0
fi
run() {  # run NAME SECONDS CMD...: one benchmark under its own time limit; a failure is logged, the next one runs
  local name=$1 limit=$2 start=$SECONDS; shift 2
  echo "== $name (limit $limit s): $*"
  if timeout "$limit" "$@" > "$OUT/$name.md" 2>&1; then
    echo "== $name: $((SECONDS - start)) s"
  else
    echo "== $name failed or timed out after $((SECONDS - start)) s (limit $limit s)"
  fi
  cat "$OUT/$name.md"
}
# solve: per t, a float64 fine reference (rk4, dt 0.002: 5 x the reference's steps, no gradient), the reference's
# own gradient, one accuracy pass and 1 + 3 timed rounds of each variant's forward and forward + backward. The
# reference variant (torchdiffeq rk4 at dt 0.01, 1500 steps at t = 16) dominates: 2.2 s forward and 3.7 s
# forward + backward at t = 16 on an H100, so t = 2, 8, 16 take about 75 s there, hence 240 s.
run solve 240 python benchmarks/solve.py --device cuda --times 2 8 16 --rounds 3 \
  --variants reference "rk4 graded" "fused graded" --out "$OUT/solve.json"
run train_step 300 python benchmarks/train_step.py --device cuda --dtype bfloat16 --threads 0 --shapes smollm2-135m \
  --seq 2048 4096 8192 16384 --rounds 10 --variants plain ours-stock-rotation ours --out "$OUT/train_step.json"
run prefill 180 python benchmarks/prefill.py --device cuda --dtype bfloat16 --threads 0 --model smollm2 \
  --tokens 2048 4096 8192 16384 --rounds 10 --no-memory --out "$OUT/prefill.json"
# decode: 3 contexts x (1 warm-up + 4 rounds) x 4 variants x 64 steps at ~25 ms a token (launch-bound: 30 layers,
# batch 1) is about 80 s on an H100, plus a prefill and two cache copies per round; 4 rounds (6 before) still give
# a median and quartiles of the per-round ratio, and 300 s leave room for a host three times slower.
run decode 300 python benchmarks/decode.py --device cuda --dtype bfloat16 --clock wall --threads 4 --model smollm2 \
  --factors 2 4 8 --rounds 4 --out "$OUT/decode.json"
