"""The core identities: the NTK closed form, the two formulations, solver accuracy."""

import pytest
import torch

from clex.core.equations import ntk_inv_freq, ntk_log_freqs, ntk_log_freqs_rate
from clex.core.solve import fine_grid, solve_log_freqs

DIM = 16
INV0 = 1.0 / (10000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))


def trained_like(dim=DIM, lam=1, seed=0, dtype=torch.float32):
    """Weights of the size a trained model has: W_down no longer zero."""
    g = torch.Generator().manual_seed(seed)
    up = (torch.rand(dim // 2, lam * dim, generator=g) * 2 - 1) / (lam * dim) ** 0.5
    down = torch.randn(lam * dim, dim // 2, generator=g) * 0.05 / (lam * dim) ** 0.5
    return up.to(dtype), down.to(dtype)


def test_rate_is_the_derivative_of_the_prior():
    t, h = torch.tensor(3.3, dtype=torch.float64), 1e-6
    numeric = (
        ntk_log_freqs(t + h, DIM, 1e5, dtype=torch.float64) - ntk_log_freqs(t - h, DIM, 1e5, dtype=torch.float64)
    ) / (2 * h)
    torch.testing.assert_close(numeric, ntk_log_freqs_rate(t, DIM, dtype=torch.float64), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("formulation", ["residual", "reference"])
@pytest.mark.parametrize("t", [1.0, 1.5, 2.0, 3.7, 8.0, 16.0])
def test_untrained_layer_is_ntk_with_factor_2t_minus_1(formulation, t):
    up, _ = trained_like()
    down = torch.zeros(DIM, DIM // 2)
    step = {"time_dt": 0.01} if formulation == "reference" else {}  # the reference integrates the prior too
    theta = solve_log_freqs(INV0, up, down, [t], act="tanh", prior_base=1e4, formulation=formulation, **step).exp()[0]
    expected = INV0 * (2 * t - 1) ** (-2 * torch.arange(DIM // 2) / (DIM - 2))
    torch.testing.assert_close(theta, expected, rtol=1e-6 if formulation == "residual" else 1e-5, atol=0)
    torch.testing.assert_close(ntk_inv_freq(INV0, t), expected, rtol=1e-6, atol=0)


def test_formulations_solve_the_same_ode():
    inv0 = INV0.double()
    up, down = trained_like(dtype=torch.float64)
    kw = dict(act="silu", prior_base=1e4, time_dt=0.01)
    a = solve_log_freqs(inv0, up, down, [2.0, 5.5, 16.0], formulation="residual", **kw)
    b = solve_log_freqs(inv0, up, down, [2.0, 5.5, 16.0], formulation="reference", **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert (a - solve_log_freqs(inv0, up, torch.zeros_like(down), [16.0], **kw)).abs().max() > 1e-3  # W matters


@pytest.mark.parametrize("act", ["tanh", "silu"])
def test_default_solver_matches_float64_fine_reference(act):
    times = [1.0, 2.0, 4.0, 7.25, 12.0, 16.0]
    up, down = trained_like(seed=3)
    ours = solve_log_freqs(INV0, up, down, times, act=act, prior_base=1e4).exp()
    ref = solve_log_freqs(
        INV0.double(),
        up.double(),
        down.double(),
        times,
        act=act,
        prior_base=1e4,
        time_dt=0.001,
        formulation="reference",
    ).exp()
    assert ((ours.double() - ref) / ref).abs().max() <= 1e-5


def test_fine_grid_lands_on_every_requested_time():
    grid, where = fine_grid([1.0, 1.0625, 2.0, 2.0, 5.0], 0.3)
    assert [grid[i] for i in where] == [1.0, 1.0625, 2.0, 2.0, 5.0]
    assert max(b - a for a, b in zip(grid, grid[1:])) <= 0.3 + 1e-12


def test_gradcheck_through_the_solver():
    up, down = trained_like(dim=8, seed=1, dtype=torch.float64)
    up.requires_grad_(True)
    down.requires_grad_(True)
    inv0 = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))

    def f(u, d):
        return solve_log_freqs(inv0, u, d, [2.5], act="tanh", prior_base=1e4, time_dt=0.25)

    assert torch.autograd.gradcheck(f, (up, down))


def test_unsorted_times_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        solve_log_freqs(INV0, *trained_like(), [3.0, 2.0], act="tanh", prior_base=1e4)
