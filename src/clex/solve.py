"""Solving the CLEX ODE for the log-frequencies x(t) = log θ(t), with torchdiffeq.

One call solves for a whole sorted list of times (a table over a grid of t costs ONE solve). Fixed-grid
methods step at most ``time_dt`` and land exactly on every requested time (no interpolation between grid
points); adaptive methods use ``rtol``/``atol``. Gradients flow by backpropagation through every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor
from torchdiffeq import odeint

from .equations import clex_rhs, ntk_log_shift, residual_rhs

FIXED_GRID_METHODS = ("rk4", "euler", "midpoint", "explicit_adams")


def fine_grid(times: Sequence[float], time_dt: float) -> tuple[list[float], list[int]]:
    """A grid from 1 through every time in ``times`` (sorted, >= 1), each interval cut into equal steps
    of at most ``time_dt``. Returns (grid, index of each requested time in the grid)."""
    grid, where, prev = [1.0], [], 1.0
    for t in times:
        n = max(0, math.ceil((t - prev) / time_dt - 1e-9))
        grid.extend(prev + (t - prev) * k / n for k in range(1, n + 1))
        prev = t if n else prev
        where.append(len(grid) - 1)
    return grid, where


def solve_log_freqs(
    inv_freq0: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    times: Sequence[float],
    *,
    act: str,
    prior_base: float,
    method: str = "rk4",
    time_dt: float = 0.01,
    formulation: str = "residual",
    rtol: float = 1e-7,
    atol: float = 1e-9,
) -> Tensor:
    """x(t) = log θ(t) for each t in ``times`` (sorted, each >= 1), starting from x(1) = log θ⁰.

    inv_freq0: [d/2] (its dtype sets the solve's dtype: float32 normally, float64 for references);
    w_up: [d/2, λd]; w_down: [λd, d/2]  ->  [len(times), d/2]
    """
    times = [float(t) for t in times]
    if any(b < a for a, b in zip(times, times[1:])) or (times and times[0] < 1.0):
        raise ValueError(f"times must be sorted and >= 1, got {times[:4]}...")
    dtype, device = inv_freq0.dtype, inv_freq0.device
    log_f0 = torch.log(inv_freq0)
    dim = 2 * inv_freq0.numel()
    w_up, w_down = w_up.to(dtype), w_down.to(dtype)
    if formulation == "residual":
        func = partial(residual_rhs, log_inv_freq0=log_f0, w_up=w_up, w_down=w_down, act=act, prior_base=prior_base)
        y0 = torch.zeros_like(log_f0)
    else:
        func = partial(clex_rhs, w_up=w_up, w_down=w_down, act=act, prior_base=prior_base)
        y0 = log_f0

    def rhs(t, y):
        return func(t, y)

    if all(t == 1.0 for t in times):  # nothing to integrate
        sol = y0.expand(len(times), -1)
    elif method in FIXED_GRID_METHODS:
        grid, where = fine_grid(times, time_dt)
        sol = odeint(rhs, y0, torch.tensor(grid, dtype=dtype, device=device), method=method)[where]
    else:
        grid = sorted({1.0, *times})
        sol = odeint(rhs, y0, torch.tensor(grid, dtype=dtype, device=device), method=method, rtol=rtol, atol=atol)
        sol = sol[[grid.index(t) for t in times]]
    if formulation == "residual":  # x = log θ⁰ + (closed-form prior shift) + z
        shift = torch.stack([ntk_log_shift(t, dim, dtype=dtype, device=device) for t in times])
        sol = log_f0 + shift + sol
    return sol
