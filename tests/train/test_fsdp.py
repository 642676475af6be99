"""FSDP + LoRA with bf16 mixed precision on the CPU (torch's FSDP1 on gloo, one process, NO_SHARD as accelerate's
configs/accelerate/fsdp.yaml makes it on one GPU; accelerate itself builds FSDP on GPUs only): the training loop's
policy keeps the CLEX rotary (ODE weights, θ⁰, solved frequencies) in float32 as DDP's autocast does, and the
first steps' losses and gradients match a run without FSDP within bf16 noise, all finite."""

import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

SCRIPT = r"""
import os, sys, functools, json
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
torch.set_num_threads(1)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from clex.core.rotary_embedding import CLEXRotaryEmbedding
from clex.data.presets import build_model
from clex.hf.lookup import find_rotary
from clex.hf.methods import prepare_model
from clex.train.config import TrainConfig
from clex.train.distributed import float32_rotary_policy, nonfinite_gradients
from clex.train.loop import _select_trainable

BF16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)

def run(mode):
    cfg = TrainConfig(model="micro-llama", factor=4, train="lora", lr=1e-3, clex_lr=1e-3, seq_len=32, pose=True)
    model, _ = build_model(cfg.model, seed=0)
    prepare_model(model, "clex", factor=cfg.factor, clex=cfg.clex_config(), pose=True)
    model.train()
    model, groups = _select_trainable(model, cfg)
    rotary = find_rotary(model)[1]
    seen = {}
    def note(m, args, out):  # returns None: the output stays
        seen.setdefault("dtypes", (str(m.inv_freq.dtype), str(m.dynamics.ode_up_proj.dtype)))
    rotary.register_forward_hook(note)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    if mode != "none":
        policy = BF16 if mode == "accelerate-policy" else float32_rotary_policy(BF16)
        model = FSDP(model, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True, mixed_precision=policy,
                     auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}),
                     device_id=torch.device("cpu"))
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    losses, norms = [], []
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        assert not nonfinite_gradients(model), nonfinite_gradients(model)
        norm = model.clip_grad_norm_(1.0) if mode != "none" else torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        losses.append(float(loss)); norms.append(float(norm))
    return {"losses": losses, "norms": norms, "dtypes": seen["dtypes"]}

print(json.dumps({mode: run(mode) for mode in ("none", "clex-policy", "accelerate-policy")}))
dist.destroy_process_group()
"""


def test_fsdp_lora_keeps_the_clex_rotary_in_float32_and_trains_like_no_fsdp(tmp_path):
    import json
    import os
    import random

    pytest.importorskip("peft")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = str(random.randint(30000, 39000))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, port], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    plain, ours, stock = runs["none"], runs["clex-policy"], runs["accelerate-policy"]
    assert ours["dtypes"] == ["torch.float32", "torch.float32"]  # θ⁰ and the ODE weights, as under DDP's autocast
    assert stock["dtypes"] == ["torch.bfloat16", "torch.bfloat16"]  # what accelerate's bf16 policy alone gives
    for run in (plain, ours):
        assert all(x == x and abs(x) != float("inf") for x in run["losses"] + run["norms"])
    for a, b in zip(plain["losses"], ours["losses"]):
        assert abs(a - b) <= 0.02 * abs(a), (plain["losses"], ours["losses"])  # bf16 noise
