"""The CLEX modules: the learned dynamics, and the rotary embedding that replaces a model's ``rotary_emb``.

`CLEXRotaryEmbedding` mirrors transformers' rotary interface, ``forward(x, position_ids) -> (cos, sin)``,
computed in float32 and returned in x's dtype, but without its ``torch.no_grad()``: CLEX trains through it.

- training mode: each forward draws t (``config.train_t``) and extrapolated positions
  (``config.position_sampler``) from a generator seeded by (``config.seed``, ``self.draws``); the incoming
  position ids are replaced. θ(t) is solved with gradients to the ODE parameters.
- inference mode: each row's t comes from its key length, max(position_id) + 1, by ``config.inference_t``;
  θ(t) comes from a table over a grid of t, built by ONE solve and rebuilt when the weights change.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor, nn

from .config import CLEXConfig
from .equations import angle_cap, log_t_fraction, prior_shift, rope_angles, yarn_mscale
from .policies import INFERENCE_T, POSITION_SAMPLERS, T_SAMPLERS, T_SEQUENCES, step_generator
from .solve import solve_log_freqs


def check_t(t, name: str = "t") -> float:
    """t as a float; a ValueError unless it is a finite real number >= 1 (not a bool, not a string)."""
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 1:
        raise ValueError(f"{name} must be a finite number >= 1, got {t!r}")
    return float(t)


class CLEXDynamics(nn.Module):
    """The only learned part of CLEX: act(h · W_up) · W_down (see :func:`clex.core.equations.clex_rhs`).

    ode_up_proj: [d/2, λd], kaiming-uniform (a=√5); ode_down_proj: [λd, d/2], zeros, so that an untrained
    model follows the NTK prior exactly.
    """

    def __init__(self, dim: int, param_factor: int = 1):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"the rotary dimension d must be even and >= 4 (the prior divides by d-2), got d={dim}")
        self.ode_up_proj = nn.Parameter(torch.empty(dim // 2, param_factor * dim))
        self.ode_down_proj = nn.Parameter(torch.zeros(param_factor * dim, dim // 2))
        nn.init.kaiming_uniform_(self.ode_up_proj, a=math.sqrt(5))

    def version(self) -> tuple:
        """Changes whenever a parameter is written (optimizer step, load_state_dict, .to)."""
        return tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in self._parameters.values())  # no children


class CLEXRotaryEmbedding(nn.Module):
    """Drop-in for a transformers ``rotary_emb``: one instance serves every layer of a model.

    inv_freq: θ⁰, the model's own inverse frequencies [d/2]; original_length: L; rope_theta: the model's
    base (used only when ``config.prior_base`` is None); attention_scaling: multiplies cos and sin, as in
    transformers (1.0 for plain RoPE).
    """

    def __init__(
        self,
        config: CLEXConfig,
        inv_freq: Tensor,
        *,
        original_length: int,
        rope_theta: float,
        attention_scaling: float = 1.0,
    ):
        super().__init__()
        if not isinstance(config, CLEXConfig):
            raise ValueError(f"CLEXRotaryEmbedding's config must be a CLEXConfig, got {type(config).__name__}")
        if (
            isinstance(original_length, bool)
            or not isinstance(original_length, numbers.Integral)
            or original_length < 1
        ):
            raise ValueError(f"CLEXRotaryEmbedding's original_length must be an integer >= 1, got {original_length!r}")
        if config.prior_base is None and not (
            isinstance(rope_theta, numbers.Real) and math.isfinite(rope_theta) and rope_theta > 1
        ):
            raise ValueError(f"CLEXRotaryEmbedding's rope_theta must be a finite number > 1, got {rope_theta!r}")
        if not (
            isinstance(attention_scaling, numbers.Real) and math.isfinite(attention_scaling) and attention_scaling > 0
        ):
            raise ValueError(
                f"CLEXRotaryEmbedding's attention_scaling must be a finite number > 0, got {attention_scaling!r}"
            )
        dim = 2 * inv_freq.numel()
        self.config = config
        self.rope_type = "clex"
        self.original_length = int(original_length)
        self.original_max_seq_len = self.max_seq_len_cached = self.original_length
        self.attention_scaling = attention_scaling
        self.prior_base = float(config.prior_base or rope_theta)
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.register_buffer("original_inv_freq", self.inv_freq.clone(), persistent=False)
        self.dynamics = CLEXDynamics(dim, config.param_factor)
        if config.mscale == "learned":  # log τ(t) = w₁·u + w₂·u², from 0: τ = 1 (no temperature) until trained
            self.temperature = nn.Parameter(torch.zeros(2))
        else:
            self.register_parameter("temperature", None)
        self._temperature_memo: tuple = (None, (0.0, 0.0))  # (parameter version, w as floats): see temperature_at
        self.draws = 0  # training forwards so far: step k draws from (config.seed, k); saved by the trainer
        self.last_t: Tensor | None = None  # [B] t of the latest forward, per row
        self.last_inv_freq: Tensor | None = None  # [B, d/2] θ of the latest forward (float32)
        self.query_scale = 1.0  # q·k factor of the latest forward (log_scale, mscale): see query_scale_for
        self._table: tuple | None = None  # (key, top t, θ table [n, d/2])
        self._exact: dict = {}  # exact continuous t -> θ, for t_resolution = 0
        self._decode_memo: dict = {}  # see _inference_frequencies
        self.inference_listener = None  # f(x, position_ids, θ [B, d/2]) once θ is chosen (inference; generation)
        self._warned_past_max = False
        self.log_scale_length: float | None = None  # pins log_scale's key length (see clex.hf.generation.fixed_t)

    # --- θ(t) ----------------------------------------------------------------------------------------

    def solve(self, times: list[float]) -> Tensor:
        """θ(t) for sorted ``times`` (>= 1), [len(times), d/2] float32, differentiable in the ODE weights."""
        c = self.config
        device = self.inv_freq.device
        here = torch.device("cpu") if c.solve_device == "cpu" else device  # copies below are differentiable
        top = float(c.max_factor)
        held = c.past_max == "prior" and times and times[-1] > top
        with torch.autocast(device.type, enabled=False):  # float32, whatever autocast says
            inv0 = self.inv_freq.float().to(here)  # [d/2]
            x = solve_log_freqs(
                inv0,
                self.dynamics.ode_up_proj.float().to(here),
                self.dynamics.ode_down_proj.float().to(here),
                [min(t, top) for t in times] if held else times,
                act=c.act,
                prior_base=self.prior_base,
                method=c.method,
                time_dt=c.time_dt,
                formulation=c.formulation,
                rtol=c.rtol,
                atol=c.atol,
                log_dt=c.log_dt,
                prior=c.prior,
                length=self.original_length,
            )  # [n, d/2]
            if held or c.angle_cap:
                log0, at = torch.log(inv0), torch.tensor(times, dtype=x.dtype, device=here).unsqueeze(-1)  # [n, 1]
            if held:  # past max_factor: x(t) = x(T) + s(t) - s(T), the learned residual of T kept
                beyond = prior_shift(c.prior, at, log0, length=self.original_length)
                at_top = prior_shift(c.prior, top, log0, length=self.original_length)
                x = torch.where(at > top, x + beyond - at_top, x)
            if c.angle_cap:  # pairs that never turned in L: θ_j(t) <= θ⁰_j / t (hard: capped pairs get no gradient)
                x = torch.minimum(x, angle_cap(log0, at, self.original_length))
            x = x.to(device)
        ones = sum(1 for t in times if t == 1.0)  # θ(1) is θ⁰ exactly, not exp(log θ⁰)
        return torch.cat([self.inv_freq.expand(ones, -1), torch.exp(x[ones:])])

    def inv_freq_at(self, t: float) -> Tensor:
        """θ(t) for any real t >= 1, solved now (with gradients when they are enabled).  [d/2] float32"""
        t = check_t(t)
        return self.inv_freq.clone() if t == 1 else self.solve([1.0, t])[1]

    def _grid_step(self) -> float:
        res = self.config.t_resolution if self.config.inference_t == "continuous" else 1
        return 1.0 / max(res, 1)

    def table(self, top: float | None = None) -> tuple[Tensor, Tensor]:
        """(t grid [n], θ [n, d/2]) over 1, 1+s, ..., top, s = 1/t_resolution, by ONE solve, cached until
        the ODE weights change. Past max_factor the ODE is integrated further (one warning)."""
        step = self._grid_step()
        need = max(float(self.config.max_factor), 1.0 if top is None else check_t(top))
        key = (self.dynamics.version(), self.inv_freq.device, step)
        if self._table is None or self._table[0] != key or self._table[1] < need:
            self._warn_past_max(need)
            top_t = float(self.config.max_factor) if need <= self.config.max_factor else math.ceil(need)
            n = int(round((top_t - 1) / step)) + 1
            times = [1 + k * step for k in range(n)]
            with torch.no_grad():
                self._table = (key, top_t, self.solve(times))
        _, top_t, theta = self._table
        return torch.arange(theta.shape[0], device=theta.device) * step + 1, theta

    def _wants_grad(self) -> bool:
        """Gradients to the ODE weights are wanted: θ must be solved with a graph, not read from a cache."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.dynamics.parameters())

    def _warn_past_max(self, t: float) -> None:
        if t > self.config.max_factor and not self._warned_past_max:
            beyond = (
                "following the prior's shape past it, the learned part held (past_max='prior')"
                if self.config.past_max == "prior"
                else "integrating the ODE further (past_max='ode')"
            )
            warnings.warn(
                f"CLEX: length factor t={t:g} is past max_factor={self.config.max_factor:g} (the trained range, "
                f"{self.original_length * self.config.max_factor:g} tokens); {beyond}.",
                stacklevel=4,
            )
            self._warned_past_max = True

    def frequencies(self, t_rows: Tensor) -> Tensor:
        """θ for each row's t.  t_rows: [B] float64 -> [B, d/2] float32."""
        uniq = sorted(set(t_rows.tolist()))
        for t in uniq:
            check_t(t)
        self._warn_past_max(uniq[-1])
        wants_grad = self._wants_grad()
        step = self._grid_step()
        on_grid = all(abs((t - 1) / step - round((t - 1) / step)) < 1e-6 for t in uniq)
        if wants_grad or not on_grid:
            if wants_grad:
                theta = self.solve([1.0] + uniq)[1:]
            else:  # exact continuous t: solve each new t once per weight version
                key = self.dynamics.version()
                if self._exact.get("key") != key:
                    self._exact = {"key": key}
                missing = [t for t in uniq if t not in self._exact]
                if missing:
                    with torch.no_grad():
                        self._exact.update(zip(missing, self.solve([1.0] + missing)[1:]))
                theta = torch.stack([self._exact[t] for t in uniq])
            index = torch.tensor([uniq.index(t) for t in t_rows.tolist()], device=theta.device)
            return theta[index]
        _, theta = self.table(top=max(uniq))
        index = torch.round((t_rows - 1) / step).long().to(theta.device)
        return theta[index]

    # --- which t ---------------------------------------------------------------------------------------

    def t_for_length(self, kv_len: Tensor) -> Tensor:
        """Each row's t from its key length, by the inference policy.  kv_len: [B] -> [B] float64"""
        c = self.config
        if c.inference_t == "fixed":
            return torch.full(kv_len.shape, float(c.fixed_t), dtype=torch.float64)
        return INFERENCE_T[c.inference_t](kv_len.detach().cpu(), self.original_length, c.t_resolution)

    def _inference_frequencies(self, position_ids: Tensor) -> tuple[Tensor, Tensor, float]:
        """(t [B] float64, θ [B, d/2], longest key length) for inference, each row's key length being
        max(position_id) + 1 (padding excluded).

        Memoised for decoding, where it runs once per token: the t policy is evaluated once for a block of
        lengths (vectorised, the same function and float64 arithmetic, so the same t), and θ is reused
        while every row keeps its t. The memo is keyed by the policy's fields and the weights' version, and
        skipped when gradients to the ODE weights are wanted (θ then carries a graph).
        """
        lengths = [n + 1 for n in position_ids.amax(dim=-1).tolist()]  # [B] python ints
        if self._wants_grad():
            t_rows = self.t_for_length(torch.tensor(lengths))
            return t_rows, self.frequencies(t_rows), float(max(lengths))
        c = self.config
        policy = (c.inference_t, c.t_resolution, c.fixed_t, self.original_length)
        key = (policy, self.dynamics.version(), self.inv_freq.device)
        memo = self._decode_memo
        if memo.get("key") != key:
            memo.clear()
            memo["key"] = key
        start, ts = memo.get("lengths", (0, []))
        lo, hi = min(lengths), max(lengths)
        if lo < start or hi >= start + len(ts):  # a new block of lengths: one vectorised policy call
            start = lo
            ts = self.t_for_length(torch.arange(start, hi + 1024)).tolist()
            memo["lengths"] = (start, ts)
        t_key = tuple(ts[n - start] for n in lengths)
        last = memo.get("last")
        if last is None or last[0] != t_key:
            t_rows = torch.tensor(t_key, dtype=torch.float64)
            last = memo["last"] = (t_key, t_rows, self.frequencies(t_rows))
        return last[1], last[2], float(hi)

    def draw(self, n: int) -> tuple[float, Tensor]:
        """One training draw: t and n positions, from (seed, draws). Advances ``draws``.  -> (t, [n] float32)

        ``position_span="sequence"`` (the paper): positions span n·t (first 0, last ceil(n·t)-1); for n > L
        they are divided by n // L, so that the span is about L·t and t keeps its meaning, the factor over
        the original length — but then t < n/L packs several tokens per unit of position, which inference
        never does. ``"original"``: positions are integers spanning L·t (rows shorter than L still see
        L·t), with t raised to n/L where it is smaller (a row of n tokens is at least a factor n/L).
        """
        c = self.config
        gen = step_generator(c.seed, self.draws)
        if c.train_t in T_SEQUENCES:
            t = T_SEQUENCES[c.train_t](self.draws, c.seed, c.max_factor)
        else:
            t = T_SAMPLERS[c.train_t](gen, c.max_factor)
        self.draws += 1
        length = self.original_length
        if c.position_span == "original":
            t = max(t, n / length)
            span = max(n, math.ceil(length * t - 1e-9))
            return t, POSITION_SAMPLERS[c.position_sampler](n, span, gen)
        span = max(n, math.ceil(n * t - 1e-9))
        return t, POSITION_SAMPLERS[c.position_sampler](n, span, gen) / max(1, n // length)

    # --- forward --------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin: [B, P, d] in x's dtype, like transformers' rotary modules.  position_ids: [B, P]"""
        batch = position_ids.shape[0]
        if self.training:
            t, pos = self.draw(position_ids.shape[-1])
            positions = pos.to(x.device).unsqueeze(0).expand(batch, -1)  # [B, P]
            if t == 1:  # plain frequencies; 0·W keeps the ODE weights in the graph (DDP's unused check)
                theta = self.inv_freq + 0 * sum(p.sum() for p in self.dynamics.parameters())
            else:
                theta = self.solve([1.0, t])[1]
            theta = theta.unsqueeze(0).expand(batch, -1)  # [B, d/2]
            self.last_t = torch.full((batch,), t, dtype=torch.float64)
            kv_len = float(pos.max()) + 1  # from the host copy: no device sync
        else:
            positions = position_ids.float()
            t_rows, theta, kv_len = self._inference_frequencies(position_ids)
            vars(self).update(last_t=t_rows)  # plain attributes: skips nn.Module.__setattr__ (once per token)
            if self.inference_listener is not None:
                self.inference_listener(x, position_ids, theta)
        top_t = float(t) if self.training else float(t_rows.max())
        magnitude = None  # a learned temperature in training: on cos and sin as sqrt(τ(t)), a tensor with gradients
        if self.training and self.temperature is not None:
            magnitude = self.temperature_at(top_t, grad=True).sqrt()
            scale = self.query_scale_for(kv_len, top_t, temperature=False)
        else:  # inference: the whole q·k factor in `scaling`, so cached keys never hold t (see query_scale_for)
            scale = self.query_scale_for(kv_len, top_t)
        vars(self).update(last_inv_freq=theta.detach() if theta.requires_grad else theta, query_scale=scale)
        with torch.autocast(x.device.type, enabled=False):
            emb = rope_angles(positions, theta.to(x.device))  # [B, P, d] float32
            cos, sin = emb.cos(), emb.sin()
            if self.attention_scaling != 1.0:  # (skipped at 1: the same values, two ops fewer per decode step)
                cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
            if magnitude is not None:
                cos, sin = cos * magnitude.to(cos.device), sin * magnitude.to(sin.device)
        if x.dtype != torch.float32:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return cos, sin

    def query_scale_for(self, kv_len: float, t: float, *, temperature: bool = True) -> float:
        """The factor on q·k for a forward over ``kv_len`` keys at length factor ``t`` (its largest):
        max(1, log(len)/log(L)) with ``log_scale`` (len pinned by ``log_scale_length`` when set), times YaRN's
        (0.1·ln t + 1)² with ``mscale="yarn"``, times the learned τ(t) with ``mscale="learned"`` (``temperature``
        False leaves τ out); 1 otherwise. At inference it multiplies the logits, not cos/sin, so cached keys stay
        valid when t changes (the exact key cache re-rotates angles only); the transformers glue
        (:func:`clex.apply_clex`) applies it through each attention module's ``scaling``. In training a learned
        τ rides on cos and sin instead (sqrt(τ) on each: the same logits, with gradients to its weights)."""
        c = self.config
        factor = 1.0
        if c.log_scale:
            kv_len = self.log_scale_length or kv_len
            factor = max(1.0, math.log(kv_len) / math.log(self.original_length))
        if c.mscale == "yarn":
            factor *= yarn_mscale(t) ** 2
        if c.mscale == "learned" and temperature:
            factor *= float(self.temperature_at(t))
        return factor

    def temperature_at(self, t: float, *, grad: bool = False) -> Tensor:
        """The learned attention temperature τ(t) = exp(w₁·u + w₂·u²), u = ln t / ln max_factor (u held at 1 past
        max_factor; τ(1) = 1 exactly). A float32 scalar tensor: with gradients to w when ``grad``, else a CPU
        value read from w once per weight version (no device sync per forward). 1 without ``mscale="learned"``."""
        if self.temperature is None:
            return torch.ones(())
        u = log_t_fraction(check_t(t), float(self.config.max_factor))
        if grad:
            w = self.temperature.float()
            return torch.exp(w[0] * u + w[1] * u * u)
        key = (self.temperature.data_ptr(), self.temperature._version, self.temperature.device)
        if self._temperature_memo[0] != key:
            self._temperature_memo = (key, tuple(self.temperature.detach().float().cpu().tolist()))
        w1, w2 = self._temperature_memo[1]
        return torch.tensor(math.exp(w1 * u + w2 * u * u))

    def extra_repr(self) -> str:
        c = self.config
        return f"d={2 * self.inv_freq.numel()}, L={self.original_length}, max_factor={c.max_factor}, act={c.act}"
