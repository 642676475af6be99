#!/usr/bin/env bash
# SmolLM2-135M-Instruct (L0 = 8192) -> fine-tune with CLEX, PI and YaRN (same budget) -> perplexity at
# 4k/8k/16k/32k and passkey at 8k/16k/32k, beside the base model. Every step's wall time goes to
# $OUT/timings.tsv (and timings.md); results to $OUT (default results/smollm2/).
#
#   bash experiments/smollm2-8k/run-cpu.sh                                              # everything; finished steps are skipped
#   nohup bash experiments/smollm2-8k/run-cpu.sh > results/smollm2.log 2>&1 &           # the CPU run takes hours: background it
#   STEPS=2 PPL_LENGTHS=1024 PPL_LONG_LENGTHS=2048 PASSKEY_LENGTHS=1024 OUT=/tmp/smoke bash experiments/smollm2-8k/run-cpu.sh  # smoke run
#
# Knobs (environment; defaults by PROFILE, which is "gpu" when torch sees CUDA, else "cpu"):
#   OUT, METHODS ("clex clex-rec pi yarn"; clex-far too), SEQ_LEN, BATCH, STEPS, DTYPE (training: float32 | bfloat16),
#   DEVICE (evaluation: cpu | cuda), EVAL_DTYPE, PPL_LENGTHS, PPL_DOCS (held-out plays per length),
#   PPL_LONG_LENGTHS + PPL_LONG_DOCS (lengths measured on fewer documents: a 32k CPU forward takes ~6 min),
#   PASSKEY_LENGTHS, PASSKEY_DEPTHS, PASSKEY_TRIALS, EXTRA (more key=value overrides for every training run).
#
# Wall time measured on the dev machine's 2 CPU cores (float32, 2026-11-23; experiments/smollm2-8k/cpu/timings.tsv):
#   convert   ~30 s the first time (dequantise the Q4_1 GGUF, save 538 MB float32), then 0 s (cached)
#   train     ~10-11 s a step (2 x 1024 tokens, LoRA, gradient checkpointing): 80 steps 15-16 min a method,
#             the default 150 steps ~27 min a method
#   ppl       one model, 2 documents at 4k/8k/16k: ~4 min; 32k on PPL_LONG_DOCS=1 document: ~5 min
#   passkey   one model, 3 depths x 1 trial at 8k and 16k: ~4.3 min; each 32k trial ~3.8 min more
# The run in experiments/smollm2-8k/README.md (STEPS=80, PASSKEY_LENGTHS=8192,16384, then one 32k passkey each): ~2 h.
# On a GPU (PROFILE=gpu) the same script trains on rows of L = 8192 tokens (so CLEX's extrapolated positions
# span L·t exactly), batch 4, 400 steps, bfloat16, and evaluates on cuda with 10 passkey trials a cell and
# every held-out play: minutes, not hours, on one H100.
set -euo pipefail
cd "$(dirname "$0")/../.."

PROFILE=${PROFILE:-$(python -c 'import torch; print("gpu" if torch.cuda.is_available() else "cpu")')}
if [ "$PROFILE" = gpu ]; then
  : "${SEQ_LEN:=8192}" "${BATCH:=4}" "${STEPS:=400}" "${DTYPE:=bfloat16}" "${DEVICE:=cuda}"
  : "${PPL_DOCS:=4}" "${PASSKEY_TRIALS:=10}" "${PASSKEY_DEPTHS:=0,0.25,0.5,0.75,1}"
  : "${PPL_LENGTHS:=4096,8192,16384,32768}" "${PPL_LONG_LENGTHS:=}" "${PPL_LONG_DOCS:=4}"
else
  : "${SEQ_LEN:=1024}" "${BATCH:=2}" "${STEPS:=150}" "${DTYPE:=float32}" "${DEVICE:=cpu}"
  : "${PPL_DOCS:=2}" "${PASSKEY_TRIALS:=1}" "${PASSKEY_DEPTHS:=0.1,0.5,0.9}"
  : "${PPL_LENGTHS:=4096,8192,16384}" "${PPL_LONG_LENGTHS=32768}" "${PPL_LONG_DOCS:=1}"  # PPL_LONG_LENGTHS= : none
fi
: "${OUT:=results/smollm2}" "${METHODS:=clex clex-rec pi yarn}" "${EVAL_DTYPE:=float32}" "${EXTRA:=}"
: "${PASSKEY_LENGTHS:=8192,16384,32768}"
mkdir -p "$OUT/eval"
TIMES="$OUT/timings.tsv"
[ -f "$TIMES" ] || printf 'step\tseconds\tstatus\tfinished_utc\n' > "$TIMES"

# timed NAME CMD...: run CMD, append its wall time and exit status to $TIMES; stop the script if it failed.
timed() {
  local name=$1; shift
  local start end status=0
  echo "== $name: $*"
  start=$EPOCHREALTIME
  "$@" || status=$?
  end=$EPOCHREALTIME
  printf '%s\t%s\t%s\t%s\n' "$name" "$(awk "BEGIN {printf \"%.1f\", $end - $start}")" "$status" \
    "$(date -u +%FT%TZ)" >> "$TIMES"
  [ "$status" -eq 0 ] || { echo "== $name failed (exit $status)"; exit "$status"; }
}

# 1. Convert the wheel's GGUF once (cached in $CLEX_CACHE or ~/.cache/clex).
timed convert python -m clex.cli models smollm2
BASE=$(python -c 'from clex.data.smollm2 import convert; print(convert())')
cp "$BASE/clex-source.json" "$OUT/convert.json"

# 2. Fine-tune each method with the same budget (the recipes differ only in the method).
for m in $METHODS; do
  if [ -f "$OUT/$m/final/config.json" ]; then echo "== train $m: done before, skipped"; continue; fi
  resume=false; compgen -G "$OUT/$m/checkpoint-*" > /dev/null && resume=true
  # shellcheck disable=SC2086  # EXTRA is a list of key=value words
  timed "train $m" python -m clex.cli train "recipes/smollm2-$m.yaml" \
    "model=$BASE" "out_dir=$OUT/$m" "seq_len=$SEQ_LEN" "batch_size=$BATCH" "steps=$STEPS" "dtype=$DTYPE" \
    "resume=$resume" $EXTRA
done

# 3. Evaluate base + each method, one model per call (own wall time; a rerun skips finished ones).
MODELS=("base=$BASE")
for m in $METHODS; do MODELS+=("$m=$OUT/$m/final"); done
for spec in "${MODELS[@]}"; do
  name=${spec%%=*}
  [ -f "$OUT/eval/ppl_$name.json" ] || timed "ppl $name" python -m clex.cli eval ppl --models "$spec" \
    --lengths "$PPL_LENGTHS" --max-documents "$PPL_DOCS" --protocol chunked --device "$DEVICE" \
    --dtype "$EVAL_DTYPE" --out-dir "$OUT/eval" --name "ppl_$name" --no-plot
  [ -z "$PPL_LONG_LENGTHS" ] || [ -f "$OUT/eval/ppl-long_$name.json" ] || timed "ppl-long $name" python -m clex.cli \
    eval ppl --models "$spec" --lengths "$PPL_LONG_LENGTHS" --max-documents "$PPL_LONG_DOCS" --protocol chunked \
    --device "$DEVICE" --dtype "$EVAL_DTYPE" --out-dir "$OUT/eval" --name "ppl-long_$name" --no-plot
  [ -f "$OUT/eval/passkey_$name.json" ] || timed "passkey $name" python -m clex.cli eval passkey \
    --models "$spec" --lengths "$PASSKEY_LENGTHS" --depths "$PASSKEY_DEPTHS" --samples "$PASSKEY_TRIALS" \
    --device "$DEVICE" --dtype "$EVAL_DTYPE" --out-dir "$OUT/eval" --name "passkey_$name" --no-plot
done

# 4. One table and plot per task (all models), the learned θ(t), and the timings as Markdown.
timed summary python - "$OUT" "${MODELS[@]%%=*}" <<'EOF'
import json, sys
from pathlib import Path

from clex.eval.plot import plot_freqs, plot_ppl, plot_retrieval
from clex.eval.report import write_results

out, names = Path(sys.argv[1]), sys.argv[2:]
for task, plot in (("ppl", plot_ppl), ("passkey", plot_retrieval)):
    parts = [json.loads((out / "eval" / f"{task}_{n}.json").read_text()) for n in names]
    payload = {**parts[0], "models": {k: v for p in parts for k, v in p["models"].items()}}
    for n in names if task == "ppl" else ():  # the long lengths, measured on fewer documents
        long = out / "eval" / f"ppl-long_{n}.json"
        for k, v in (json.loads(long.read_text())["models"] if long.is_file() else {}).items():
            payload["models"][k]["results"].update(v["results"])
    if task == "ppl":
        rows = [{"model": m, "L": v["train_length"], **{str(n): f"{r['ppl']:.2f}" for n, r in v["results"].items()}}
                for m, v in payload["models"].items()]
    else:
        rows = [{"model": m, **{str(n): sum(row.values()) / len(row) for n, row in v["grid"].items()}, "mean": v["mean"]}
                for m, v in payload["models"].items()]
    write_results(out, task, payload, rows, title=f"SmolLM2-135M: {task} by length")
    plot(payload, out / f"{task}.png")
if (out / "clex" / "final").is_dir():
    plot_freqs(out / "clex" / "final", ts=(1, 2, 4, 8), out_dir=out, name="freqs", overwrite=True)
EOF
python - "$TIMES" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
lines = ["| step | wall time | status |", "|---|---|---|"]
lines += [f"| {r['step']} | {float(r['seconds']) / 60:.1f} min | {r['status']} |" for r in rows]
open(sys.argv[1].replace(".tsv", ".md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
