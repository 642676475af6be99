"""The ODE solve alone: time (forward; forward + backward) and accuracy of each solver lever, one by one.

    python benchmarks/solve.py [--times 2 8 16 64] [--dim 64] [--act tanh] [--rounds 5] [--out ...]

Solves x(t) = log θ(t) on [1, t] (what a training step at factor t computes) with weights of a trained size
(tests/test_equations.py: trained_like). Each variant changes one thing relative to the one above it:

- reference        torchdiffeq rk4, uniform steps of 0.01, full right-hand side, float32: the authors' way
- residual         the same, prior integrated in closed form (formulation "residual")
- rk4 dt=0.25/1.0  residual, uniform steps of 0.25 / 1.0
- rk4 graded       residual, steps min(1.0, 0.25·(t - 1/2)) (our grid)
- dopri5           residual, adaptive, rtol 1e-7, atol 1e-9
- adjoint dt=0.25  residual, uniform 0.25, gradients by torchdiffeq's adjoint method
- fused dt=0.01    our fused RK4 loop (float64, hand-written backward) at the reference's steps
- fused graded     our fused RK4 on our grid: the default of CLEXConfig

Accuracy: max relative error of θ(t) against a float64 fine-step solve (rk4, uniform 0.002, full formulation),
and max error of dL/dW (L = w·x(t), w random) relative to the largest entry of the reference's gradient
(rk4, uniform 0.01, full formulation, float64).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    interleaved,
    markdown_table,
    median,
    parser,
    summary,
    use_device,
    write_json,
)

from clex.core.equations import residual_rhs  # noqa: E402
from clex.core.solve import fine_grid, solve_log_freqs  # noqa: E402

VARIANTS = {
    "reference": dict(method="rk4", time_dt=0.01, log_dt=None, formulation="reference"),
    "residual": dict(method="rk4", time_dt=0.01, log_dt=None),
    "rk4 dt=0.25": dict(method="rk4", time_dt=0.25, log_dt=None),
    "rk4 dt=1.0": dict(method="rk4", time_dt=1.0, log_dt=None),
    "rk4 graded": dict(method="rk4", time_dt=1.0, log_dt=0.25),
    "dopri5": dict(method="dopri5", rtol=1e-7, atol=1e-9),
    "adjoint dt=0.25": "adjoint",
    "fused dt=0.01": dict(method="rk4-fused", time_dt=0.01, log_dt=None),
    "fused graded": dict(method="rk4-fused", time_dt=1.0, log_dt=0.25),
}


def trained_like(dim: int, lam: int = 1, seed: int = 3):
    """Weights of a trained size (as tests/test_equations.py): W_down no longer zero."""
    g = torch.Generator().manual_seed(seed)
    up = (torch.rand(dim // 2, lam * dim, generator=g) * 2 - 1) / (lam * dim) ** 0.5
    down = torch.randn(lam * dim, dim // 2, generator=g) * 0.05 / (lam * dim) ** 0.5
    return up, down


def adjoint_solve(inv0, up, down, t, *, act, dt=0.25):
    """x(t) by torchdiffeq's odeint_adjoint (rk4, uniform dt, residual formulation)."""
    from torchdiffeq import odeint_adjoint

    from clex.core.equations import ntk_log_shift

    log0 = torch.log(inv0)
    func = partial(residual_rhs, log_inv_freq0=log0, w_up=up, w_down=down, act=act, prior_base=1e4)
    span = torch.tensor([1.0, t], dtype=inv0.dtype, device=inv0.device)
    z = odeint_adjoint(
        lambda s, y: func(s, y),
        torch.zeros_like(log0),
        span,
        method="rk4",
        options=dict(step_size=dt),
        adjoint_params=(up, down),
    )[-1]
    return log0 + ntk_log_shift(t, 2 * inv0.numel(), dtype=inv0.dtype) + z


def solver(name: str, act: str):
    spec = VARIANTS[name]
    if spec == "adjoint":
        return lambda inv0, up, down, t: adjoint_solve(inv0, up, down, t, act=act)
    return lambda inv0, up, down, t: solve_log_freqs(inv0, up, down, [1.0, t], act=act, prior_base=1e4, **spec)[1]


def steps_of(name: str, t: float) -> str:
    spec = VARIANTS[name]
    if spec == "adjoint":
        return f"{len(fine_grid([t], 0.25)[0]) - 1} (+ as many back)"
    if spec["method"] == "dopri5":
        return "adaptive"
    return str(len(fine_grid([t], spec["time_dt"], spec["log_dt"])[0]) - 1)


def main(argv=None):
    p = parser("solve", __doc__)
    p.add_argument("--times", type=float, nargs="+", default=[2.0, 8.0, 16.0, 64.0])
    p.add_argument("--dim", type=int, default=64, help="rotary dimension d (64: LLaMA, SmolLM2)")
    p.add_argument("--act", default="tanh", choices=["tanh", "silu"])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per t (each variant once a round)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    dev = use_device(args.device)

    d = args.dim
    inv0 = (1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(dev)
    up, down = (x.to(dev) for x in trained_like(d))
    w = torch.randn(d // 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dev)
    results, rows = [], []
    for t in args.times:
        # references (float64): θ by a fine solve, gradients by the reference's own computation
        with torch.no_grad():
            theta_ref = solve_log_freqs(
                inv0.double(),
                up.double(),
                down.double(),
                [1.0, t],
                act=args.act,
                prior_base=1e4,
                method="rk4",
                time_dt=0.002,
                log_dt=None,
                formulation="reference",
            )[1].exp()
        u64, d64 = up.double().requires_grad_(True), down.double().requires_grad_(True)
        x = solve_log_freqs(inv0.double(), u64, d64, [1.0, t], act=args.act, prior_base=1e4, **VARIANTS["reference"])[1]
        g_ref = torch.autograd.grad((x * w).sum(), (u64, d64))

        fns, acc = {}, {}
        for name in args.variants:
            solve = solver(name, args.act)
            u, dn = up.clone().requires_grad_(True), down.clone().requires_grad_(True)
            x = solve(inv0, u, dn, t)
            grads = torch.autograd.grad((x.double() * w).sum(), (u, dn))
            acc[name] = {
                "theta_rel_err": float(((x.double().exp() - theta_ref) / theta_ref).abs().max()),
                "grad_rel_err": max(float((g.double() - r).abs().max() / r.abs().max()) for g, r in zip(grads, g_ref)),
            }

            def fwd(solve=solve, u=u, dn=dn, t=t):
                return solve(inv0, u, dn, t)

            def fwd_bwd(solve=solve, u=u, dn=dn, t=t):
                (solve(inv0, u, dn, t) * w.float()).sum().backward()

            fns[(name, "fwd")], fns[(name, "fwd+bwd")] = fwd, fwd_bwd
        times = interleaved(fns, rounds=args.rounds, warmup=1)
        ref_fb = median(times[("reference", "fwd+bwd")]) if "reference" in args.variants else None
        for name in args.variants:
            fb = median(times[(name, "fwd+bwd")])
            entry = {
                "t": t,
                "variant": name,
                "steps": steps_of(name, t),
                **acc[name],
                "fwd": summary(times[(name, "fwd")]),
                "fwd_bwd": summary(times[(name, "fwd+bwd")]),
                "speedup_vs_reference": (ref_fb / fb) if ref_fb else None,
            }
            results.append(entry)
            rows.append(
                [
                    t,
                    name,
                    entry["steps"],
                    f"{acc[name]['theta_rel_err']:.1e}",
                    f"{acc[name]['grad_rel_err']:.1e}",
                    median(times[(name, "fwd")]) * 1e3,
                    fb * 1e3,
                    f"{ref_fb / fb:.1f}x" if ref_fb else "-",
                ]
            )
        print(f"t={t:g} done", file=sys.stderr, flush=True)

    table = markdown_table(
        ["t", "variant", "steps", "θ rel err", "grad rel err", "fwd ms", "fwd+bwd ms", "vs reference"], rows
    )
    print(f"ODE solve alone, d={d}, act={args.act}, {dev}, medians of {args.rounds} interleaved rounds\n\n{table}")
    write_json(args.out, {"benchmark": "solve", "args": vars(args), "results": results, "table": table})


if __name__ == "__main__":
    main()
