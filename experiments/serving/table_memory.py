"""Memory of per-request scaling's tables at 128k, against per-t cos/sin caches (run in vLLM's python).

    /work/venvs/vllm/bin/python experiments/serving/table_memory.py --out experiments/serving/per-request/table_memory.json

For head_dim 64 and 128 (L = 8,192, max_model_len P = 131,072: t up to 16), a CLEX model (the far recipe's options,
an untrained ODE) and a YaRN model (factor 16) get the tables :class:`clex.serve.models.RequestRope` builds: θ for
each t of the grid, the t row and query scale of every final length 0..P, and the per-batch cos/sin rows
(max_num_batched_tokens = 8,192, bfloat16). Measured: the bytes of every buffer and of the θ cache, and the time
to build them (the θ solves and the per-length tables: paid once at server start). Compared with what holding a
cos/sin table per t would take (P × rotary_dim values per t, bfloat16), and with the one static table vLLM's own
rotary keeps (P × rotary_dim, bfloat16). Writes JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from clex.core.config import CLEXConfig
from clex.serve.models import RequestRope
from clex.serve.scaling import CLEXScaling, YaRNScaling

L, P, TOKENS = 8192, 131072, 8192
FAR = dict(prior="yarn", log_scale=True, angle_cap=True, past_max="prior", train_t="integer-quadratic", max_factor=16)


def measure(scaling, head_dim: int) -> dict:
    t0 = time.perf_counter()
    rope = RequestRope(
        scaling, head_dim=head_dim, tokens=TOKENS, period=P, dtype=torch.bfloat16, device=torch.device("cpu")
    )
    rope.solve()
    build_s = time.perf_counter() - t0
    buffers = {name: b.numel() * b.element_size() for name, b in rope.named_buffers()}
    theta_cache = sum(v.numel() * v.element_size() for v in scaling._theta.values())
    n_t, rot = len(rope.ts), scaling.rotary_dim
    return {
        "kind": scaling.kind,
        "head_dim": head_dim,
        "n_t": n_t,
        "buffers_bytes": buffers,
        "theta_cache_bytes": theta_cache,
        "total_bytes": sum(buffers.values()) + theta_cache,
        "per_t_cos_sin_bf16_bytes": n_t * P * rot * 2,
        "one_static_cos_sin_bf16_bytes": P * rot * 2,
        "build_s": round(build_s, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON here (and a .md beside it)")
    args = parser.parse_args()
    rows = []
    for head_dim in (64, 128):
        clex = CLEXScaling(CLEXConfig(**FAR, original_length=L), rotary_dim=head_dim, base=100000.0)
        dyn = clex.rotary.dynamics
        clex.load_ode({"ode_up_proj": dyn.ode_up_proj.detach(), "ode_down_proj": dyn.ode_down_proj.detach()})
        rows.append(measure(clex, head_dim))
        yarn = YaRNScaling({"factor": 16.0}, original_length=L, rotary_dim=head_dim, base=100000.0)
        rows.append(measure(yarn, head_dim))
    result = {
        "L": L,
        "max_model_len": P,
        "max_num_batched_tokens": TOKENS,
        "rows": rows,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        mib = 2**20
        lines = [
            "| model | head_dim | t values | per-request tables | of which per batch | a cos/sin table per t | vLLM's one static table | build |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            batch = sum(r["buffers_bytes"].get(k, 0) for k in ("cos_sin", "query_cos_sin", "token_query_scale", "rows"))
            lines.append(
                f"| {r['kind']} | {r['head_dim']} | {r['n_t']} | {r['total_bytes'] / mib:.2f} MiB | "
                f"{batch / mib:.2f} MiB | {r['per_t_cos_sin_bf16_bytes'] / mib:,.0f} MiB | "
                f"{r['one_static_cos_sin_bf16_bytes'] / mib:.0f} MiB | {r['build_s']} s |"
            )
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
