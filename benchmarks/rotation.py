"""One layer's rotation, forward + backward into q, k and cos/sin: stock autograd vs the fused rotation
(eager torch, Triton), with its correctness against a float64 reference, at a model's layer shape.

    python benchmarks/rotation.py --device cuda [--tokens 4096 16384] [--heads 32] [--kv-heads 32] [--head-dim 128]

Inputs as a bfloat16-autocast LLaMA makes them: q, k bfloat16 [B, H, P, d] views of [B, P, H, d] projections,
cos/sin float32 (the rotary's output in the hidden states' dtype) with gradients; the outputs float32. Timed
with CUDA events (median of --reps), the three variants interleaved. Also run without gradients to cos/sin
("plain": what a plain-RoPE layer pays).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import markdown_table, parser, use_device, write_json  # noqa: E402

from clex.core.equations import rope_angles  # noqa: E402
from clex.core.fused_rotation import fused_rotate, rotate  # noqa: E402


def make(tokens, heads, kv_heads, dim, q_dtype, seed=0):
    g = torch.Generator(device=common.DEVICE).manual_seed(seed)
    dev = common.DEVICE
    q = torch.randn(1, tokens, heads, dim, generator=g, device=dev).to(q_dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(1, tokens, kv_heads, dim, generator=g, device=dev).to(q_dtype).transpose(1, 2).requires_grad_()
    theta = (10000.0 ** (-torch.arange(0, dim, 2, device=dev) / dim) * 0.7).requires_grad_()
    pos = torch.arange(tokens, device=dev, dtype=torch.float32).unsqueeze(0) * 3.0
    gq = torch.randn(q.shape, generator=g, device=dev)
    gk = torch.randn(k.shape, generator=g, device=dev)
    return q, k, theta, pos, gq, gk


def step(kind, q, k, theta, pos, gq, gk):
    grad = kind != "plain"
    emb = rope_angles(pos, theta if grad else theta.detach())
    cos, sin = emb.cos(), emb.sin()
    if kind in ("plain", "stock"):
        qo, ko = rotate(q, k, cos, sin)
    else:
        qo, ko = fused_rotate(q, k, cos, sin, backend=kind.removeprefix("fused-"))
    torch.autograd.backward([qo, ko], [gq, gk])


def check(q, k, theta, pos, gq, gk, kind) -> float:
    """max relative error of (dq, dk, dθ) against stock autograd in float64."""

    def grads(kind, cast):
        qq, kk, th = (t.detach().to(cast).requires_grad_() for t in (q, k, theta))
        step(kind, qq, kk, th, pos.to(cast), gq.to(cast), gk.to(cast))
        return [t.grad.double() for t in (qq, kk, th)]

    ref = grads("stock", torch.float64)
    qq, kk, th = (t.detach().requires_grad_() for t in (q, k, theta))
    step(kind, qq, kk, th, pos, gq, gk)
    got = [t.grad.double() for t in (qq, kk, th)]
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))


def main(argv=None):
    p = parser("rotation", __doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    use_device(args.device)
    kinds = ["plain", "stock", "fused-torch"] + (["fused-triton"] if common.DEVICE.type == "cuda" else [])
    q_dtype = torch.bfloat16 if common.DEVICE.type == "cuda" else torch.float32
    rows, results = [], []
    for tokens in args.tokens:
        data = make(tokens, args.heads, args.kv_heads, args.head_dim, q_dtype)
        errors = {kind: check(*data, kind) for kind in kinds if kind != "plain"}
        times = {kind: [] for kind in kinds}
        for kind in kinds:
            step(kind, *data)
        for r in range(args.reps):
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                for t in data[:3]:
                    t.grad = None
                if common.DEVICE.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step(kind, *data)
                    end.record()
                    torch.cuda.synchronize()
                    times[kind].append(start.elapsed_time(end) / 1e3)
                else:
                    import time

                    t0 = time.perf_counter()
                    step(kind, *data)
                    times[kind].append(time.perf_counter() - t0)
        for kind in kinds:
            med = statistics.median(times[kind])
            rows.append(
                [
                    tokens,
                    kind,
                    med * 1e3,
                    f"{min(times[kind]) * 1e3:.4g}-{max(times[kind]) * 1e3:.4g}",
                    f"{med / statistics.median(times['plain']):.2f}x",
                    f"{errors.get(kind, 0):.1e}" if kind != "plain" else "",
                ]
            )
        results.append({"tokens": tokens, "times_s": times, "relative_error_vs_float64": errors})
        print(f"tokens {tokens} done", file=sys.stderr, flush=True)
    table = markdown_table(
        ["tokens", "variant", "median ms", "min-max ms", "/ plain", "rel. error (float64 ref)"], rows
    )
    print(
        f"One layer's rotation, forward + backward, {args.device}, heads {args.heads}/{args.kv_heads}, d {args.head_dim}, "
        f"q {str(q_dtype).removeprefix('torch.')}, cos/sin float32\n\n{table}"
    )
    write_json(args.out, {"benchmark": "rotation", "args": vars(args), "results": results, "table": table})


if __name__ == "__main__":
    main()
