"""Prefill time (one no-grad forward over a whole prompt) at 1x, 4x, 8x L: CLEX vs plain RoPE, side by side;
the one-off θ-table build of each solver; peak memory of each prefill (in a fresh process each).

    python benchmarks/prefill.py [--factors 1 4 8] [--rounds 20] [--no-memory] [--out ...]
    python benchmarks/prefill.py --model smollm2 --tokens 2048 4096 8192 16384 --device cuda --dtype bfloat16

At inference CLEX reads θ(t) from a table over t built by ONE solve and cached until the ODE weights change,
so a prefill costs what plain RoPE costs plus a lookup. Tiny demo-sized LLaMA (benchmarks/common.py: TINY,
L = 128) or SmolLM2-135M's shape (``--model smollm2``, L = 8192, random init), batch 1, ``--threads 1`` (see
benchmarks/train_step.py for why). Peak memory: host RSS on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
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

REFERENCE = dict(method="rk4", time_dt=0.01, log_dt=None, formulation="reference")
SHAPES = {"tiny": TINY, "smollm2": SMOLLM2}


def build(variant: str, shape: dict, max_factor: float = 16.0):
    model = llama(shape).eval()
    if variant == "clex":
        clex.apply_clex(model, clex.CLEXConfig(max_factor=max_factor))
    elif variant == "clex-reference-solver":
        clex.apply_clex(model, clex.CLEXConfig(max_factor=max_factor, **REFERENCE))
    return model


def prefill(model, ids, dtype: str = "float32"):
    with torch.no_grad(), autocast(dtype):
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def _peak_mib() -> float:
    if common.DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated(common.DEVICE) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(variant: str, shape: dict, length: int, dtype: str) -> None:
    """Peak memory (MiB) of one prefill in this fresh process, over the peak before it."""
    model = build(variant, shape)
    ids = torch.randint(0, shape["vocab_size"], (1, 16)).to(common.DEVICE)
    prefill(model, ids, dtype)  # the θ table is built here
    before = _peak_mib()
    prefill(model, torch.randint(0, shape["vocab_size"], (1, length)).to(common.DEVICE), dtype)
    after = _peak_mib()
    print(json.dumps({"peak_mib": after, "extra_peak_mib": after - before}))


def main(argv=None):
    p = parser("prefill", __doc__)
    p.add_argument("--model", default="tiny", choices=sorted(SHAPES), help="model shape (random init)")
    p.add_argument("--factors", type=float, nargs="+", default=[1, 4, 8], help="prompt lengths as multiples of L")
    p.add_argument("--tokens", type=int, nargs="+", help="prompt lengths in tokens (instead of --factors)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "LENGTH"), help="internal: one peak-memory measurement")
    args = p.parse_args(argv)
    use_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.model]
    if args.child:
        return child(args.child[0], shape, int(args.child[1]), args.dtype)

    L = shape["max_position_embeddings"]
    lengths = args.tokens or [int(f * L) for f in args.factors]
    models = {v: build(v, shape) for v in ("plain", "clex", "clex-reference-solver")}
    builds = {}
    for v in ("clex", "clex-reference-solver"):  # the one-off table solve, timed alone
        rotary = clex.get_clex_rotary(models[v])
        start = time.perf_counter()
        rotary.table()
        builds[v] = time.perf_counter() - start
    results, rows = [], []
    for n in lengths:
        ids = torch.randint(0, shape["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
        ids = ids.to(common.DEVICE)
        fns = {v: (lambda m=m, ids=ids: prefill(m, ids, args.dtype)) for v, m in models.items()}
        times = interleaved(fns, rounds=args.rounds, warmup=2)
        base = median(times["plain"])
        f = n / L
        for v in models:
            paired = median([a / b for a, b in zip(times[v], times["plain"])])
            entry = {
                "factor": f,
                "tokens": n,
                "variant": v,
                **summary(times[v]),
                "ratio": median(times[v]) / base,
                "median_paired_ratio": paired,
            }
            if not args.no_memory:
                cmd = [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                    "--model",
                    args.model,
                    "--child",
                    v,
                    str(n),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                entry.update(json.loads(out.stdout.strip().splitlines()[-1]))
            results.append(entry)
            rows.append(
                [
                    f"{f:g}x",
                    n,
                    v,
                    entry["median_s"] * 1e3,
                    f"{entry['ratio']:.3f}x",
                    f"{paired:.3f}x",
                    f"{entry.get('peak_mib', float('nan')):.0f}",
                    f"{entry.get('extra_peak_mib', float('nan')):.1f}",
                ]
            )
        print(f"{n} tokens done", file=sys.stderr, flush=True)
    header = ["length", "tokens", "variant", "median ms", "vs plain", "paired", "peak MiB", "prefill extra peak MiB"]
    table = markdown_table(header, rows)
    build_rows = [[v, s * 1e3] for v, s in builds.items()]
    build_table = markdown_table(["θ table (t = 1 .. 16 by 1/16), one solve", "ms"], build_rows)
    print(
        f"Prefill, {args.model} LLaMA (L = {L}), {args.device}, {args.dtype}, batch 1, threads {torch.get_num_threads()}, medians of {args.rounds} "
        f"interleaved rounds\n\n{table}\n\n{build_table}"
    )
    write_json(
        args.out,
        {
            "benchmark": "prefill",
            "args": vars(args),
            "results": results,
            "table_build_s": builds,
            "table": table,
            "build_table": build_table,
        },
    )


if __name__ == "__main__":
    main()
