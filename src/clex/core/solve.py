"""Solving the CLEX ODE for the log-frequencies x(t) = log θ(t).

    dx/dt = act((x + log θ_NTK(t)) · W_up) · W_down + d/dt log θ_NTK(t),   x(1) = log θ⁰     (paper, Eq. 9)

One call solves for a whole sorted list of times (a table over a grid of t costs ONE solve). Two back-ends:

- ``rk4-fused`` (the default of :class:`clex.CLEXConfig`): the 3/8-rule RK4 of torchdiffeq's ``rk4``, written
  out as one loop in plain torch, in float64, with a hand-written backward (the exact discrete adjoint of the
  steps taken, so the gradients are those of backpropagation through every step). Residual formulation only.
- any torchdiffeq method (``rk4``, ``dopri5``, ...): the reference path, either formulation.

Fixed-grid methods land exactly on every requested time. Their steps are at most

    h(t) = min(time_dt, log_dt · (t - 1/2))

i.e. equal steps of about ``log_dt`` in log(2t - 1) near t = 1, where the prior log(2t - 1) bends most, and
steps of ``time_dt`` further on (``log_dt=None``: uniform steps of ``time_dt``, as the reference code).
Adaptive methods use ``rtol``/``atol``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

from .config import FUSED_METHODS, CLEXConfig
from .equations import (
    ACTIVATION_GRADS,
    ACTIVATIONS,
    clex_rhs,
    prior_shift,
    residual_input,
    residual_rhs,
)

#: torchdiffeq's fixed-grid methods (they take the grid of :func:`fine_grid`), from its own registry.
FIXED_GRID_METHODS = tuple(m for m, s in TORCHDIFFEQ_SOLVERS.items() if issubclass(s, FixedGridODESolver))
#: The solver's defaults are CLEXConfig's (one place; this module imports config, never the other way).
_DEFAULT = {
    f: CLEXConfig.__dataclass_fields__[f].default
    for f in ("method", "time_dt", "log_dt", "formulation", "rtol", "atol")
}
#: Default step in log(2t - 1) near t = 1 (see the module docstring); None = uniform steps.
DEFAULT_LOG_DT = _DEFAULT["log_dt"]


def _check_times(times: Sequence[float]) -> list[float]:
    """times as floats; a ValueError unless each is finite and >= 1 and they are sorted."""
    times = [float(t) for t in times]
    if not all(math.isfinite(t) and t >= 1.0 for t in times) or any(b < a for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be finite, sorted and >= 1, got {times[:4]}{'...' if len(times) > 4 else ''}")
    return times


# --- the grid -------------------------------------------------------------------------------------------------


def _stretch(time_dt: float, log_dt: float | None):
    """(σ, σ⁻¹) with dσ/dt = 1 / h(t), σ(1) = 0: steps of equal length in σ are steps of length h(t) in t.

    σ(t) = log(2·min(t, t*) - 1) / log_dt + max(0, t - t*) / time_dt,   t* = max(1, 1/2 + time_dt / log_dt).
    """
    if log_dt is None:
        return (lambda t: (t - 1.0) / time_dt), (lambda s: 1.0 + s * time_dt)
    knee = max(1.0, 0.5 + time_dt / log_dt)
    s_knee = math.log(2 * knee - 1) / log_dt

    def sigma(t: float) -> float:
        return math.log(2 * min(t, knee) - 1) / log_dt + max(0.0, t - knee) / time_dt

    def inverse(s: float) -> float:
        return (1 + math.exp(s * log_dt)) / 2 if s <= s_knee else knee + (s - s_knee) * time_dt

    return sigma, inverse


def fine_grid(times: Sequence[float], time_dt: float, log_dt: float | None = None) -> tuple[list[float], list[int]]:
    """A grid from 1 through every time in ``times`` (sorted, >= 1); each interval between requested times is
    cut into equal steps in σ (see :func:`_stretch`), each step at most h(t) = min(time_dt, log_dt·(t - 1/2))
    (at most ``time_dt`` when ``log_dt`` is None). Returns (grid, index of each requested time in the grid)."""
    times = _check_times(times)
    sigma, inverse = _stretch(time_dt, log_dt)
    grid, where, prev = [1.0], [], 1.0
    for t in times:
        if t > prev:
            s0, s1 = sigma(prev), sigma(t)
            n = max(1, math.ceil(s1 - s0 - 1e-9))
            grid.extend(inverse(s0 + (s1 - s0) * k / n) for k in range(1, n))
            grid.append(t)  # exactly the requested time
            prev = t
        where.append(len(grid) - 1)
    return grid, where


# --- the fused RK4 ----------------------------------------------------------------------------------------

# The 3/8 rule (torchdiffeq's "rk4"): stage i evaluates at t + C[i]·dt, state y + dt·Σ_j A[i][j]·k_j;
# the step is y + dt·Σ_i B[i]·k_i.
_A = ((0.0, 0.0, 0.0, 0.0), (1 / 3, 0.0, 0.0, 0.0), (-1 / 3, 1.0, 0.0, 0.0), (1.0, -1.0, 1.0, 0.0))
_B = (1 / 8, 3 / 8, 3 / 8, 1 / 8)
_C = (0.0, 1 / 3, 2 / 3, 1.0)


@contextmanager
def _one_thread(device: torch.device):
    """Intra-op threads off for the tiny tensors of the fused solve (CPU only): they only add start-up cost,
    and on a busy machine a parallel region waits for a whole scheduler time slice (measured: 16 ms for a
    [80, 32] float64 product with 2 threads, 6 µs with 1). The previous setting is restored."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_TABLEAUS: dict = {}


def _tableau(like: Tensor) -> tuple[Tensor, Tensor]:
    """(A [4, 4], B [4]) as tensors of ``like``'s dtype and device, made once."""
    key = (like.dtype, like.device)
    if key not in _TABLEAUS:
        _TABLEAUS[key] = (like.new_tensor(_A), like.new_tensor(_B))
    return _TABLEAUS[key]


def _rk4_steps(a: Tensor, m: Tensor, dts: Sequence[float], act: str) -> tuple[Tensor, Tensor, Tensor]:
    """RK4 (3/8 rule) for dv/dt = act(a(t) + v · M), v(1) = 0.

    a: [4S, H] the inputs at the 4 stages of each of the S steps; m: [H, H]; dts: the S step lengths
    ->  (v after each step [S+1, H], the state V_i each stage evaluated at [4S, H], p_i = a_i + V_i·M [4S, H])
    """
    steps, width = len(dts), a.shape[-1]
    f, mt = ACTIVATIONS[act], m.t()
    ends = a.new_zeros(steps + 1, width)
    states = a.new_empty(4 * steps, width)
    pre = a.new_empty(4 * steps, width)
    k = a.new_zeros(4, width)  # the stage slopes of the current step (zeros: stale rows get weight 0)
    coef, weights = _tableau(a)
    kt, coef = k.t(), coef.unbind(0)
    # row views made once: indexing in the loop would cost a Python-level select per use
    a_, ends_, states_, pre_, k_ = a.unbind(0), ends.unbind(0), states.unbind(0), pre.unbind(0), k.unbind(0)
    tanh = act == "tanh"
    r = 0
    for s, dt in enumerate(dts):
        v = ends_[s]
        for i in range(4):
            if i == 0:
                states_[r].copy_(v)
            else:
                torch.addmv(v, kt, coef[i], alpha=dt, out=states_[r])  # V_i = v + dt·Σ_j A_ij k_j
            torch.addmv(a_[r], mt, states_[r], out=pre_[r])  # p_i = a_i + V_i·M
            if tanh:
                torch.tanh(pre_[r], out=k_[i])
            else:
                k_[i].copy_(f(pre_[r]))
            r += 1
        torch.addmv(v, kt, weights, alpha=dt, out=ends_[s + 1])  # v + dt·Σ_i B_i k_i
    return ends, states, pre


def _rk4_adjoint(m: Tensor, states: Tensor, pre: Tensor, dts: Sequence[float], act: str, wanted: dict) -> tuple:
    """The exact reverse sweep of :func:`_rk4_steps`: given dL/dv at some step ends (``wanted``: step index ->
    [H]), returns (dL/da [4S, H], dL/dM [H, H]) -- what backpropagation through every step would give."""
    width = m.shape[0]
    slope = ACTIVATION_GRADS[act](pre)  # [4S, H] act'(p_i), all stages at once
    grad_pre = torch.zeros_like(pre)  # dL/dp_i = dL/da_i
    grad_states = m.new_zeros(4, width)  # dL/dV_i of the current step
    coef, _ = _tableau(m)
    coef_t = coef.t().contiguous().unbind(0)  # row i: A[l][i] for l = 0..3 (nonzero for l > i only)
    gst, ones = grad_states.t(), m.new_ones(4)
    slope_, grad_pre_, grad_states_ = slope.unbind(0), grad_pre.unbind(0), grad_states.unbind(0)
    g = wanted.get(len(dts), m.new_zeros(width))  # dL/dv at the end of the current step
    for s in range(len(dts) - 1, -1, -1):
        dt = dts[s]
        for i in range(3, -1, -1):
            r = 4 * s + i
            # dL/dk_i = dt·(B_i·g + Σ_{l>i} A_li · dL/dV_l)
            dk = torch.addmv(g, gst, coef_t[i], beta=dt * _B[i], alpha=dt)
            torch.mul(dk, slope_[r], out=grad_pre_[r])
            torch.mv(m, grad_pre_[r], out=grad_states_[i])  # p = a + V·M  ->  dL/dV = M · dL/dp
        g = torch.addmv(g, gst, ones)  # v enters every stage state with weight 1
        if s in wanted:
            g = g + wanted[s]
    return grad_pre, states.t() @ grad_pre  # dL/dM = Σ_i V_iᵀ · dL/dp_i


class _FusedRK4(torch.autograd.Function):
    """z(t) of the residual formulation by :func:`_rk4_steps`, with :func:`_rk4_adjoint` as backward.

    Why v: dz/dt = act((c(t) + z) · W_up) · W_down. With a(t) = c(t) · W_up, M = W_down · W_up and
    z = v · W_down, the ODE for v has ONE matrix product per evaluation, and RK4 on v is RK4 on z exactly
    (Runge-Kutta steps commute with linear maps).

    w_up: [d/2, H], w_down: [H, d/2] (any float dtype; the solve runs in c's dtype); c: [4S, d/2] the
    network input at z = 0 at every stage (no gradient); keep: step indices to return  ->  z [len(keep), d/2]
    """

    @staticmethod
    def forward(ctx, w_up: Tensor, w_down: Tensor, c: Tensor, dts: tuple, keep: tuple, act: str) -> Tensor:
        with _one_thread(c.device):
            up, down = w_up.to(c.dtype), w_down.to(c.dtype)
            m = down @ up
            ends, states, pre = _rk4_steps(c @ up, m, dts, act)
            v = ends[list(keep)]  # [n, H]
            ctx.save_for_backward(up, down, c, m, states, pre, v)
            ctx.dts, ctx.keep, ctx.act, ctx.dtypes = dts, keep, act, (w_up.dtype, w_down.dtype)
            return v @ down

    @staticmethod
    def backward(ctx, grad_z: Tensor):
        up, down, c, m, states, pre, v = ctx.saved_tensors
        with _one_thread(c.device):
            grad_z = grad_z.to(c.dtype)
            grad_v = grad_z @ down.t()  # [n, H]
            wanted: dict[int, Tensor] = {}
            for row, step in enumerate(ctx.keep):  # duplicates add up
                wanted[step] = wanted[step] + grad_v[row] if step in wanted else grad_v[row]
            grad_a, grad_m = _rk4_adjoint(m, states, pre, ctx.dts, ctx.act, wanted)
            grad_up = c.t() @ grad_a + down.t() @ grad_m  # a = c·W_up, M = W_down·W_up
            grad_down = v.t() @ grad_z + grad_m @ up.t()  # z = v·W_down
            return grad_up.to(ctx.dtypes[0]), grad_down.to(ctx.dtypes[1]), None, None, None, None


_SETUPS: dict = {}  # (times, grid knobs, base, dtype, device) -> (θ⁰, stage inputs c, dts, where, base)


def _fused_setup(inv_freq0: Tensor, times: list[float], *, prior_base, time_dt, log_dt, work, prior, length) -> tuple:
    """What a fused solve needs besides the weights, cached (a training step repeats one of few t):
    c [4S, d/2] the network input at z = 0 at every stage, the step lengths, the index of each requested
    time among the step ends, and the prior's solution x(t) = log θ⁰ + s(t) [n, d/2] (the solution at W = 0)."""
    key = (tuple(times), time_dt, log_dt, prior_base, prior, length, work, inv_freq0.dtype, inv_freq0.device)
    hit = _SETUPS.get(key)
    if hit is not None and torch.equal(hit[0], inv_freq0):
        return hit[1:]
    grid, where = fine_grid(times, time_dt, log_dt)
    dts = tuple(b - a for a, b in zip(grid, grid[1:]))
    with torch.no_grad(), _one_thread(inv_freq0.device):
        log_f0 = torch.log(inv_freq0).to(work)  # [d/2]
        start = torch.tensor(grid[:-1], dtype=work, device=inv_freq0.device)  # [S]
        step = torch.tensor(dts, dtype=work, device=inv_freq0.device)
        stage_t = (start.unsqueeze(1) + step.unsqueeze(1) * start.new_tensor(_C)).reshape(-1)  # [4S]
        c = residual_input(stage_t, log_f0, prior_base=prior_base, prior=prior, length=length)  # [4S, d/2]
        at = torch.tensor(times, dtype=work, device=inv_freq0.device).unsqueeze(-1)  # [n, 1]
        base = log_f0 + prior_shift(prior, at, log_f0, length=length)  # [n, d/2]
    if len(_SETUPS) >= 64:  # a table, a few dozen training t: plenty
        _SETUPS.clear()
    _SETUPS[key] = (inv_freq0.detach().clone(), c, dts, tuple(where), base)
    return c, dts, tuple(where), base


def _solve_fused(
    inv_freq0: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    times: list[float],
    *,
    act,
    prior_base,
    time_dt,
    log_dt,
    prior="ntk",
    length=None,
):
    """x(t) = log θ(t) for each requested t by :class:`_FusedRK4`, solved in float64 (float32 where a device
    has no float64), returned in inv_freq0's dtype.  -> [len(times), d/2]"""
    work = torch.float32 if inv_freq0.device.type == "mps" else torch.float64  # float64 forced: no round-off drift
    c, dts, where, base = _fused_setup(
        inv_freq0, times, prior_base=prior_base, time_dt=time_dt, log_dt=log_dt, work=work, prior=prior, length=length
    )
    if not dts:  # nothing to integrate: x = log θ⁰, with the weights still in the graph (zero gradient)
        return (base + 0 * w_down.sum()).to(inv_freq0.dtype)
    z = _FusedRK4.apply(w_up, w_down, c, dts, where, act)  # [n, d/2] float64
    return (base + z).to(inv_freq0.dtype)  # summed in float64, rounded once


# --- torchdiffeq ----------------------------------------------------------------------------------------


def _solve_torchdiffeq(y0: Tensor, func, times: list[float], *, method, time_dt, log_dt, rtol, atol) -> Tensor:
    """y(t) for each requested t by torchdiffeq's ``odeint``.  -> [len(times), *y0.shape]"""
    dtype, device = y0.dtype, y0.device
    unique = sorted({1.0, *times})
    at = torch.tensor(unique, dtype=dtype, device=device)
    if method in FIXED_GRID_METHODS:
        # Our grid, but odeint returns the requested times only: writing every grid point into its output
        # makes its backward quadratic in the number of steps.
        grid = torch.tensor(fine_grid(unique, time_dt, log_dt)[0], dtype=dtype, device=device)
        sol = odeint(func, y0, at, method=method, options=dict(grid_constructor=lambda f, y, t: grid))
    else:
        sol = odeint(func, y0, at, method=method, rtol=rtol, atol=atol)
    return sol[[unique.index(t) for t in times]]


# --- the entry point --------------------------------------------------------------------------------------


def solve_log_freqs(
    inv_freq0: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    times: Sequence[float],
    *,
    act: str,
    prior_base: float,
    method: str | None = None,
    time_dt: float = _DEFAULT["time_dt"],
    formulation: str = _DEFAULT["formulation"],
    rtol: float = _DEFAULT["rtol"],
    atol: float = _DEFAULT["atol"],
    log_dt: float | None = _DEFAULT["log_dt"],
    prior: str = "ntk",
    length: int | None = None,
) -> Tensor:
    """x(t) = log θ(t) for each t in ``times`` (sorted, each >= 1), starting from x(1) = log θ⁰.

    inv_freq0: [d/2] (its dtype is the result's; torchdiffeq methods also solve in it: float32 normally,
    float64 for references); w_up: [d/2, λd]; w_down: [λd, d/2]  ->  [len(times), d/2].
    Gradients flow to w_up and w_down (backpropagation through every step, or its exact equivalent); the
    fused method gives none to inv_freq0 (a buffer of the rotary module, never trained).
    The defaults are :class:`clex.CLEXConfig`'s; ``method=None`` is its method (rk4-fused) for the residual
    formulation and torchdiffeq's ``rk4`` for the reference one (which rk4-fused does not solve).
    prior: the closed-form part of the dynamics (:data:`clex.core.equations.PRIORS`: ``ntk``, the paper's, or
    ``yarn``, which needs L as ``length``); the reference formulation knows the NTK prior only.
    """
    times = _check_times(times)
    if method is None:
        method = _DEFAULT["method"] if formulation == "residual" else "rk4"
    if formulation not in ("residual", "reference"):
        raise ValueError(f"formulation must be 'residual' or 'reference', got {formulation!r}")
    if method in FUSED_METHODS and formulation != "residual":
        raise ValueError(
            f"method {method!r} solves formulation 'residual' only, got {formulation!r}: "
            "use formulation='residual', or a torchdiffeq method such as 'rk4'"
        )
    if not 0 < time_dt < math.inf or (log_dt is not None and not 0 < log_dt < math.inf):
        raise ValueError(
            f"time_dt and log_dt must be > 0 and finite (log_dt may be None), got {time_dt!r} and {log_dt!r}"
        )
    if not (0 < rtol < math.inf and 0 < atol < math.inf):
        raise ValueError(f"rtol and atol must be finite numbers > 0, got {rtol!r} and {atol!r}")
    if prior != "ntk" and formulation != "residual":
        raise ValueError(f"formulation 'reference' integrates the NTK prior only, got prior {prior!r}: use 'residual'")
    if method in FUSED_METHODS:
        return _solve_fused(
            inv_freq0,
            w_up,
            w_down,
            times,
            act=act,
            prior_base=prior_base,
            time_dt=time_dt,
            log_dt=log_dt,
            prior=prior,
            length=length,
        )
    dtype = inv_freq0.dtype
    log_f0 = torch.log(inv_freq0)
    w_up, w_down = w_up.to(dtype), w_down.to(dtype)
    if formulation == "residual":
        func = partial(
            residual_rhs,
            log_inv_freq0=log_f0,
            w_up=w_up,
            w_down=w_down,
            act=act,
            prior_base=prior_base,
            prior=prior,
            length=length,
        )
        y0 = torch.zeros_like(log_f0)
    else:
        func = partial(clex_rhs, w_up=w_up, w_down=w_down, act=act, prior_base=prior_base)
        y0 = log_f0
    if all(t == 1.0 for t in times):  # nothing to integrate
        sol = y0.expand(len(times), -1)
    else:
        kw = dict(method=method, time_dt=time_dt, log_dt=log_dt, rtol=rtol, atol=atol)
        sol = _solve_torchdiffeq(y0, lambda t, y: func(t, y), times, **kw)
    if formulation == "residual":  # x = log θ⁰ + (closed-form prior shift) + z
        shift = torch.stack([prior_shift(prior, t, log_f0, length=length) for t in times])
        sol = log_f0 + shift + sol
    return sol
