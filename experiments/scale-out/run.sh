#!/usr/bin/env bash
# One-process runs of the SmolLM2 CLEX recipe at 8k rows under each accelerate config (on a machine of one
# GPU): plain (no launcher), ddp.yaml, fsdp.yaml and deepspeed-zero3.yaml, 20 steps each from the same seed,
# beside each other on the one GPU (so tokens/s here is not a speed figure; the loss curves and each run's peak
# memory are). Then the FSDP and ZeRO-3 runs are resumed from their step-10 checkpoint (the step-20 one and the
# final model deleted) and their resumed loss curve compared with the uninterrupted one.
#
#   bash experiments/scale-out/run.sh BASE WORK OUT
set -uo pipefail
BASE=$1; WORK=$2; OUT=$3
mkdir -p "$WORK" "$OUT"
py=python3
# SCALE_RECIPE / SCALE_ARGS replace the recipe and its settings (a CPU check: recipes/tiny-clex.yaml, model=tiny-llama)
read -r -a args <<< "${SCALE_ARGS:-model=$BASE seq_len=8192 batch_size=2 dtype=bfloat16 gradient_checkpointing=true threads=2}"
common=("${SCALE_RECIPE:-recipes/smollm2-clex.yaml}" "${args[@]}" steps=20 save_every=10 keep_checkpoints=0 log_every=2
        eval_every=0)

launch() {  # launch NAME PORT CONFIG|- [k=v ...]
    local name=$1 port=$2 cfg=$3; shift 3
    if [ "$cfg" = - ]; then
        $py -m clex.train "${common[@]}" "out_dir=$WORK/$name" "$@"
    else
        accelerate launch --config_file "configs/accelerate/$cfg.yaml" --num_processes 1 --main_process_port "$port" \
            -m clex.train "${common[@]}" "out_dir=$WORK/$name" "$@"
    fi
}

start=$SECONDS
launch plain 0 - > "$OUT/plain.log" 2>&1 &
launch ddp 29511 ddp > "$OUT/ddp.log" 2>&1 &
launch fsdp 29512 fsdp > "$OUT/fsdp.log" 2>&1 &
if $py -c "import deepspeed" 2> /dev/null; then
    launch zero3 29513 deepspeed-zero3 > "$OUT/zero3.log" 2>&1 &
else
    echo "deepspeed does not import: ZeRO-3 not run" | tee "$OUT/zero3.log"
fi
wait
echo "== four one-process runs in $((SECONDS - start)) s"

for name in fsdp zero3; do  # resume from step 10: the same loss curve as the uninterrupted run?
    [ -f "$WORK/$name/final/config.json" ] || continue
    cp "$WORK/$name/log.jsonl" "$OUT/${name}_uninterrupted.jsonl"
    rm -rf "$WORK/$name/checkpoint-000020" "$WORK/$name/final"
    cfg=$([ $name = fsdp ] && echo fsdp || echo deepspeed-zero3)
    launch "$name" 29514 "$cfg" resume=true > "$OUT/${name}_resume.log" 2>&1
done

for name in plain ddp fsdp zero3; do
    [ -f "$WORK/$name/log.jsonl" ] && cp "$WORK/$name/log.jsonl" "$OUT/${name}.jsonl"
done
$py - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path

import torch

work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows, table = {}, ["| run | losses (steps 2, 4, ..., 20) | peak GiB | loads with clex.load_model |", "|---|---|---|---|"]
for name in ["plain", "ddp", "fsdp", "zero3"]:
    f = out / f"{name}.jsonl"
    if not f.is_file():
        table.append(f"| {name} | not run | | |")
        continue
    recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in recs if "loss" in r]
    mem = max((r.get("max_memory_gib", 0) for r in recs), default=0)
    try:
        import clex
        clex.load_model(work / name / "final", dtype=torch.bfloat16)
        loads = "yes"
    except Exception as e:  # noqa: BLE001 - reported, not raised: the table says what failed
        loads = f"no: {type(e).__name__}: {str(e)[:80]}"
    rows[name] = {"losses": losses, "max_memory_gib": mem, "loads": loads}
    table.append(f"| {name} | {' '.join(f'{x:.3f}' for x in losses)} | {mem:.1f} | {loads} |")
for name in ["fsdp", "zero3"]:
    a, b = out / f"{name}_uninterrupted.jsonl", work / name / "log.jsonl"
    if a.is_file() and b.is_file():
        la = {r["step"]: r["loss"] for r in map(json.loads, a.read_text().splitlines()) if "loss" in r}
        lb = {r["step"]: r["loss"] for r in map(json.loads, b.read_text().splitlines()) if "loss" in r}
        diff = max((abs(la[s] - lb[s]) for s in la if s > 10 and s in lb), default=None)
        rows[f"{name}_resume_max_abs_loss_diff"] = diff
        table.append(f"| {name} resumed at 10 | max abs loss difference at steps 12-20: {diff} | | |")
(out / "scale-out.json").write_text(json.dumps(rows, indent=1) + "\n")
(out / "scale-out.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
EOF
