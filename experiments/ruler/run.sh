#!/usr/bin/env bash
# RULER through lm-eval on a GPU machine that has torch/transformers but not lm-eval: one command.
#   bash experiments/ruler/run.sh OUT_DIR SPEC [SPEC ...]
#   e.g. bash experiments/ruler/run.sh runs/ruler base=runs/base clex=runs/clex yarn=runs/yarn:yarn:factor=8 pi=runs/pi
# SPEC: a model spec of `clex eval` (src/clex/eval/specs.py). Installs the wheels of .whl/ruler/ (lm-eval 0.4.13
# and what it needs beyond torch/transformers/accelerate/peft/pandas/pyarrow/scipy/scikit-learn/sacrebleu/...,
# cp312 manylinux x86_64, ~16 MB, put there beforehand) with --no-deps, skipping every package already installed
# (nothing the machine has is replaced), then runs `clex eval ruler` from this checkout (PYTHONPATH=src),
# offline. NLTK data is not needed: only the essay tasks, which are skipped, split sentences.
# Knobs (environment): RULER_LENGTHS (default "8192 16384 32768 65536"), RULER_SAMPLES (samples per task x
# length cell, default 4), RULER_BATCH (prompts generated together, default = RULER_SAMPLES: one batch a cell),
# RULER_TASKS (default: all six offline tasks), RULER_DTYPE (default bfloat16), RULER_DEVICE (default cuda).
# `bash experiments/ruler/run.sh --install` only installs the wheels (once, before several runs side by side).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$#" -ge 2 ] || [ "${1:-}" = --install ] || { echo "usage: bash experiments/ruler/run.sh OUT_DIR SPEC [SPEC ...]" >&2; exit 2; }
out="$1"
shift
python=python3
start=$SECONDS

missing="$("$python" - <<'EOF'
import importlib.metadata as md
import pathlib
import re

for wheel in sorted(pathlib.Path(".whl/ruler").glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
EOF
)"
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    "$python" -m pip install -q --no-deps --no-index $missing
fi
echo "ruler/run.sh: installed $(echo "$missing" | grep -c . || true) wheels in $((SECONDS - start)) s"
[ "$out" = --install ] && exit 0

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
samples="${RULER_SAMPLES:-4}"
# shellcheck disable=SC2086
"$python" -m clex.cli eval ruler --models "$@" --lengths ${RULER_LENGTHS:-8192 16384 32768 65536} \
    ${RULER_TASKS:+--tasks $RULER_TASKS} --samples "$samples" --batch-size "${RULER_BATCH:-$samples}" \
    --device "${RULER_DEVICE:-cuda}" --dtype "${RULER_DTYPE:-bfloat16}" --out-dir "$out"
echo "ruler/run.sh: done in $((SECONDS - start)) s; results in $out/ruler.{json,md,png}"
