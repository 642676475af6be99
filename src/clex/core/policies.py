"""Which t, and which positions: the samplers of training and the t policies of inference.

Three small registries, each a dict from a name to a function; configs name their entries, an unknown name
is refused by :class:`clex.CLEXConfig` with the list of valid names.

- ``T_SAMPLERS[name](generator, max_factor) -> t``: the length factor of one training step.
- ``POSITION_SAMPLERS[name](n, span, generator) -> positions``: n integer positions in [0, span) for a
  training sequence of n tokens that is rotated as if it were ``span`` tokens long.
- ``INFERENCE_T[name](kv_len, original_length, resolution) -> t``: the length factor for each row at
  inference, from the number of keys it attends to.

Every draw takes an explicit ``torch.Generator``: the same seed and step give the same t and positions on
every rank and after a resume.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends on (seed, step) only: identical on every data-parallel rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1))


# --- training: the length factor t of one step -----------------------------------------------------------


def _t_integer(gen: torch.Generator, max_factor: float) -> float:
    """t ~ Uniform{1, 2, ..., floor(max_factor)} (the paper)."""
    return float(torch.randint(1, int(max_factor) + 1, (1,), generator=gen).item())


def _t_uniform(gen: torch.Generator, max_factor: float) -> float:
    """t ~ Uniform[1, max_factor]."""
    return 1.0 + float(torch.rand((), generator=gen)) * (max_factor - 1.0)


def _t_log_uniform(gen: torch.Generator, max_factor: float) -> float:
    """log t ~ Uniform[0, log max_factor]: as many draws in [1, 2] as in [8, 16]."""
    return math.exp(float(torch.rand((), generator=gen)) * math.log(max_factor))


def _t_integer_linear(gen: torch.Generator, max_factor: float) -> float:
    """P(t = k) ∝ k on {1, ..., floor(max_factor)}: each t gets steps in proportion to the positions it spans
    (L·t), so the far end is not starved (uniform t gives t = max_factor 1/max_factor of the steps)."""
    top = int(max_factor)
    weights = torch.arange(1, top + 1, dtype=torch.float64)
    return float(torch.multinomial(weights, 1, generator=gen).item() + 1)


def _t_integer_quadratic(gen: torch.Generator, max_factor: float) -> float:
    """P(t = k) ∝ k² on {1, ..., floor(max_factor)}: each t gets steps in proportion to the query-key pairs of
    its window ((L·t)², what attention at that length has to get right); t = 8 of 8 gets 64/204 of the steps."""
    top = int(max_factor)
    weights = torch.arange(1, top + 1, dtype=torch.float64) ** 2
    return float(torch.multinomial(weights, 1, generator=gen).item() + 1)


def _t_integer_mixed(gen: torch.Generator, max_factor: float) -> float:
    """P(t = k) = ½·1/n + ½·k²/Σj² on {1, ..., n = floor(max_factor)}: half the steps as the paper's uniform
    draw, half as ``integer-quadratic``. For n = 8, t = 1 gets 6.5% of the steps (quadratic alone: 0.5%) and
    t = 8 gets 22% (uniform: 12.5%): the far end is fed without starving the short lengths."""
    top = int(max_factor)
    k = torch.arange(1, top + 1, dtype=torch.float64)
    weights = 0.5 / top + 0.5 * k**2 / (k**2).sum()
    return float(torch.multinomial(weights, 1, generator=gen).item() + 1)


T_SAMPLERS = {
    "integer": _t_integer,
    "integer-linear": _t_integer_linear,
    "integer-quadratic": _t_integer_quadratic,
    "integer-mixed": _t_integer_mixed,
    "uniform": _t_uniform,
    "log-uniform": _t_log_uniform,
}


def _power_weights(max_factor: float, power: int) -> Tensor:
    return torch.arange(1, int(max_factor) + 1, dtype=torch.float64) ** power


def _even(power: int):
    """A low-discrepancy t sequence with P(t = k) ∝ k^power on {1..floor(max_factor)}: draw n is the inverse CDF at
    u_n = frac(c + n·φ), φ = (√5 − 1)/2, c from the seed. Every prefix of n draws holds each t within about one
    draw of its expected count n·P(t) (i.i.d. draws: within about sqrt(n·P(t))), so runs of a few hundred steps
    differ by seed in the ORDER of their t, not in how many steps each t gets."""

    def sequence(step: int, seed: int, max_factor: float) -> float:
        offset = float(torch.rand((), generator=step_generator(seed, -1)))
        u = (offset + step * (math.sqrt(5) - 1) / 2) % 1.0
        cdf = torch.cumsum(_power_weights(max_factor, power), 0)
        return float(torch.searchsorted(cdf / cdf[-1], torch.tensor([u], dtype=torch.float64), right=True)[0] + 1)

    sequence.__doc__ = f"P(t = k) ∝ k^{power}, as an even (low-discrepancy) sequence: see _even."
    return sequence


#: Deterministic t sequences: ``T_SEQUENCES[name](step, seed, max_factor) -> t``, the t of training draw ``step``.
T_SEQUENCES = {"integer-quadratic-even": _even(2), "integer-cubic-even": _even(3)}


# --- training: the positions of one sequence ---------------------------------------------------------


def _positions_random(n: int, span: int, gen: torch.Generator) -> Tensor:
    """The paper's extrapolated positions: 0, then n-2 distinct sorted draws from [1, span-1), then span-1.

    With span == n this is 0, 1, ..., n-1. Gaps are spread over the whole sequence.
    """
    if span <= n:
        return torch.arange(n, dtype=torch.float32)
    inner = torch.randperm(span - 2, generator=gen)[: n - 2].sort().values + 1
    return torch.cat([torch.zeros(1), inner.float(), torch.full((1,), float(span - 1))])


def _positions_pose(n: int, span: int, gen: torch.Generator) -> Tensor:
    """PoSE (positional skip-wise training): two contiguous chunks, the second shifted by a random skip.

    Split c ~ Uniform{1..n-1}; skip s ~ Uniform{0..span-n}; positions 0..c-1, then c+s .. n-1+s.
    Local order is kept everywhere but at one place, and relative distances up to span-1 occur.
    """
    if span <= n:
        return torch.arange(n, dtype=torch.float32)
    cut = int(torch.randint(1, n, (1,), generator=gen))
    skip = int(torch.randint(0, span - n + 1, (1,), generator=gen))
    pos = torch.arange(n, dtype=torch.float32)
    pos[cut:] += skip
    return pos


POSITION_SAMPLERS = {"random": _positions_random, "pose": _positions_pose}


# --- inference: t from the key length ---------------------------------------------------------------


def _round_up(t: Tensor, resolution: int) -> Tensor:
    return t if resolution <= 0 else torch.ceil(t * resolution - 1e-6) / resolution


def _t_continuous(kv_len: Tensor, original_length: int, resolution: int) -> Tensor:
    """t = max(1, len/L), rounded up to the grid 1/resolution (resolution 0: exact)."""
    return torch.clamp(_round_up(kv_len.double() / original_length, resolution), min=1.0)


def _t_ceil(kv_len: Tensor, original_length: int, resolution: int) -> Tensor:
    """t = max(1, ceil(len/L)): the reference's integer factor, for parity with released checkpoints."""
    return torch.clamp(torch.ceil(kv_len.double() / original_length), min=1.0)


INFERENCE_T = {"continuous": _t_continuous, "integer": _t_ceil}
