"""The fast default solver: same answer as the reference's computation, in ~20 steps instead of 1,500.

Bounds (issue 7): θ(t) within 1e-5 relative of a float64 fine-step solve, and the gradients of the ODE
parameters within 1e-4 (relative to the largest entry) of the reference's: rk4 (3/8 rule), uniform steps of
0.01, the full right-hand side ("reference" formulation), float64, backpropagation through every step.
"""

import pytest
import torch
from test_equations import trained_like

import clex
from clex.core.equations import ACTIVATIONS, ntk_log_freqs, ntk_log_freqs_rate
from clex.core.solve import fine_grid, solve_log_freqs

DIM = 16
INV0 = 1.0 / (10000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))
TIMES = [2.0, 8.0, 16.0, 64.0]  # 64: a max_factor-64 model (CLEX-LLaMA-2-7B-64K, CLEX-Phi-2-32K)
DEFAULTS = clex.CLEXConfig()
OURS = dict(method=DEFAULTS.method, time_dt=DEFAULTS.time_dt, log_dt=DEFAULTS.log_dt, formulation=DEFAULTS.formulation)


def reference_rk4(inv0, up, down, times, act, dt=0.01):
    """The reference's computation written out (no torchdiffeq bookkeeping, so that it is fast enough for a
    test): the 3/8-rule RK4 of torchdiffeq's "rk4" on dx/dt = act((x + log θ_NTK) W_up) W_down + rate(t),
    uniform steps ``dt``, in inv0's dtype, autograd through every step.  -> [len(times), d/2]"""
    steps = round((times[-1] - 1) / dt)
    stage_t = 1 + dt * (torch.arange(steps, dtype=torch.float64).unsqueeze(1) + torch.tensor([0, 1 / 3, 2 / 3, 1]))
    prior = ntk_log_freqs(stage_t.reshape(-1, 1), DIM, 1e4, dtype=inv0.dtype)  # [4S, d/2]
    rate = ntk_log_freqs_rate(stage_t.reshape(-1, 1), DIM, dtype=inv0.dtype)
    prior_up = (prior @ up).unbind(0)  # (x + prior) W_up = x W_up + prior W_up: one product less per evaluation
    f = ACTIVATIONS[act]

    def rhs(r, x):
        return torch.addmm(rate[r], f(torch.addmm(prior_up[r], x, up)), down)

    x, out = torch.log(inv0).unsqueeze(0), {}  # [1, d/2]
    for s in range(steps + 1):
        out[round(1 + s * dt, 9)] = x[0]
        if s == steps:
            break
        r = 4 * s
        k1 = rhs(r, x)
        k2 = rhs(r + 1, torch.add(x, k1, alpha=dt / 3))
        k3 = rhs(r + 2, x + dt * (k2 - k1 / 3))
        k4 = rhs(r + 3, x + dt * (k1 - k2 + k3))
        x = x + (dt / 8) * (k1 + 3 * (k2 + k3) + k4)
    return torch.stack([out[round(t, 9)] for t in times])


def test_the_written_out_reference_is_torchdiffeqs_rk4():
    up, down = trained_like(seed=3, dtype=torch.float64)
    a = reference_rk4(INV0.double(), up, down, [1.5, 2.0], "silu")
    b = solve_log_freqs(
        INV0.double(),
        up,
        down,
        [1.5, 2.0],
        act="silu",
        prior_base=1e4,
        method="rk4",
        time_dt=0.01,
        log_dt=None,
        formulation="reference",
    )
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)  # same steps; round-off in the stage times only


@pytest.fixture(scope="module", params=["tanh", "silu"])
def reference(request):
    """(act, weights, loss weights, θ_ref [4, d/2], [(dL/dW_up, dL/dW_down) per t]) of the reference."""
    act = request.param
    up, down = trained_like(seed=3)
    up64, down64 = up.double().requires_grad_(True), down.double().requires_grad_(True)
    x = reference_rk4(INV0.double(), up64, down64, TIMES, act)
    w = torch.randn(DIM // 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    picks = torch.zeros(len(TIMES), *x.shape, dtype=torch.float64)  # backward b: dL_b/dx = w at row b only
    for b in range(len(TIMES)):
        picks[b, b] = w
    g_up, g_down = torch.autograd.grad(x, (up64, down64), picks, is_grads_batched=True)  # one vmapped pass
    return act, (up, down), w, x.detach().exp(), list(zip(g_up, g_down))


def test_default_theta_within_1e5_of_the_float64_fine_reference(reference):
    act, (up, down), _, theta_ref, _ = reference
    theta = solve_log_freqs(INV0, up, down, TIMES, act=act, prior_base=1e4, **OURS).exp()
    assert theta.dtype == torch.float32
    rel = ((theta.double() - theta_ref) / theta_ref).abs().max(dim=1).values
    assert (rel <= 1e-5).all(), f"relative error of θ per t {TIMES}: {rel.tolist()}"
    if act == "silu":  # the bound has teeth: the same number of big steps, but uniform ones, misses it
        coarse = solve_log_freqs(INV0, up, down, TIMES, act=act, prior_base=1e4, **{**OURS, "log_dt": None}).exp()
        assert ((coarse.double() - theta_ref) / theta_ref).abs().max() > 1e-5


def test_default_gradients_within_1e4_of_the_references(reference):
    act, (up, down), w, _, grads_ref = reference
    up, down = up.clone().requires_grad_(True), down.clone().requires_grad_(True)
    x = solve_log_freqs(INV0, up, down, TIMES, act=act, prior_base=1e4, **OURS)
    for i, t in enumerate(TIMES):
        grads = torch.autograd.grad((x[i].double() * w).sum(), (up, down), retain_graph=True)
        for name, g, g_ref in zip(("W_up", "W_down"), grads, grads_ref[i]):
            rel = (g.double() - g_ref).abs().max() / g_ref.abs().max()
            assert rel <= 1e-4, f"t={t}: dL/d{name} off by {rel:.2e} (relative to its largest entry)"


def test_the_rotary_module_with_default_config_meets_the_bounds(reference):
    act, (up, down), w, theta_ref, grads_ref = reference
    inv0 = INV0
    r = clex.CLEXRotaryEmbedding(clex.CLEXConfig(act=act, max_factor=64), inv0, original_length=16, rope_theta=1e4)
    with torch.no_grad():
        r.dynamics.ode_up_proj.copy_(up)
        r.dynamics.ode_down_proj.copy_(down)
    theta = r.solve([1.0, 16.0])[1]  # what a training step at t = 16 computes
    assert ((theta.double() - theta_ref[2]) / theta_ref[2]).abs().max() <= 1e-5
    (torch.log(theta).double() * w).sum().backward()
    for p, g_ref in zip((r.dynamics.ode_up_proj, r.dynamics.ode_down_proj), grads_ref[2]):
        assert (p.grad.double() - g_ref).abs().max() / g_ref.abs().max() <= 1e-4


@pytest.mark.parametrize("act", ["tanh", "silu"])
def test_fused_is_torchdiffeqs_rk4_on_the_same_grid(act):
    up, down = trained_like(seed=5, dtype=torch.float64)
    times, w = [1.0, 1.25, 3.0, 3.0, 9.5], torch.randn(5, DIM // 2, dtype=torch.float64)
    out = {}
    for method in ("rk4", "rk4-fused"):
        u, d = up.clone().requires_grad_(True), down.clone().requires_grad_(True)
        x = solve_log_freqs(INV0.double(), u, d, times, act=act, prior_base=1e4, method=method, time_dt=0.7, log_dt=0.3)
        (x * w).sum().backward()
        out[method] = (x, u.grad, d.grad)
    for a, b in zip(out["rk4"], out["rk4-fused"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_gradcheck_through_the_fused_solver():
    up, down = trained_like(dim=8, seed=1, dtype=torch.float64)
    inv0 = INV0.double()[:4]

    def f(u, d):
        return solve_log_freqs(inv0, u, d, [1.0, 2.5, 4.0], act="silu", prior_base=1e4, method="rk4-fused", time_dt=0.5)

    assert torch.autograd.gradcheck(f, (up.requires_grad_(True), down.requires_grad_(True)))


def test_fused_at_t_equal_one_keeps_the_weights_in_the_graph():
    up, down = (w.requires_grad_(True) for w in trained_like())
    x = solve_log_freqs(INV0, up, down, [1.0, 1.0], act="tanh", prior_base=1e4, **OURS)
    torch.testing.assert_close(x, torch.log(INV0).expand(2, -1), rtol=0, atol=0)
    x.sum().backward()
    assert down.grad is not None and not down.grad.any()


def test_graded_grid_lands_on_every_time_and_bounds_each_step():
    times = [1.0, 1.0625, 2.0, 2.0, 5.0, 16.0]
    grid, where = fine_grid(times, 1.0, 0.25)
    assert [grid[i] for i in where] == times
    for a, b in zip(grid, grid[1:]):
        assert 0 < b - a <= min(1.0, 0.25 * (b - 0.5)) + 1e-12
    assert len(fine_grid([16.0], 1.0, 0.25)[0]) - 1 <= 20  # vs 1,500 steps of 0.01
    assert fine_grid([16.0], 0.01, 0.25)[0] == fine_grid([16.0], 0.01, None)[0]  # log_dt changes no small step


def test_solver_settings_are_validated():
    with pytest.raises(ValueError, match="log_dt must be a number > 0, or None"):
        clex.CLEXConfig(log_dt=0)
    with pytest.raises(ValueError, match="method='rk4-fused' solves formulation 'residual' only"):
        clex.CLEXConfig(formulation="reference")
    clex.CLEXConfig(formulation="reference", method="rk4")  # the reference path takes either
    with pytest.raises(ValueError, match="solves formulation 'residual' only"):
        solve_log_freqs(
            INV0, *trained_like(), [2.0], act="tanh", prior_base=1e4, method="rk4-fused", formulation="reference"
        )
    with pytest.raises(ValueError, match="time_dt and log_dt must be > 0"):
        solve_log_freqs(INV0, *trained_like(), [2.0], act="tanh", prior_base=1e4, time_dt=0)
