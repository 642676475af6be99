"""Training-step time (forward + backward + AdamW step): plain RoPE, YaRN and CLEX side by side, interleaved
rounds, medians and spread, ratios to plain RoPE; at two layer counts, to split the per-step from the
per-layer cost.

    python benchmarks/train_step.py [--shapes tiny] [--seq 128 512] [--layers 2 4] [--checkpointing off]
        [--rounds 32] [--variants plain ours ...] [--out results/bench/train_step.json]

    # the GPU run at LLaMA-2-7B's and a ~1B shape (one H200, about 4-6 minutes):
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --threads 0 --shapes llama2-7b tinyllama-1b \\
        --seq 4096 16384 --layers 2 max --checkpointing off on --rounds 5 --out experiments/speed/llama-7b-shape/train_step.json

Variants (any subset, plain always first):
- plain       the model's own RoPE
- yarn        transformers' YaRN at factor --max-factor (a cos/sin without gradients, like plain)
- ours-stock-rotation   CLEX with CLEXConfig's defaults, each layer's rotation by stock autograd
                        (apply_clex(fused_rotation="off")): the backward into cos/sin costs two products and
                        two reductions over the heads per tensor per layer
- ours        CLEX with the defaults of CLEXConfig and apply_clex: the fused rotation (clex.core.fused_rotation;
              one Triton kernel per layer on a GPU, eager torch on a CPU)
- ours-fused-torch      the fused rotation's eager-torch backward (on a GPU too)
- reference   CLEX as the authors compute it: rk4 at uniform steps of 0.01 on the full right-hand side,
              backpropagation through every step, stock rotation
- ours-solve-on-model-device   ours with solve_device="model"
- ours-recommended   ours with the CLEXConfig fields of the recommended recipe (clex.recipes.RECOMMENDED: prior,
                     mscale, angle_cap, past_max, ...) at --max-factor
- ours-far    ours with the far recipe's (clex.recipes.FAR: log_scale instead of mscale, t drawn P(t) ∝ t²: its own
              t draws, so its ODE solves reach larger t than the other variants')
- ours-far-frozen-ode   ours-far with the ODE weights frozen (TrainConfig.clex_lr=0: θ(t) the prior's, no backward
              through the solve)
- ours-far-adapters     ours-far with rank-8 t-conditioned adapters on q_proj and o_proj (their forward hooks on only
              while it runs) and t as an even sequence with P(t) ∝ t²
- ours-every  ours-far-adapters with the learned temperature too (experiments/one-model-every-length/every.yaml; the
              temperature needs the stock rotation's backward, so apply_clex turns the fused rotation off)

All variants share ONE model (the same weights, one AdamW over everything): a variant is a rotary module
swapped in, so that a 7B-shaped model fits once, not once per variant. Every CLEX variant draws the same t
in {1, ..., max_factor} (and positions) each round, from the same seed. Each case (shape, tokens,
checkpointing) runs the variants at the two ``--layers`` counts (``max``: as many layers as fit, estimated from
the free memory, retried with fewer on an out-of-memory; capped at the shape's own depth), interleaved in one
loop of rounds; per variant, per-layer cost = the slope between the two counts, per-step cost = the rest, and
the ratio projected to the shape's full depth. A fresh AdamW per case, so only the layers run hold states.
The JSON and a Markdown table are rewritten after every case (an interrupted run keeps what it measured).

``--threads 1`` (the default) because on a shared CPU a second intra-op thread makes every parallel region
wait for a scheduler slice (seen here: 54 ms per tiny step with 1 thread, 296 with 2).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import (
    LLAMA2_7B,
    SMOLLM2,
    TINY,
    TINYLLAMA_1B,
    autocast,
    llama,
    markdown_table,
    median,
    parser,
    sync,
    use_device,
    write_json,
)  # noqa: E402

import clex  # noqa: E402
import clex.recipes  # noqa: E402
from clex.hf.compat import set_activation_checkpointing  # noqa: E402
from clex.hf.methods import METHODS  # noqa: E402
from clex.hf.t_adapter import attach_t_adapters  # noqa: E402

SHAPES = {"tiny": TINY, "smollm2-135m": SMOLLM2, "tinyllama-1b": TINYLLAMA_1B, "llama2-7b": LLAMA2_7B}
#: variant -> (kind, CLEXConfig overrides, apply_clex's fused_rotation or None for its default)
VARIANTS = {
    "plain": ("plain", None, None),
    "yarn": ("yarn", None, None),
    "ours-stock-rotation": ("clex", {}, "off"),
    "ours": ("clex", {}, None),
    "ours-fused-torch": ("clex", {}, "torch"),
    "reference": ("clex", dict(method="rk4", time_dt=0.01, log_dt=None, formulation="reference"), "off"),
    "ours-solve-on-model-device": ("clex", dict(solve_device="model"), None),
    # the recipes' CLEXConfig fields (clex.recipes), at the benchmark's max_factor
    "ours-recommended": ("clex", dict(clex.recipes.get("recommended").clex), None),
    "ours-far": ("clex", dict(clex.recipes.get("far").clex), None),
    "ours-far-frozen-ode": ("clex-frozen-ode", dict(clex.recipes.get("far").clex), None),
    "ours-far-adapters": (
        "clex",
        {**clex.recipes.get("far").clex, "train_t": "integer-quadratic-even", "adapter_rank": 8},
        None,
    ),
    "ours-every": (
        "clex",
        {**clex.recipes.get("far").clex, "train_t": "integer-quadratic-even", "mscale": "learned", "adapter_rank": 8},
        None,
    ),
}


class SharedModel:
    """One random model of a shape with ``depth`` layers and a rotary module per variant, swapped in by :meth:`use`."""

    def __init__(self, shape: dict, depth: int, variants: list[str], *, max_factor: float, seed: int = 0):
        self.shape = shape
        self.model = llama(shape, seed=seed, num_hidden_layers=depth).train()
        self.inner = self.model.model
        self.layers = self.inner.layers
        plain = self.inner.rotary_emb
        self.attention = [m for m in self.model.modules() if type(m).__name__.endswith("Attention")]
        base_scaling = [a.scaling for a in self.attention]
        self.rotaries = {}
        for v in variants:
            kind, overrides, fused = VARIANTS[v]
            self.inner.rotary_emb = plain
            if kind == "yarn":
                cfg = self.model.config
                saved = (copy.deepcopy(cfg.rope_parameters), cfg.max_position_embeddings)
                METHODS["yarn"](self.model, factor=max_factor)
                cfg.rope_parameters, cfg.max_position_embeddings = saved
            elif kind.startswith("clex"):
                torch.manual_seed(seed + 1)  # the same ODE init for every CLEX variant
                kwargs = {} if fused is None else {"fused_rotation": fused}
                clex.apply_clex(self.model, clex.CLEXConfig(max_factor=max_factor, seed=seed, **overrides), **kwargs)
                if kind == "clex-frozen-ode":
                    self.inner.rotary_emb.dynamics.requires_grad_(False)
            self.rotaries[v] = self.inner.rotary_emb
            if kind.startswith("clex"):  # where the fused rotation runs (none: transformers' function is not LLaMA's)
                print(
                    f"{v}: fused rotation {self.rotaries[v].fused_rotation!r} in "
                    f"{getattr(self.rotaries[v], 'fused_rotation_modules', ())}",
                    file=sys.stderr,
                )
        self.base_scaling = base_scaling
        self.inner.rotary_emb = plain
        self.ids = None

    def use(self, variant: str, layers: int) -> None:
        self.inner.rotary_emb = self.rotaries[variant]
        for v, rotary in self.rotaries.items():  # t-conditioned adapters: their hooks on for their variant only
            hooks = getattr(rotary, "_clex_t_adapters", None)
            if hooks is not None and v != variant:
                hooks.remove()
            elif hooks is not None and not hooks._handles:
                attach_t_adapters(self.model)
        for attn, s in zip(self.attention, self.base_scaling):  # a CLEX temperature must not leak into others
            attn.scaling = s
        self.inner.layers = self.layers[:layers]
        self.model.config.num_hidden_layers = layers

    def parameters(self):
        seen = {id(p): p for p in self.model.parameters()}
        for r in self.rotaries.values():
            seen.update({id(p): p for p in r.parameters()})
        return list(seen.values())

    def checkpointing(self, on: bool) -> None:
        self.inner.layers = self.layers  # every layer gets the flag
        set_activation_checkpointing(self.model, on)


def fit_layers(shape: dict, seq: int, batch: int, checkpointing: bool) -> int:
    """About how many layers fit the free device memory (bfloat16 autocast, AdamW), the model's float32
    weights being there already. A rough estimate; :func:`run_case` retries with fewer."""
    if common.DEVICE.type != "cuda":
        return shape["num_hidden_layers"]
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    tokens = seq * batch
    states = 14 * per_layer  # grad, two AdamW moments (float32) and autocast's bfloat16 copy, beyond the weight
    acts = tokens * (4 * h if checkpointing else 44 * h + 12 * i)  # bytes per layer kept for the backward
    fixed = 16 * 2 * v * h + 14 * tokens * v + tokens * (44 * h + 12 * i) + 2 * 2**30  # embeddings, logits, a layer
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(common.DEVICE)
    return max(1, int((0.92 * free - fixed) // (states + acts)))


def make_step(bench: SharedModel, opt, variant: str, layers: int, ids, dtype: str):
    def step():
        bench.use(variant, layers)
        with autocast(dtype):
            loss = bench.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_case(
    bench: SharedModel,
    name: str,
    seq: int,
    checkpointing: bool,
    layer_counts: list,
    *,
    batch: int,
    rounds: int,
    warmup: int,
    variants: list[str],
    dtype: str,
) -> dict:
    shape = bench.shape
    depth = len(bench.layers)
    small = int(layer_counts[0]) if layer_counts[0] != "max" else 1
    big = layer_counts[-1]
    big = min(depth, fit_layers(shape, seq, batch, checkpointing) if big == "max" else int(big))
    counts = sorted({min(small, big), big})
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(
        common.DEVICE
    )
    bench.checkpointing(checkpointing)
    if common.DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(common.DEVICE)
    while True:
        opt = torch.optim.AdamW(bench.parameters(), lr=1e-5, fused=common.DEVICE.type == "cuda")
        fns = {(v, n): make_step(bench, opt, v, n, ids, dtype) for n in counts for v in variants}
        try:
            for fn in fns.values():  # one untimed step each (AdamW states, kernels' compilation) before the rounds
                fn()
            times = common.interleaved(fns, rounds=rounds, warmup=max(0, warmup - 1))
            break
        except torch.OutOfMemoryError:
            if counts[-1] <= counts[0] + 1:
                raise
            next_big = max(counts[0] + 1, int(counts[-1] * 0.8))
            print(
                f"{name} seq {seq}: out of memory at {counts[-1]} layers, trying {next_big}",
                file=sys.stderr,
                flush=True,
            )
            counts = sorted({counts[0], next_big})
            del opt, fns
            bench.model.zero_grad(set_to_none=True)
            for r in bench.rotaries.values():
                r.zero_grad(set_to_none=True)
            if common.DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(common.DEVICE) / 2**30 if common.DEVICE.type == "cuda" else None
    del opt
    fused = {
        v: [r.fused_rotation, list(getattr(r, "fused_rotation_modules", ()))]
        for v, r in bench.rotaries.items()
        if hasattr(r, "fused_rotation")
    }
    out = {
        "model": name,
        "seq": seq,
        "batch": batch,
        "checkpointing": checkpointing,
        "layers": counts,
        "fused_rotation": fused,
        "full_depth": shape["num_hidden_layers"],
        "rounds": rounds,
        "dtype": dtype,
        "peak_gib": peak,
        "variants": {},
    }
    for v in variants:
        by_n = {}
        for n in counts:
            ts, base = times[(v, n)], times[("plain", n)]
            paired = [a / b for a, b in zip(ts, base)]  # per round: this variant / plain
            by_n[n] = {
                "median_s": median(ts),
                "min_s": min(ts),
                "max_s": max(ts),
                "mean_s": statistics.fmean(ts),
                "ratio_of_medians": median(ts) / median(base),
                "median_paired_ratio": median(paired),
                "paired_ratio_min": min(paired),
                "paired_ratio_max": max(paired),
            }
        entry = {"by_layers": by_n}
        if len(counts) == 2:
            (a, ta), (b, tb) = ((n, by_n[n]["median_s"]) for n in counts)
            per_layer = (tb - ta) / (b - a)
            entry.update(per_layer_s=per_layer, per_step_s=ta - a * per_layer)
        out["variants"][v] = entry
    if len(counts) == 2:
        plain = out["variants"]["plain"]
        full = shape["num_hidden_layers"]
        for e in out["variants"].values():
            e["extra_per_layer_s"] = e["per_layer_s"] - plain["per_layer_s"]
            e["extra_per_step_s"] = e["per_step_s"] - plain["per_step_s"]
            e["projected_full_depth_ratio"] = (e["per_step_s"] + full * e["per_layer_s"]) / (
                plain["per_step_s"] + full * plain["per_layer_s"]
            )
    return out


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        for v, e in r["variants"].items():
            for n, s in e["by_layers"].items():
                last = n == max(e["by_layers"])
                rows.append(
                    [
                        r["model"],
                        r["seq"],
                        "on" if r["checkpointing"] else "off",
                        n,
                        v,
                        s["median_s"] * 1e3,
                        f"{s['min_s'] * 1e3:.4g}-{s['max_s'] * 1e3:.4g}",
                        f"{s['median_paired_ratio']:.3f}x",
                        f"{s['paired_ratio_min']:.3f}-{s['paired_ratio_max']:.3f}",
                        f"{e['extra_per_layer_s'] * 1e3:+.3f}" if last and "extra_per_layer_s" in e else "",
                        f"{e['extra_per_step_s'] * 1e3:+.2f}" if last and "extra_per_step_s" in e else "",
                        f"{e['projected_full_depth_ratio']:.3f}x" if last and "projected_full_depth_ratio" in e else "",
                    ]
                )
    return markdown_table(
        [
            "model",
            "tokens",
            "ckpt",
            "layers",
            "variant",
            "median ms",
            "min-max ms",
            "median of paired ratios",
            "paired min-max",
            "extra ms / layer",
            "extra ms / step",
            "projected at full depth",
        ],
        rows,
    )


def main(argv=None):
    p = parser("train_step", __doc__)
    p.add_argument("--shapes", nargs="+", default=["tiny"], choices=list(SHAPES), help="model shapes (random init)")
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512], help="tokens per row")
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="two layer counts (per-layer slope between them) or one; 'max': as many as fit; default: the shape's own depth",
    )
    p.add_argument(
        "--checkpointing", nargs="+", default=["off"], choices=["off", "on"], help="gradient checkpointing, each"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=32, help="timed rounds (each variant and layer count once per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (the first also warms every step once)")
    p.add_argument("--max-factor", type=float, default=16.0, help="CLEX's max_factor (t ~ U{1..}), YaRN's factor")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--variants", nargs="+", default=["plain", "ours-stock-rotation", "ours"], choices=list(VARIANTS))
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder layer (all variants)")
    args = p.parse_args(argv)
    use_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["plain"] + [v for v in dict.fromkeys(args.variants) if v != "plain"]
    layer_counts = args.layers or ["max"]
    for c in layer_counts:
        if c != "max" and not (c.isdigit() and int(c) >= 1):
            raise SystemExit(f"--layers takes positive integers or 'max', got {c!r}")
    results, started = [], time.perf_counter()
    header = (
        f"Training step (forward + backward + AdamW), {args.device}, {args.dtype}, "
        f"{'compiled layers, ' * args.compile}batch {args.batch}, threads {torch.get_num_threads()}, "
        f"t ~ Uniform{{1..{args.max_factor:g}}} (YaRN factor {args.max_factor:g}), interleaved rounds"
    )
    for name in args.shapes:
        shape = SHAPES[name]
        depth = shape["num_hidden_layers"]
        if "max" not in layer_counts:
            depth = min(depth, max(int(c) for c in layer_counts))
        bench = SharedModel(shape, depth, variants, max_factor=args.max_factor)
        if args.compile:
            for layer in bench.layers:
                layer.compile()
        for seq in args.seq:
            for ckpt in args.checkpointing:
                r = run_case(
                    bench,
                    name,
                    seq,
                    ckpt == "on",
                    layer_counts,
                    batch=args.batch,
                    rounds=args.rounds,
                    warmup=args.warmup,
                    variants=variants,
                    dtype=args.dtype,
                )
                r["last_t"] = [
                    bench.rotaries[v].last_t[0].item() for v in variants if VARIANTS[v][0].startswith("clex")
                ][:1]
                results.append(r)
                print(
                    f"{name} seq {seq} checkpointing {ckpt} layers {r['layers']} done "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                md = f"{header}\n\n{table(results)}\n"
                write_json(args.out, {"benchmark": "train_step", "args": vars(args), "results": results, "table": md})
                Path(args.out).with_suffix(".md").write_text(md)
        del bench
        if common.DEVICE.type == "cuda":
            sync()
            torch.cuda.empty_cache()
    print(md)


if __name__ == "__main__":
    main()
