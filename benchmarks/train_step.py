"""Training-step time (forward + backward + AdamW step): plain RoPE vs CLEX as the reference computes it vs
CLEX with our defaults, measured side by side (interleaved rounds), as ratios to plain RoPE.

    python benchmarks/train_step.py [--seq 128 512] [--rounds 32] [--smollm2 [--smollm2-seq 1024]] [--out ...]

- plain      the model with its own RoPE
- reference  CLEX, rk4 at uniform steps of 0.01 on the full right-hand side (torchdiffeq, float32),
             backpropagation through every step: the authors' computation
- ours       CLEX with CLEXConfig's defaults (rk4-fused on the graded grid, see clex.solve; the solve on the
             host, solve_device="cpu")
- ours-solve-on-model-device   the same with solve_device="model" (on a GPU: the solve's kernels on the GPU)
- ours-recommended   CLEX with the recommended recipe's options (prior, mscale, angle_cap, past_max)

Both CLEX variants draw the same t in {1, ..., max_factor} (and positions) each round, from the same seed.
Models: the tiny demo-sized LLaMA (benchmarks/common.py: TINY, L = 128) and, with --smollm2, SmolLM2-135M's
shape (random init). ``--threads 1`` (the default) because on a shared CPU a second intra-op thread makes
every parallel region wait for a scheduler slice (seen here: 54 ms per tiny step with 1 thread, 296 with 2).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import (  # noqa: E402
    SMOLLM2,
    TINY,
    autocast,
    interleaved,
    llama,
    markdown_table,
    median,
    parser,
    summary,
    use_device,
    write_json,
)

import clex  # noqa: E402

VARIANTS = {
    "plain": None,
    "reference": dict(method="rk4", time_dt=0.01, log_dt=None, formulation="reference"),
    "ours": {},
    "ours-solve-on-model-device": dict(solve_device="model"),
    # the recommended recipe (README "CLEX past 4x"): yarn prior, yarn temperature, angle cap, prior past max
    "ours-recommended": dict(prior="yarn", mscale="yarn", angle_cap=True, past_max="prior"),
}


def make_step(shape: dict, variant: str, seq: int, *, batch: int, max_factor: float, dtype: str = "float32",
              seed: int = 0, compile_layers: bool = False):
    """A closure doing one training step of a fresh model (same init for every variant). compile_layers:
    torch.compile each decoder layer (the rotary module, with its per-step t draw, stays eager)."""
    model = llama(shape, seed=seed).train()
    if VARIANTS[variant] is not None:
        clex.apply_clex(model, clex.CLEXConfig(max_factor=max_factor, seed=seed, **VARIANTS[variant]))
    if compile_layers:
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(common.DEVICE)

    def step():
        with autocast(dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rotary = clex.get_clex_rotary(model) if VARIANTS[variant] is not None else None
    return step, rotary


def run(name: str, shape: dict, seq: int, *, batch: int, rounds: int, warmup: int, max_factor: float, variants,
        dtype: str = "float32", compile_layers: bool = False):
    steps, rotaries = {}, {}
    for v in variants:
        steps[v], rotaries[v] = make_step(shape, v, seq, batch=batch, max_factor=max_factor, dtype=dtype,
                                          compile_layers=compile_layers)
    times = interleaved(steps, rounds=rounds, warmup=warmup)
    ts = [r.last_t[0].item() for r in rotaries.values() if r is not None][:1]
    base = times["plain"]
    out = {"model": name, "seq": seq, "batch": batch, "rounds": rounds, "dtype": dtype, "compiled": compile_layers,
           "variants": {}}
    for v in variants:
        paired = [a / b for a, b in zip(times[v], base)]  # per round: this variant / plain
        out["variants"][v] = {
            **summary(times[v]), "mean_s": statistics.fmean(times[v]),
            "ratio_of_medians": median(times[v]) / median(base),
            "ratio_of_means": statistics.fmean(times[v]) / statistics.fmean(base),
            "median_paired_ratio": median(paired),
        }  # fmt: skip
    out["last_t"] = ts
    return out


def main(argv=None):
    p = parser("train_step", __doc__)
    p.add_argument("--seq", type=int, nargs="*", default=[128, 512], help="sequence lengths of the tiny model (none: skip it)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=32, help="timed rounds (each variant once per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-factor", type=float, default=16.0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--smollm2", action="store_true", help="also the SmolLM2-135M-sized model (slow on a CPU)")
    p.add_argument("--smollm2-seq", type=int, nargs="+", default=[1024])
    p.add_argument("--smollm2-rounds", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=["plain", "reference", "ours"], choices=list(VARIANTS))
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder layer (all variants)")
    args = p.parse_args(argv)
    use_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["plain"] + [v for v in args.variants if v != "plain"]

    jobs = [("tiny", TINY, s, args.rounds) for s in args.seq]
    if args.smollm2:
        jobs += [("smollm2-135m", SMOLLM2, s, args.smollm2_rounds) for s in args.smollm2_seq]
    results, rows = [], []
    for name, shape, seq, rounds in jobs:
        r = run(name, shape, seq, batch=args.batch, rounds=rounds, warmup=args.warmup,
                max_factor=args.max_factor, variants=variants, dtype=args.dtype, compile_layers=args.compile)  # fmt: skip
        results.append(r)
        for v, s in r["variants"].items():
            rows.append([name, seq, v, s["median_s"] * 1e3, s["mean_s"] * 1e3, f"{s['ratio_of_medians']:.3f}x",
                         f"{s['ratio_of_means']:.3f}x", f"{s['median_paired_ratio']:.3f}x"])  # fmt: skip
        print(f"{name} seq {seq} done", file=sys.stderr, flush=True)
    table = markdown_table(["model", "seq", "variant", "median ms", "mean ms", "median / plain", "mean / plain",
                            "median of paired ratios"], rows)  # fmt: skip
    print(f"Training step (forward + backward + AdamW), {args.device}, {args.dtype}, {'compiled layers, ' * args.compile}batch {args.batch}, threads {torch.get_num_threads()}, "
          f"t ~ Uniform{{1..{args.max_factor:g}}}, interleaved rounds\n\n{table}")  # fmt: skip
    write_json(args.out, {"benchmark": "train_step", "args": vars(args), "results": results, "table": table})


if __name__ == "__main__":
    main()
