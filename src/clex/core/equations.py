"""The CLEX equations, as pure functions of tensors.

Symbols (CLEX paper, Chen et al. ICLR 2024, Sec. 3) and the names used here:

    t        length-scaling factor t = L'/L            ``t``          (python float, t >= 1)
    d        rotary dimension                          ``dim``        (even int)
    j        frequency-pair index, 0 .. d/2-1          ``j``          ([d/2] float32)
    θ⁰       the model's own inverse frequencies       ``inv_freq0``  ([d/2]), θ⁰_j = base^(-2j/d)
    x(t)     log-frequencies, x = log θ(t)             ``x``          ([d/2])
    W_up     up-projection   [d/2, λd]                 ``w_up``
    W_down   down-projection [λd, d/2]                 ``w_down``

The ODE (one per model, shared by every layer and head):

    dx/dt = act((x + log θ_NTK(t)) · W_up) · W_down + d/dt log θ_NTK(t),   x(1) = log θ⁰

with the NTK-aware prior, α(t) = 2t - 1:

    log θ_NTK,j(t)        = -(2j/d) · (log b + d/(d-2) · log α(t))
    d/dt log θ_NTK,j(t)   = -(2·2j) / ((d-2) · (2t-1))

Everything here is computed in float32 (or float64 when given float64) and has no state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

#: Activations of the ODE network, by the names the reference checkpoints use.
ACTIVATIONS = {"tanh": torch.tanh, "silu": F.silu}


def _silu_grad(p: Tensor) -> Tensor:
    s = torch.sigmoid(p)
    return s * (1 + p * (1 - s))


#: Their derivatives act'(p), for hand-written backward passes: tanh' = 1 - tanh², silu' = σ·(1 + p·(1 - σ)).
ACTIVATION_GRADS = {"tanh": lambda p: 1 - torch.tanh(p) ** 2, "silu": _silu_grad}


def pair_index(dim: int, *, dtype=torch.float32, device=None) -> Tensor:
    """j = 0, 1, ..., d/2 - 1 as a [d/2] tensor."""
    return torch.arange(dim // 2, dtype=dtype, device=device)


def ntk_log_freqs(t: float | Tensor, dim: int, base: float, *, dtype=torch.float32, device=None) -> Tensor:
    """log θ_NTK,j(t) = -(2j/d) · (log b + d/(d-2) · log α),  α = max(1, 2t - 1).   Shape [d/2]."""
    alpha = torch.clamp(2 * torch.as_tensor(t, dtype=dtype, device=device) - 1, min=1.0)
    j = pair_index(dim, dtype=dtype, device=device)
    return -(2 * j / dim) * (math.log(base) + dim / (dim - 2) * torch.log(alpha))


def ntk_log_freqs_rate(t: float | Tensor, dim: int, *, dtype=torch.float32, device=None) -> Tensor:
    """d/dt log θ_NTK,j(t) = -(2·2j) / ((d-2)(2t-1)).   Shape [d/2]; independent of the base."""
    j = pair_index(dim, dtype=dtype, device=device)
    return -(2 * 2 * j) / ((dim - 2) * (2 * torch.as_tensor(t, dtype=dtype, device=device) - 1))


def ntk_log_shift(t: float | Tensor, dim: int, *, dtype=torch.float32, device=None) -> Tensor:
    """log θ_NTK(t) - log θ_NTK(1) = -(2j/(d-2)) · log(2t - 1), the prior integrated in closed form.  [d/2]"""
    j = pair_index(dim, dtype=dtype, device=device)
    return -(2 * j / (dim - 2)) * torch.log(2 * torch.as_tensor(t, dtype=dtype, device=device) - 1)


def ntk_inv_freq(inv_freq0: Tensor, t: float) -> Tensor:
    """Closed form of an untrained CLEX layer (W_down = 0): θ_j(t) = θ⁰_j · (2t - 1)^(-2j/(d-2)).  [d/2]

    This is NTK-aware scaling with factor 2t - 1, the exact solution of the ODE when the network is zero.
    """
    dim = 2 * inv_freq0.numel()
    return inv_freq0 * torch.exp(ntk_log_shift(t, dim, dtype=inv_freq0.dtype, device=inv_freq0.device))


def network(h: Tensor, w_up: Tensor, w_down: Tensor, act: str) -> Tensor:
    """The learned part of the right-hand side: act(h · W_up) · W_down.   h: [..., d/2] -> [..., d/2]"""
    return ACTIVATIONS[act](h @ w_up) @ w_down


def clex_rhs(t: Tensor, x: Tensor, w_up: Tensor, w_down: Tensor, *, act: str, prior_base: float) -> Tensor:
    """dx/dt = act((x + log θ_NTK(t)) · W_up) · W_down + d/dt log θ_NTK(t), the paper's ODE as written.

    ``prior_base`` is the base b of the prior inside the network's input. The reference code always uses
    b = 10000 there, whatever the model's rope_theta (the derivative term does not depend on b).
    x: [d/2] -> [d/2]
    """
    dim = 2 * x.shape[-1]
    prior = ntk_log_freqs(t, dim, prior_base, dtype=x.dtype, device=x.device)
    rate = ntk_log_freqs_rate(t, dim, dtype=x.dtype, device=x.device)
    return network(x + prior, w_up.to(x.dtype), w_down.to(x.dtype), act) + rate


def residual_rhs(
    t: Tensor,
    z: Tensor,
    log_inv_freq0: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    *,
    act: str,
    prior_base: float,
    prior: str = "ntk",
    length: int | None = None,
) -> Tensor:
    """The same ODE with the prior integrated exactly: x(t) = log θ⁰ + s(t) + z(t), z(1) = 0,

        dz/dt = act((x(t) + log θ_prior(t)) · W_up) · W_down,    log θ_prior(t) = -(2j/d)·log b + s(t)

    with s(t) the prior's shift (:data:`PRIORS`; the paper's NTK prior by default). For the NTK prior this has
    identical solutions to :func:`clex_rhs`; the numerical solver only has to follow the smooth, bounded
    network term, so large steps stay accurate, and z stays small, so float32 round-off stays small.
    z: [d/2] -> [d/2]
    """
    c = residual_input(
        torch.as_tensor(t, dtype=z.dtype).reshape(1),
        log_inv_freq0.to(z.dtype),
        prior_base=prior_base,
        prior=prior,
        length=length,
    )[0]
    return network(c + z, w_up.to(z.dtype), w_down.to(z.dtype), act)


def residual_input(
    times: Tensor, log_inv_freq0: Tensor, *, prior_base: float, prior: str = "ntk", length: int | None = None
) -> Tensor:
    """The network's input at z = 0 in the residual formulation, for many t at once:

        c(t) = log θ⁰ + s(t) + log θ_prior(t),   so that   dz/dt = act((c(t) + z) · W_up) · W_down.

    times: [n] (any float dtype), log_inv_freq0: [d/2]  ->  [n, d/2] in log_inv_freq0's dtype
    """
    dim = 2 * log_inv_freq0.shape[-1]
    t = times.to(log_inv_freq0.dtype).unsqueeze(-1)  # [n, 1], broadcast against j: [d/2]
    kw = dict(dtype=log_inv_freq0.dtype, device=log_inv_freq0.device)
    shift = prior_shift(prior, t, log_inv_freq0, length=length)  # [n, d/2]
    return log_inv_freq0 + shift + (-(2 * pair_index(dim, **kw) / dim) * math.log(prior_base)) + shift


# --- priors: the closed-form part of the dynamics -------------------------------------------------------------


def yarn_ramp(log_inv_freq0: Tensor, length: int, *, beta_fast: float = 32.0, beta_slow: float = 1.0) -> Tensor:
    """YaRN's NTK-by-parts ramp r_j in [0, 1] over the pairs (Peng et al. 2023; transformers' ``yarn``):

        r_j = clamp((j - lo) / (hi - lo), 0, 1),   lo = floor(j(β_fast)),  hi = ceil(j(β_slow)),

    j(β) the (fractional) pair index whose wavelength fits β times into L: L·θ⁰_j / 2π = β. r = 0: the pair
    turns more than β_fast times in L (left alone); r = 1: less than β_slow times (fully interpolated).
    j(β) is read off log θ⁰ (linear in j for RoPE), so it matches transformers' formula for any base.
    log_inv_freq0: [d/2] -> [d/2]
    """
    half = log_inv_freq0.shape[-1]
    first, last = float(log_inv_freq0[0]), float(log_inv_freq0[-1])
    slope = (last - first) / max(half - 1, 1)  # d log θ⁰ / dj = -(2/d)·log b

    def pair_at(turns: float) -> float:
        return (math.log(2 * math.pi * turns / length) - first) / slope

    lo, hi = max(math.floor(pair_at(beta_fast)), 0), min(math.ceil(pair_at(beta_slow)), 2 * half - 1)
    hi = hi + 0.001 if hi == lo else hi  # as transformers: no division by zero
    j = pair_index(2 * half, dtype=log_inv_freq0.dtype, device=log_inv_freq0.device)
    return torch.clamp((j - lo) / (hi - lo), 0.0, 1.0)


def _ntk_prior(t: Tensor, log_inv_freq0: Tensor, *, length: int | None = None) -> Tensor:
    """ntk (the paper): s_j(t) = -(2j/(d-2)) · log(2t - 1), NTK-aware scaling with α = 2t - 1."""
    return ntk_log_shift(t, 2 * log_inv_freq0.shape[-1], dtype=log_inv_freq0.dtype, device=log_inv_freq0.device)


def _yarn_prior(t: Tensor, log_inv_freq0: Tensor, *, length: int | None = None) -> Tensor:
    """yarn: s_j(t) = log(r_j / t + 1 - r_j), YaRN's NTK-by-parts with factor t (:func:`yarn_ramp`), a
    continuous function of t: high-frequency pairs untouched, pairs that never turned in L interpolated
    (PI), a linear ramp between. Needs L (``length``)."""
    if not length:
        raise ValueError("the yarn prior needs the original length L (length=...), got None")
    ramp = yarn_ramp(log_inv_freq0, length)
    return torch.log(ramp / torch.as_tensor(t, dtype=log_inv_freq0.dtype, device=log_inv_freq0.device) + 1 - ramp)


#: The closed-form part of the dynamics, by name: ``s(t, log θ⁰, length=L) -> [..., d/2]`` with s(1) = 0,
#: so that the untrained model (W_down = 0) is θ(t) = θ⁰ · exp(s(t)).
PRIORS = {"ntk": _ntk_prior, "yarn": _yarn_prior}


def prior_shift(prior: str, t: float | Tensor, log_inv_freq0: Tensor, *, length: int | None = None) -> Tensor:
    """s(t) of the named prior (:data:`PRIORS`).  t: scalar or [n, 1]; log_inv_freq0: [d/2] -> [d/2] or [n, d/2]"""
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(map(repr, PRIORS))}, got {prior!r}")
    return PRIORS[prior](
        torch.as_tensor(t, dtype=log_inv_freq0.dtype, device=log_inv_freq0.device), log_inv_freq0, length=length
    )


def yarn_mscale(t: float | Tensor) -> float | Tensor:
    """YaRN's attention temperature for factor t: 0.1·ln t + 1 (1 for t <= 1), multiplied into cos and sin
    (so q·k is scaled by its square), as transformers' ``yarn`` attention_factor."""
    if isinstance(t, Tensor):
        return torch.where(t > 1, 0.1 * torch.log(t.clamp(min=1.0)) + 1.0, torch.ones_like(t))
    return 0.1 * math.log(t) + 1.0 if t > 1 else 1.0


def log_t_fraction(t: float | Tensor, max_factor: float) -> float | Tensor:
    """u(t) = ln t / ln max_factor in [0, 1]: 0 at t <= 1, 1 at max_factor and held there past it. The input of
    CLEX's learned functions of t (the learned temperature, the t-conditioned adapters' gates)."""
    if max_factor <= 1:
        return torch.zeros_like(t, dtype=torch.float32) if isinstance(t, Tensor) else 0.0
    if isinstance(t, Tensor):
        return torch.log(t.clamp(min=1.0, max=float(max_factor))) / math.log(max_factor)
    return math.log(min(max(t, 1.0), max_factor)) / math.log(max_factor)


def angle_cap(log_inv_freq0: Tensor, t: float | Tensor, length: int) -> Tensor:
    """The largest log-frequency a pair may have at factor t and stay inside the angles pre-training showed:

        cap_j(t) = log θ⁰_j - log t   for pairs with L·θ⁰_j < 2π (they never completed a turn in L),
                   +inf                otherwise (a pair that turned fully has seen every angle).

    At the farthest position L·t the angle p·θ_j then stays <= L·θ⁰_j. t: scalar or [n, 1] -> [d/2] or [n, d/2]
    """
    t = torch.as_tensor(t, dtype=log_inv_freq0.dtype, device=log_inv_freq0.device)
    never_turned = log_inv_freq0 < math.log(2 * math.pi / length)
    cap = log_inv_freq0 - torch.log(t.clamp(min=1.0))
    return torch.where(never_turned, cap, torch.full_like(cap, math.inf))


def rope_angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """angle[..., p, j] = position_p · θ_j, duplicated to the rotate-half layout [..., P, d].

    positions: [B, P] (float32), inv_freq: [d/2] or [B, d/2] -> [B, P, d]
    """
    if inv_freq.dim() == 1:
        inv_freq = inv_freq.unsqueeze(0)
    freqs = positions.unsqueeze(-1) * inv_freq.unsqueeze(1)  # [B, P, d/2]
    return torch.cat((freqs, freqs), dim=-1)
