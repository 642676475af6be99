"""Decode time per token: CLEX with the exact key cache vs the same model with plain RoPE, side by side.

Variants (one set of weights; measured interleaved, round after round, in one process):

- ``plain``       the model with its own RoPE (no CLEX): the baseline.
- ``clex``        CLEX, ``enable_exact_cache`` (re-rotates the cached keys once per change of t).
- ``every_step``  CLEX, the whole key cache re-rotated at every step: the reference implementation's cost.
- ``stale``       CLEX without the exact cache (wrong after a change of t; shows the rotary's own cost).

At context n each round prefills n - W tokens (not timed), then times W greedy decode steps (a plain loop of
forwards with a DynamicCache, as ``generate`` runs them), so the keys per step are about n and the
re-rotations that fall in the window (one per L / t_resolution tokens) are paid inside the timing. The time
per token of a round is its total / W; the table reports the median over rounds and its ratio to ``plain``.

    python benchmarks/decode.py --out results/bench/decode.json          # a few minutes on a laptop CPU
    python benchmarks/decode.py --model smollm2 --factors 2 4 8 --device cuda --dtype bfloat16 --clock wall
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import clex  # noqa: E402
import clex.hf.lookup  # noqa: E402
from clex.hf import generation  # noqa: E402
from clex.hf.compat import cache_kwargs  # noqa: E402

VARIANTS = ("plain", "clex", "every_step", "stale")
#: thread CPU time (default) excludes the time the compute thread is descheduled, which dominates the noise
#: on a shared machine (torch runs single-threaded here, in this thread); wall is the usual clock.
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


#: SmolLM2-135M's shape (benchmarks/common.py) with this benchmark's own 512-token vocabulary and untied head
#: (the head is not what is measured)
SMOLLM2 = {k: v for k, v in common.SMOLLM2.items() if k not in ("vocab_size", "tie_word_embeddings")}


def build_models(args) -> dict:
    """One random LLaMA (from a config, no download) and its CLEX copies, all in eval mode, on args.device."""
    if args.model == "smollm2":
        shape = SMOLLM2
    else:
        shape = dict(
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            max_position_embeddings=args.L,
        )
    config = transformers.LlamaConfig(vocab_size=512, attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    plain = transformers.LlamaForCausalLM(config).eval().to(device=args.device, dtype=dtype)
    models = {"plain": plain}
    for name in VARIANTS[1:]:
        model = clex.apply_clex(copy.deepcopy(plain), max_factor=16, t_resolution=args.t_resolution)
        with torch.no_grad():  # a trained-looking ODE network
            weights = clex.get_clex_rotary(model).dynamics.ode_down_proj
            noise = torch.randn(weights.shape, generator=torch.Generator().manual_seed(1)) * 0.05
            weights.copy_(noise.to(weights.device, weights.dtype))
        if name != "stale":
            generation.enable_exact_cache(model, rerotate="every_step" if name == "every_step" else "on_change")
        models[name] = model
    return models


@torch.no_grad()
def decode_round(models: dict, ids: torch.Tensor, prompt: int, window: int, order: list, clock=time.thread_time):
    """Prefill ids[:, :prompt] in every model, then ``window`` greedy steps in lockstep: step k of every
    variant runs back to back (in ``order``), so all variants see the same machine load. -> seconds per token"""
    caches, tokens, spent = {}, {}, dict.fromkeys(models, 0.0)
    for name in ("plain", "clex"):  # the CLEX variants share weights and t: one prefill, copied
        caches[name] = transformers.DynamicCache()
        tokens[name] = models[name](ids[:, :prompt], **cache_kwargs(caches[name])).logits[:, -1:].argmax(-1)
    for name in VARIANTS[2:]:
        caches[name], tokens[name] = copy.deepcopy(caches["clex"]), tokens["clex"]
    for k in range(window):
        position = torch.full((ids.shape[0], 1), prompt + k, device=ids.device)
        for name in order:
            common.sync()
            start = clock()
            logits = models[name](tokens[name], position_ids=position, **cache_kwargs(caches[name])).logits
            tokens[name] = logits[:, -1:].argmax(-1)
            common.sync()
            spent[name] += clock() - start
    return {name: s / window for name, s in spent.items()}


def measure(models: dict, args) -> list[dict]:
    rows = []
    for factor in args.factors:
        n = int(factor * args.L)
        ids = torch.randint(3, 512, (args.batch, n), generator=torch.Generator().manual_seed(n)).to(args.device)
        prompt = n - args.window
        times = {name: [] for name in models}
        decode_round(models, ids, prompt, 4, list(models))  # warm-up: tables, allocator
        before = {name: _rerotations(m) for name, m in models.items()}
        for r in range(args.rounds):
            order = list(models)[r % len(models) :] + list(models)[: r % len(models)]  # rotate who goes first
            spent = decode_round(models, ids, prompt, args.window, order, CLOCKS[args.clock])
            for name, seconds in spent.items():
                times[name].append(seconds)
        base = statistics.median(times["plain"])
        for name, ts in times.items():
            med = statistics.median(ts)
            q1, _, q3 = statistics.quantiles(ts, n=4)
            ratios = [t / b for t, b in zip(ts, times["plain"])]  # per round: same load for both
            paired = statistics.median(ratios)
            r1, _, r3 = statistics.quantiles(ratios, n=4)
            changes = (_rerotations(models[name]) - before[name]) / args.rounds
            rows.append(
                dict(
                    factor=factor,
                    context=n,
                    variant=name,
                    ms_per_token=med * 1e3,
                    iqr_ms=(q3 - q1) * 1e3,
                    ratio_vs_plain=med / base,
                    paired_ratio_vs_plain=paired,
                    paired_ratio_iqr=[r1, r3],
                    rerotations_per_round=changes,
                    rounds=len(ts),
                    ms_per_token_rounds=[t * 1e3 for t in ts],
                )
            )
            line = f"{med * 1e3:7.3f} ms/token  x{med / base:.4f} (paired x{paired:.4f})"
            print(f"  {factor:g}x L ({n} keys) {name:>10}: {line}", file=sys.stderr)
    return rows


def _rerotations(model) -> int:
    rotary = clex.hf.lookup.find_rotary(model)[1]
    hooks = getattr(rotary, "_clex_exact_cache", None)
    return hooks.rerotations if hooks is not None else 0


def _shape_words(args) -> str:
    if args.model == "smollm2":
        return "SmolLM2-135M shape (30 layers, hidden 576, 9/3 heads)"
    return f"tiny LLaMA hidden {args.hidden}, {args.layers} layers"


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"Decode, ms per token (median of {args.rounds} rounds of {args.window} steps; ratio to plain RoPE: median "
        "over rounds of the per-round ratio, variants run in lockstep); "
        f"{_shape_words(args)}, L = {args.L}, batch {args.batch}, {args.device}, {args.dtype}, "
        f"t_resolution {args.t_resolution} (t changes every {args.L / args.t_resolution:g} tokens), "
        f"{torch.get_num_threads()} thread(s), {args.clock} clock",
        "",
        "| context | plain RoPE | CLEX exact cache | ratio | every-step re-rotation | ratio "
        "| CLEX stale (no fix) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for factor in args.factors:
        r = {x["variant"]: x for x in rows if x["factor"] == factor}
        cells = [f"{factor:g}x L ({r['plain']['context']})", f"{r['plain']['ms_per_token']:.3f}"]
        for name in VARIANTS[1:]:
            cells += [f"{r[name]['ms_per_token']:.3f}", f"{r[name]['paired_ratio_vs_plain']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/bench/decode.json"))
    p.add_argument(
        "--model", default="tiny", choices=["tiny", "smollm2"], help="smollm2: SmolLM2-135M's shape, L = 8192"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cuda needs --clock wall)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and cache dtype")
    p.add_argument("--L", type=int, default=512, help="original context length of the tiny model (smollm2: 8192)")
    p.add_argument("--factors", type=float, nargs="+", default=[1, 4, 8], help="context lengths, in multiples of L")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--t-resolution", type=int, default=16, help="CLEXConfig.t_resolution (t changes every L/r tokens)")
    p.add_argument("--window", type=int, default=64, help="decode steps timed per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (cpu clock: 1, so all work is timed)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: thread CPU time; wall: elapsed")
    args = p.parse_args(argv)
    if args.model == "smollm2":
        args.L = SMOLLM2["max_position_embeddings"]
    args.device = common.use_device(args.device)  # a clear error when CUDA is asked for and absent
    if args.device.type == "cuda" and args.clock != "wall":
        p.error("--device cuda: the GPU works asynchronously, a thread clock does not see it; use --clock wall")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu times this thread only: use --threads 1, or --clock wall")
    if args.window >= args.L * min(args.factors):
        p.error(f"--window must be < the shortest context ({args.L * min(args.factors):g}), got {args.window}")
    torch.set_num_threads(args.threads)
    models = build_models(args)
    rows = measure(models, args)
    table = markdown(rows, args)
    print(table)
    result = dict(
        benchmark="decode",
        args={k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()},
        rows=rows,
        markdown=table,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        processor=platform.processor(),
        command=" ".join(sys.argv),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
