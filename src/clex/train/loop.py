"""Fine-tuning: CLEX and the baselines in one loop, on one process or many (accelerate: DDP, FSDP, DeepSpeed).

``finetune(config, **overrides) -> out_dir/final`` is the Python API (:func:`run` takes a TrainConfig as it is);
``main("recipe.yaml", "steps=100", ...)`` is ``clex train`` and ``python -m clex.train`` (one grammar:
``[CONFIG] [KEY=VALUE ...]``). Under ``accelerate launch`` the same code runs on every process (configs in
``configs/accelerate/``).

What a step is: ``grad_accum`` micro-batches per process, each ``batch_size`` packed rows of ``seq_len``
tokens. Rows come from an endless stream of shuffled epochs (order from (seed, epoch)), rank r taking its
slice of each global micro-batch; the stream position is all that resuming needs.

The CLEX t: the rotary module draws one t per training forward from (clex seed, draw counter), so it is the
same on every rank. Each micro-batch is a forward, so with ``grad_accum`` > 1 one optimizer step averages
the gradients of ``grad_accum`` different t (more t per step, and the same t sequence whatever the number of
processes); the counter is checkpointed. At t = 1 the rotary keeps the ODE weights in the graph with a zero
gradient, so DDP's unused-parameter check never fires.

out_dir: a fresh run into one that holds a run (final/, log.jsonl, config.yaml, checkpoint-*) is refused
unless ``overwrite=true`` (which removes those first); ``resume=true`` needs a complete checkpoint there and
takes the newest usable one (a damaged one is skipped with a warning) (:mod:`clex.train.rundir`); checkpoints
are never unpickled (:mod:`clex.train.checkpoints`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..core.checks import check_fits, solve_bytes
from ..core.io import atomic_write_text, follow_umask
from ..core.policies import step_generator
from ..core.rotary_embedding import CLEXRotaryEmbedding
from ..data.presets import build_model, count_parameters
from ..hf.compat import set_activation_checkpointing
from ..hf.lookup import find_rotary
from ..hf.methods import original_length_of, pose_position_ids, prepare_model
from ..hf.t_adapter import TAdapter
from . import lora
from .checkpoints import resume_checkpoint, save_checkpoint
from .config import TrainConfig, read_config_file
from .distributed import (
    deepspeed_fill,
    fsdp_float32_rotary,
    make_accelerator,
    nonfinite_gradients,
    zero3_external_params,
)
from .packing import prepare_data, rows_at
from .rundir import (
    check_out_dir,
    check_resume_config,
    previous_run,
    remove_previous_run,
    trim_log,
)

__all__ = ["TrainConfig", "finetune", "run", "main"]


def lr_schedule(optimizer, kind: str, *, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine to 0 / linear to 0 / constant until ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _select_trainable(model, config: TrainConfig):
    """Freeze what ``config.train`` leaves out; LoRA wraps the model with peft.
    -> (model, optimizer parameter groups: the model's trainable weights, then the ODE weights at clex_lr)"""
    clex_params, t_functions, t_weights = [], [], []
    _, rot = find_rotary(model)
    if isinstance(rot, CLEXRotaryEmbedding):
        clex_params = list(rot.dynamics.parameters())
        adapters = [m for m in model.modules() if isinstance(m, TAdapter)]
        t_functions = [rot.temperature] * (rot.temperature is not None) + [a.gate_power for a in adapters]
        t_weights = [p for a in adapters for p in (a.down, a.up)]
    if config.train == "lora":
        model = lora.wrap(
            model,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            targets=config.lora_targets,
        )
    elif config.train == "clex":
        for p in model.parameters():
            p.requires_grad_(False)
    if config.clex_lr == 0:  # frozen: θ(t) is the prior's (the ODE still runs, without a backward)
        for p in clex_params:
            p.requires_grad_(False)
        clex_params = []
    for p in clex_params + t_functions + (t_weights if config.train != "clex" else []):
        p.requires_grad_(True)  # the ODE weights and the learned functions of t train in every mode
    own = {id(p) for p in clex_params + t_functions}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in own]}]
    if clex_params:  # their own groups, for their own lr
        groups.append({"params": clex_params, "lr": config.clex_lr or config.lr})
    if t_functions:
        groups.append({"params": t_functions, "lr": config.t_lr or config.lr})
    return model, [g for g in groups if g["params"]]


def _evaluate(model, accelerator, eval_rows, config: TrainConfig) -> float:
    """Mean held-out loss over the first eval_batches * batch_size rows, split over the processes."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = min(config.eval_batches * config.batch_size, eval_rows.shape[0]) // world
    if per_rank == 0:
        return float("nan")
    mine = eval_rows[rank * per_rank : (rank + 1) * per_rank]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [sum of loss x rows, rows]
    model.eval()
    with torch.no_grad():
        for i in range(0, per_rank, config.batch_size):
            batch = mine[i : i + config.batch_size].to(accelerator.device)
            loss = model(input_ids=batch, labels=batch).loss
            total += torch.tensor(
                [float(loss) * batch.shape[0], batch.shape[0]], dtype=torch.float64, device=total.device
            )
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def _check_fits(model, config: TrainConfig, device) -> None:
    """Refuse, before the first step, a batch or a factor that cannot fit in the memory free on ``device``: a
    lower bound of one micro-batch (its float32 logits and two hidden states a layer) and of CLEX's ODE solve
    (one step of time_dt at most, kept for the backward, up to max_factor)."""
    from ..hf.lookup import text_config

    cfg = text_config(model)
    width = cfg.vocab_size + 2 * cfg.num_hidden_layers * cfg.hidden_size
    check_fits(
        "batch_size x seq_len",
        f"{config.batch_size} x {config.seq_len}",
        4 * config.batch_size * config.seq_len * width,
        device=device,
        hint="lower batch_size (raise grad_accum for the same global batch) or seq_len",
    )
    _, rotary = find_rotary(model)
    if isinstance(rotary, CLEXRotaryEmbedding):
        c = rotary.config
        steps = math.ceil((c.max_factor - 1) / c.time_dt) + 1
        check_fits(
            "factor (CLEX max_factor)",
            f"{c.max_factor:g}",
            solve_bytes(steps, rotary.inv_freq.numel()),
            hint=f"each step solves the ODE from t = 1 in steps of time_dt = {c.time_dt:g}: lower it or raise time_dt",
        )


def run(config: TrainConfig) -> Path:
    """Fine-tune a model as ``config`` says; returns the folder of the final model (out_dir/final).

    Args:
        config: every setting of the run (:class:`clex.TrainConfig`); :func:`finetune` builds it from a file,
            a dict or keyword arguments

    Returns:
        ``out_dir/final``: a transformers folder with the tokenizer (CLEX: ``rope_parameters`` of type "clex"),
        loadable with :func:`clex.load_model`.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if not isinstance(config, TrainConfig):
        raise ValueError(f"run() takes a TrainConfig, got {type(config).__name__}")
    out_dir = Path(config.out_dir)
    check_out_dir(config, out_dir)
    accelerator = make_accelerator(config)
    main_proc, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    set_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)

    # --- model, method, data ---
    model, tokenizer = build_model(config.model, seed=config.seed)
    original_length = original_length_of(model)
    clex_config = config.clex_config() if config.method == "clex" else None  # the one place it is built
    prepare_model(
        model, config.method, factor=config.factor, clex=clex_config, rope=config.rope or None, pose=config.pose
    )
    _, rotary = find_rotary(model)
    rotary = rotary if isinstance(rotary, CLEXRotaryEmbedding) else None
    _check_fits(model, config, accelerator.device)
    if config.gradient_checkpointing:
        set_activation_checkpointing(model)
        model.config.use_cache = False
    model.train()
    model, groups = _select_trainable(model, config)
    rows, eval_rows = prepare_data(
        config.data, tokenizer, config.seq_len, held_out=config.held_out, seed=config.seed, text_field=config.text_field
    )

    # --- optimiser and schedule (the paper's: AdamW, lr 2e-5, 3% warmup, cosine, no weight decay) ---
    optimizer = torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay
    )
    deepspeed_fill(accelerator, config)
    sizes = count_parameters(model), sum(p.numel() for g in groups for p in g["params"])  # before FSDP/ZeRO-3 shard
    fsdp_float32_rotary(accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    # made on the prepared optimizer (DeepSpeed may swap in its own); stepped by us once per optimizer step.
    # Not registered with accelerate (that would pickle it): checkpoints save its numbers as JSON.
    scheduler = lr_schedule(
        optimizer, config.schedule, warmup=math.ceil(config.warmup_ratio * config.steps), steps=config.steps
    )
    zero3_external_params(accelerator, rotary)

    # --- fresh start (the previous run removed only now: everything above could still refuse) or resume ---
    if config.overwrite and not config.resume:
        if main_proc and previous_run(out_dir):
            print(f"clex train: overwrite=true: removing the previous run in {out_dir}", flush=True)
            remove_previous_run(out_dir)
        accelerator.wait_for_everyone()
    state = {"step": 0, "data_position": 0, "draws": 0, "tokens": 0}
    ckpt = None
    if config.resume:
        check_resume_config(out_dir, config)
        ckpt, state = resume_checkpoint(accelerator, out_dir, scheduler)
        if rotary is not None:
            rotary.draws = state["draws"]
    log_file = out_dir / "log.jsonl"
    if main_proc:
        out_dir.mkdir(parents=True, exist_ok=True)
        dataclasses.replace(config, overwrite=False).write_yaml(out_dir / "config.yaml")  # the run, not the how
        trim_log(log_file, state["step"]) if ckpt is not None else atomic_write_text(log_file, "")
        print(
            f"clex train: {config.model} ({sizes[0] / 1e6:.2f}M parameters, "
            f"{sizes[1] / 1e6:.3f}M trained), method {config.method}"
            f"{' + pose' if config.pose else ''}, L {original_length}, factor {config.factor:g}, {rows.shape[0]} rows of "
            f"{config.seq_len}, {world} process(es)" + (f"; resumed from {ckpt.name}" if ckpt else ""),
            flush=True,
        )
    if config.tensorboard:
        accelerator.init_trackers(
            "clex", config={k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        )

    # --- the loop ---
    B, n, accum = config.batch_size, config.seq_len, config.grad_accum
    tokens_per_step = B * n * accum * world
    bar = tqdm(
        total=config.steps,
        initial=state["step"],
        disable=not main_proc,
        desc=f"train {config.method}",
        dynamic_ncols=True,
    )
    window_loss, window_t, window_steps, window_start = [], [], 0, time.perf_counter()
    for step in range(state["step"] + 1, config.steps + 1):
        step_losses = []
        for micro in range(accum):
            batch = rows_at(rows, state["data_position"] + rank * B, B, config.seed).to(accelerator.device)  # [B, n]
            state["data_position"] += B * world
            inputs = {"input_ids": batch, "labels": batch}
            if config.pose and rotary is None:  # PoSE for the other methods: skip-wise position ids over L * factor
                gen = step_generator(config.seed + 1, (step - 1) * accum + micro)
                inputs["position_ids"] = pose_position_ids(B, n, round(original_length * config.factor), gen).to(
                    accelerator.device
                )
            with accelerator.accumulate(model):
                loss = model(**inputs).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    # the wrapped model's parameters (frozen ones have no gradient, so the norm is the trained
                    # ones'): under FSDP accelerate clips through the model only when handed exactly these
                    norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    if norm is not None and not math.isfinite(float(norm)):  # the step would make the weights nan
                        bad = nonfinite_gradients(model)
                        raise RuntimeError(
                            f"step {step}: the gradient norm is {float(norm)} ({accelerator.distributed_type.value}, "
                            f"dtype {config.dtype}, train={config.train}); non-finite gradients in {len(bad)} "
                            f"parameter(s), e.g. {bad[:3]}; stopped before the optimizer step, the checkpoints in "
                            f"{out_dir} are kept"
                        )
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss.detach().float())
            if rotary is not None:
                window_t.append(float(rotary.last_t[0]))
        state["step"], state["tokens"] = step, state["tokens"] + tokens_per_step
        state["draws"] = rotary.draws if rotary is not None else 0
        step_loss = float(accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean"))
        if not math.isfinite(step_loss):  # every later step would be nan too: stop, keep the checkpoints
            raise RuntimeError(
                f"step {step}: the training loss is {step_loss} ({accelerator.distributed_type.value}, "
                f"dtype {config.dtype}, train={config.train}); stopped, the checkpoints in {out_dir} are kept"
            )
        window_loss.append(step_loss)
        window_steps += 1
        postfix = {"loss": f"{step_loss:.3f}"}
        if rotary is not None:
            postfix["t"] = f"{window_t[-1]:g}"

        record = None
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step,
                "loss": sum(window_loss) / len(window_loss),
                "lr": scheduler.get_last_lr()[0],
                "tokens": state["tokens"],
                "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
            }
            if rotary is not None:  # every rank's t of every micro-batch in the window: [world, steps x accum]
                ts = accelerator.gather(torch.tensor([window_t], dtype=torch.float64, device=accelerator.device))
                record["t"] = window_t
                record["t_ranks"] = ts.tolist()
            if accelerator.device.type == "cuda":  # this rank's peak since the start, GiB (scale-out tables)
                record["max_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
            window_loss, window_t, window_steps, window_start = [], [], 0, time.perf_counter()
        if eval_rows is not None and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
            record = record or {"step": step}
            record["eval_loss"] = _evaluate(model, accelerator, eval_rows, config)
            postfix["eval"] = f"{record['eval_loss']:.3f}"
        if record is not None and main_proc:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        if record is not None and config.tensorboard:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=step)
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if config.save_every and (step % config.save_every == 0 or step == config.steps):
            save_checkpoint(accelerator, out_dir, step, dict(state), keep=config.keep_checkpoints, scheduler=scheduler)
    bar.close()

    # --- the final model: plain transformers folder (CLEX: rope_parameters type "clex") + tokenizer ---
    final = out_dir / "final"
    accelerator.wait_for_everyone()
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    if config.train == "lora" and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # sharded weights cannot be merged in place: gather them, merge the state dict (clex.train.lora)
        full = accelerator.get_state_dict(model)
        if config.save_adapter and main_proc:
            lora.save_adapter(unwrapped, final / "adapter", state_dict=full)
        state_dict = lora.merge_state_dict(full, rank=config.lora_rank, alpha=config.lora_alpha) if main_proc else None
        unwrapped = unwrapped.get_base_model()
    elif config.train == "lora":
        if config.save_adapter and main_proc:
            lora.save_adapter(unwrapped, final / "adapter")
        unwrapped = unwrapped.merge_and_unload()
        state_dict = None if world == 1 else accelerator.get_state_dict(unwrapped)
    else:
        state_dict = accelerator.get_state_dict(model)
    unwrapped.save_pretrained(final, is_main_process=main_proc, save_function=accelerator.save, state_dict=state_dict)
    if main_proc:
        tokenizer.save_pretrained(final)
        dataclasses.replace(config, overwrite=False).write_yaml(final / "clex_train.yaml")
        follow_umask(final)  # safetensors writes 0600: the final model is as readable as the user's files
    if config.tensorboard:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return final


def finetune(config: TrainConfig | dict | str | Path | None = None, **overrides: object) -> Path:
    """Fine-tune a RoPE model with CLEX or a baseline (PI, NTK, YaRN, ...) and return the final model's folder.

        final = clex.finetune("recipes/tiny-clex.yaml", steps=100, out_dir="runs/mine")
        model = clex.load_model(final)

    One process here; the same run on several (DDP, FSDP, DeepSpeed) is ``accelerate launch ... -m clex.train
    CONFIG [KEY=VALUE ...]``. Checkpoints, the log and the resolved config go to ``out_dir``; a used out_dir is
    refused unless ``overwrite=True`` or ``resume=True``.

    Args:
        config: a :class:`clex.TrainConfig`, a dict of its fields, or a YAML/TOML file of them (e.g.
            "recipes/tiny-clex.yaml"); None: TrainConfig's defaults
        **overrides: TrainConfig fields set over ``config``, e.g. ``steps=100``, ``method="yarn"``,
            ``clex={"max_factor": 8}`` (a dict field is replaced whole)

    Returns:
        ``out_dir/final``: a transformers folder with the tokenizer (CLEX: ``rope_parameters`` of type "clex"),
        loadable with :func:`clex.load_model`.
    """
    if isinstance(config, TrainConfig):
        fields = config.to_dict()
    elif isinstance(config, dict):
        fields = dict(config)
    elif config is None or isinstance(config, (str, Path)):
        fields = read_config_file(config) if config is not None else {}
    else:
        raise ValueError(
            f"finetune's config must be a TrainConfig, a dict, a file path or None, got {type(config).__name__}"
        )
    return run(TrainConfig.from_dict({**fields, **overrides}))


def split_words(words) -> tuple[str | None, list[str]]:
    """``[CONFIG] [KEY=VALUE ...]`` -> (the config file or None, the overrides): the first word is the file when
    it holds no ``=``. The one grammar of ``clex train`` and ``python -m clex.train``."""
    words = [str(w) for w in words]
    return (words[0], words[1:]) if words and "=" not in words[0] else (None, words)


def main(*words: str, resume: bool = False, overwrite: bool = False) -> int:
    """Fine-tune a RoPE model with CLEX or a baseline (PI, NTK, YaRN, ...): clex train [CONFIG] [KEY=VALUE ...].

    CONFIG is a YAML or TOML file of TrainConfig fields (e.g. recipes/tiny-clex.yaml; none: the defaults); each
    KEY=VALUE sets one field over it, its value read as YAML (100, 1e-4, true, null, [q_proj, v_proj]);
    clex.KEY=VALUE and rope.KEY=VALUE set one entry of those two dict fields. `pose=true` adds PoSE positions to
    any method. The same words run on several processes: `accelerate launch --config_file
    configs/accelerate/{ddp,fsdp,deepspeed-zero3}.yaml -m clex.train CONFIG [KEY=VALUE ...]`, or on CPUs
    `torchrun --standalone --nproc_per_node N -m clex.train CONFIG [KEY=VALUE ...]`.

    Args:
        words: [CONFIG] [KEY=VALUE ...]: a YAML/TOML file of TrainConfig fields (optional), then overrides, e.g. recipes/tiny-clex.yaml steps=100 clex.max_factor=8
        resume: continue from the newest complete checkpoint in out_dir (an error if it has none)
        overwrite: replace the run already in out_dir: its final/, log, config and checkpoints, nothing else (else a fresh run into a used out_dir is refused)
    """
    path, overrides = split_words(words)
    flags = (["resume=true"] if resume else []) + (["overwrite=true"] if overwrite else [])
    cfg = TrainConfig.from_file(path, overrides + flags)
    final = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final model: {final}", flush=True)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m clex.train [CONFIG] [KEY=VALUE ...]`` (e.g. under accelerate launch or torchrun)."""
    return main(*(sys.argv[1:] if argv is None else argv))
