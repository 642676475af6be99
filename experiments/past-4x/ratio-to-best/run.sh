#!/usr/bin/env bash
# The front page's table: each model's perplexity over the best model's at each length, SmolLM2-135M fine-tuned
# with one budget (experiments/past-4x/*), three seeds of each recipe. CPU only, seconds: nothing is measured
# again, the evaluations beside the trainings are read.
#
#   bash experiments/past-4x/ratio-to-best/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
P=experiments/past-4x
OUT=$P/ratio-to-best
python $OUT/to_ppl_json.py --out-dir $OUT \
    far-s0=$P/log-scale/eval_c16q-logn-only.json \
    far-s1=$P/far-recipe-seeds/eval_c16q-logn-only-s1.json \
    far-s2=$P/far-recipe-seeds/eval_c16q-logn-only-s2.json \
    recommended-s0=$P/options/eval_clex-rec.json \
    recommended-s1=$P/options/eval_clex-rec-s1.json \
    recommended-s2=$P/options/eval_clex-rec-s2.json \
    yarn-s8-s0=$P/budget/eval_yarn8.json \
    yarn-s8-s1=$P/options/eval_yarn8-s1.json \
    yarn-s8-s2=$P/options/eval_yarn8-s2.json \
    yarn-s16-s0=$P/samplers/eval_yarn16-s0.json \
    yarn-s16-s1=$P/options/eval_yarn16-s1.json \
    yarn-s16-s2=$P/options/eval_yarn16-s2.json
MODELS=(
    "clex-far=far-s0,far-s1,far-s2"
    "clex-recommended=recommended-s0,recommended-s1,recommended-s2"
    "yarn-s8=yarn-s8-s0,yarn-s8-s1,yarn-s8-s2"
    "yarn-s16=yarn-s16-s0,yarn-s16-s1,yarn-s16-s2"
)
for doc in plays kjv; do
    clex eval compare --results $OUT/ppl-$doc.json --groups "${MODELS[@]}" --out-dir $OUT --name compare-$doc
done
