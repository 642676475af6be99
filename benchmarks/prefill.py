"""Prefill time (one no-grad forward over a whole prompt) at 1x, 4x, 8x L: CLEX vs plain RoPE, side by side;
the one-off θ-table build of each solver; peak memory of each prefill (in a fresh process each).

    python benchmarks/prefill.py [--factors 1 4 8] [--rounds 20] [--no-memory] [--out ...]

At inference CLEX reads θ(t) from a table over t built by ONE solve and cached until the ODE weights change,
so a prefill costs what plain RoPE costs plus a lookup. Tiny demo-sized LLaMA (benchmarks/common.py: TINY,
L = 128), batch 1, ``--threads 1`` (see benchmarks/train_step.py for why).
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
from common import TINY, interleaved, llama, markdown_table, median, parser, summary, use_device, write_json  # noqa: E402

import clex  # noqa: E402

REFERENCE = dict(method="rk4", time_dt=0.01, log_dt=None, formulation="reference")


def build(variant: str, max_factor: float = 16.0):
    model = llama(TINY).eval()
    if variant == "clex":
        clex.apply_clex(model, clex.CLEXConfig(max_factor=max_factor))
    elif variant == "clex-reference-solver":
        clex.apply_clex(model, clex.CLEXConfig(max_factor=max_factor, **REFERENCE))
    return model


def prefill(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def child(variant: str, length: int) -> None:
    """Peak resident memory (MiB) of one prefill in this fresh process, over the peak before it."""
    model = build(variant)
    ids = torch.randint(0, TINY["vocab_size"], (1, 16)).to(common.DEVICE)
    prefill(model, ids)  # the θ table is built here
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # host memory (GPU memory is not counted)
    prefill(model, torch.randint(0, TINY["vocab_size"], (1, length)).to(common.DEVICE))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": after / 1024, "extra_peak_mib": (after - before) / 1024}))


def main(argv=None):
    p = parser("prefill", __doc__)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 4, 8], help="prompt lengths as multiples of L")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "LENGTH"), help="internal: one peak-memory measurement")
    args = p.parse_args(argv)
    use_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child[0], int(args.child[1]))

    L = TINY["max_position_embeddings"]
    models = {v: build(v) for v in ("plain", "clex", "clex-reference-solver")}
    builds = {}
    for v in ("clex", "clex-reference-solver"):  # the one-off table solve, timed alone
        rotary = clex.get_clex_rotary(models[v])
        start = time.perf_counter()
        rotary.table()
        builds[v] = time.perf_counter() - start
    results, rows = [], []
    for f in args.factors:
        ids = torch.randint(0, TINY["vocab_size"], (1, f * L), generator=torch.Generator().manual_seed(f))
        ids = ids.to(common.DEVICE)
        times = interleaved({v: (lambda m=m: prefill(m, ids)) for v, m in models.items()}, rounds=args.rounds, warmup=2)
        base = median(times["plain"])
        for v in models:
            entry = {"factor": f, "tokens": f * L, "variant": v, **summary(times[v]), "ratio": median(times[v]) / base}
            if not args.no_memory:
                out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--device", args.device, "--child", v, str(f * L)],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                entry.update(json.loads(out.stdout.strip().splitlines()[-1]))
            results.append(entry)
            rows.append([f"{f}x", f * L, v, entry["median_s"] * 1e3, f"{entry['ratio']:.3f}x",
                         f"{entry.get('peak_mib', float('nan')):.0f}", f"{entry.get('extra_peak_mib', float('nan')):.1f}"])  # fmt: skip
        print(f"{f}x L done", file=sys.stderr, flush=True)
    table = markdown_table(["length", "tokens", "variant", "median ms", "vs plain", "peak RSS MiB", "prefill extra peak MiB"], rows)
    build_rows = [[v, s * 1e3] for v, s in builds.items()]
    build_table = markdown_table(["θ table (t = 1 .. 16 by 1/16), one solve", "ms"], build_rows)
    print(f"Prefill, tiny LLaMA (L = {L}), batch 1, threads {torch.get_num_threads()}, medians of {args.rounds} "
          f"interleaved rounds\n\n{table}\n\n{build_table}")  # fmt: skip
    write_json(args.out, {"benchmark": "prefill", "args": vars(args), "results": results,
                          "table_build_s": builds, "table": table, "build_table": build_table})  # fmt: skip


if __name__ == "__main__":
    main()
