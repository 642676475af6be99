#!/usr/bin/env bash
# The paper's DeepSpeed set-up (configs/accelerate/deepspeed-zero3.yaml: ZeRO-3, parameters and optimizer
# state offloaded to the CPU) run once for real, one process, on the SmolLM2 CLEX recipe: install DeepSpeed from
# .whl/ds (offline: a pure-Python wheel built with DS_BUILD_OPS=0, its ops JIT-built at run time with ninja/nvcc,
# plus hjson and pydantic's wheels for cp312), train 6 steps with a checkpoint every 3, resume from step 3 (the
# step-6 checkpoint and the final model deleted) and compare the loss curves, then clex.load_model the result.
# Logs and both loss curves go to OUT (default WORK/report). ~4-6 minutes on one H200 (most of it DeepSpeed's
# CPU-Adam build).
#
#   bash experiments/scale-out/run-deepspeed-resume.sh BASE_FOLDER WORK [OUT]
#   CPU_CHECK=1 bash experiments/scale-out/run-deepspeed-resume.sh tiny-llama /tmp/ds   # the same on a CPU (recipes/tiny-clex.yaml)
set -uo pipefail
cd "$(dirname "$0")/../.."
BASE=$1; WORK=$2; OUT=${3:-$WORK/report}
mkdir -p "$WORK" "$OUT"
py=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$SECONDS

if ! $py -c "import deepspeed" 2> /dev/null; then
    $py -m pip install -q --no-index --no-deps .whl/ds/*.whl 2>&1 | tail -3
fi
$py -c "import deepspeed, pydantic, hjson, torch; print('deepspeed', deepspeed.__version__, 'pydantic', pydantic.__version__, 'torch', torch.__version__)" \
    || { echo "deepspeed does not import: nothing run"; exit 1; }

if [ "${CPU_CHECK:-0}" = 1 ]; then  # the trainer uses accelerate's cpu=True where it finds no accelerator: lift that
    recipe=recipes/tiny-clex.yaml; read -r -a args <<< "model=$BASE ${DS_EXTRA:-}"   # DS_EXTRA="train=lora": LoRA
    entry=("$OUT/ds_cpu.py")
    printf 'import sys\nimport clex.train.distributed as d\nimport clex.train.loop as loop\nd.has_accelerator = lambda: True\nsys.exit(loop.cli())\n' > "$OUT/ds_cpu.py"
else
    recipe=recipes/smollm2-clex.yaml
    args=(model="$BASE" seq_len=4096 batch_size=2 dtype=bfloat16 gradient_checkpointing=true)
    entry=(-m clex.train)
fi
run() {  # run LOG [k=v ...]
    local log=$1; shift
    $py -m accelerate.commands.launch --config_file configs/accelerate/deepspeed-zero3.yaml --num_processes 1 \
        --main_process_port 29541 "${entry[@]}" "$recipe" "${args[@]}" steps=6 save_every=3 keep_checkpoints=0 \
        log_every=1 eval_every=0 out_dir="$WORK/zero3" "$@" > "$OUT/$log" 2>&1
    local rc=$?
    grep -v "^\[20\|FutureWarning\|return func" "$OUT/$log" | tail -6
    echo "== $log: rc $rc, $((SECONDS - T0)) s"
    return $rc
}

rm -rf "$WORK/zero3"
run train.log || exit 1
ls "$WORK/zero3" "$WORK/zero3/checkpoint-000003"
cp "$WORK/zero3/log.jsonl" "$OUT/uninterrupted.jsonl"
rm -rf "$WORK/zero3/checkpoint-000006" "$WORK/zero3/final"
run resume.log resume=true || exit 1
cp "$WORK/zero3/log.jsonl" "$OUT/resumed.jsonl"
$py - "$OUT" "$WORK/zero3/final" <<'EOF'
import json, sys
import torch
import clex

out, final = sys.argv[1:]
a = [json.loads(line) for line in open(f"{out}/uninterrupted.jsonl")]
b = [json.loads(line) for line in open(f"{out}/resumed.jsonl")]
print("step  loss (uninterrupted)  loss (resumed from step 3)")
for x, y in zip(a, b):
    print(f"{x['step']:4d}  {x['loss']:.6f}  {y['loss']:.6f}  t={x.get('t')} / {y.get('t')}")
model = clex.load_model(final)
rotary = clex.get_clex_rotary(model)
ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0)).to(model.device)
with torch.no_grad():
    loss = model(ids, labels=ids).loss.item()
report = {"steps": [x["step"] for x in a], "uninterrupted": [x["loss"] for x in a], "resumed": [y["loss"] for y in b],
          "max_abs_diff_after_resume": max(abs(x["loss"] - y["loss"]) for x, y in zip(a[3:], b[3:])) if len(a) > 3 else None,
          "loaded": type(model).__name__, "max_factor": rotary.config.max_factor, "random_token_loss": loss}
print(json.dumps(report, indent=2))
json.dump(report, open(f"{out}/zero3.json", "w"), indent=2)
EOF
echo "== total: $((SECONDS - T0)) s"
