"""`CLEXConfig`: every knob of CLEX in one validated dataclass.

Key names follow the reference checkpoints (``max_factor``, ``param_factor``, ``act``, ``time_dt``) so that
their configs map 1:1. Dicts are converted at the boundary only (:meth:`CLEXConfig.from_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_SOLVERS

from .equations import ACTIVATIONS, PRIORS
from .policies import INFERENCE_T, POSITION_SAMPLERS, T_SAMPLERS, T_SEQUENCES

#: Our own solvers (fixed grid, residual formulation): ``rk4-fused`` is torchdiffeq's rk4 written as one
#: plain-torch loop in float64 with an exact hand-written backward.
FUSED_METHODS = ("rk4-fused",)
#: Solvers we accept: ours, then torchdiffeq's own registry (so the two cannot drift; ``scipy_solver`` left out:
#: it needs scipy and a solver option). Fixed-grid ones step by at most min(time_dt, log_dt·(t - 1/2));
#: adaptive ones (dopri5, dopri8, bosh3, ...) use rtol/atol.
SOLVER_METHODS = (*FUSED_METHODS, *(m for m in TORCHDIFFEQ_SOLVERS if m != "scipy_solver"))
#: How to integrate: ``residual`` integrates the NTK prior exactly and the network numerically (ours),
#: ``reference`` integrates the whole right-hand side numerically, as the authors' code does.
FORMULATIONS = ("residual", "reference")
#: What training positions span: n·t (the paper) or max(n, L)·t.
POSITION_SPANS = ("sequence", "original")
#: Where the ODE is solved when the model is on an accelerator (see CLEXConfig.solve_device).
SOLVE_DEVICES = ("cpu", "model")
#: What θ(t) does past max_factor: ``ode`` integrates the network further (the paper's ODE as it stands);
#: ``prior`` keeps the learned residual of max_factor and follows the prior's own shape beyond it.
PAST_MAX = ("ode", "prior")
#: Attention temperature as a function of t: ``none`` (the paper), ``yarn`` (q·k × (0.1·ln t + 1)², YaRN's),
#: ``learned`` (q·k × exp(w₁·u + w₂·u²), u = ln t / ln max_factor, w learned from 0: see
#: :meth:`clex.core.rotary_embedding.CLEXRotaryEmbedding.temperature_at`).
MSCALES = ("none", "yarn", "learned")
#: Inference t policies: the registry in :mod:`clex.core.policies` plus ``fixed`` (t set once, e.g. for generation).
INFERENCE_POLICIES = (*INFERENCE_T, "fixed")


def check_keys(keys: Iterable[str], allowed: Iterable[str], where: str = "CLEXConfig") -> None:
    """Refuse keys that are not in ``allowed``: a ValueError naming the first unknown one, the closest valid
    name ("did you mean") and every valid name."""
    allowed = sorted(allowed)
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where} has no field {key!r}{hint}; valid fields: {', '.join(allowed)}")


@dataclass(frozen=True)
class CLEXConfig:
    # --- the dynamics (saved with the model; the names of the reference checkpoints) ---
    max_factor: float = 16.0  # largest t drawn in training; the frequency table covers [1, max_factor]
    param_factor: int = 1  # λ: the network's hidden width is λ·d
    act: str = "tanh"  # activation of the ODE network: tanh (paper default) or silu
    prior_base: float | None = 10000.0  # b of the prior inside the network; 10000 as the reference, None = rope_theta
    # Beyond the paper (defaults keep it; see README "CLEX past 4x"): what the network learns a residual of,
    # guard rails on the angles, and the attention temperature.
    prior: str = "ntk"  # closed-form part of the dynamics: ntk (the paper: NTK-aware, α = 2t-1) or yarn
    # (YaRN's NTK-by-parts with factor t); see clex.core.equations.PRIORS
    angle_cap: bool = False  # pairs that never turned in L keep every angle <= L·θ⁰_j: θ_j(t) <= θ⁰_j / t
    past_max: str = "ode"  # past max_factor: ode (integrate the network on) or prior (hold its residual)
    mscale: str = "none"  # attention temperature: none, yarn (q·k × (0.1·ln t + 1)², as YaRN), or learned
    # Weights conditioned on t (clex.hf.t_adapter): a low-rank adapter on each target linear whose components are
    # gated by g(t) = u^p (u = ln t / ln max_factor, p learned per component): 0 at t = 1, full at max_factor.
    adapter_rank: int = 0  # components per target (0: none, the paper)
    adapter_targets: tuple = ("q_proj", "o_proj")  # linear layers (name suffixes) that get one; q/o keep the key
    # cache exact when t changes, k/v (which write the cache) only at a fixed t (generate_fixed_t, an export)
    adapter_scale: float = 2.0  # s on the adapters' output (as LoRA's alpha / rank; the recipes' 16 / 8)

    # --- the solver ---
    # Defaults measured in benchmarks/solve.py: θ(t) within 1e-5 relative of a float64 fine-step solve and
    # gradients within 1e-4 of the reference's (tests/core/test_solver.py), at 20 steps for t = 16 instead of 1,500.
    time_dt: float = 1.0  # largest step of fixed-grid solvers (the reference: rk4 at uniform steps of 0.01)
    log_dt: float | None = 0.25  # steps near t = 1 are at most log_dt·(t - 1/2); None = uniform steps of time_dt
    method: str = "rk4-fused"  # see SOLVER_METHODS
    formulation: str = "residual"  # see FORMULATIONS
    rtol: float = 1e-7  # adaptive solvers only
    atol: float = 1e-9  # adaptive solvers only
    solve_device: str = "cpu"  # where every ODE solve runs (a training step's, the inference table's): cpu (the
    # d/2-wide solve is a few hundred tiny kernels on a GPU, launch-bound) or model

    # --- training: what one step draws ---
    train_t: str = "integer"  # t sampler: integer (paper), integer-linear (P(t) ∝ t), integer-quadratic (∝ t²),
    # integer-mixed (½ integer + ½ integer-quadratic), uniform, log-uniform; or an even sequence (each t gets its
    # expected share of the steps, whatever the seed): integer-quadratic-even (∝ t²), integer-cubic-even (∝ t³)
    position_sampler: str = "random"  # extrapolated positions: random (paper) or pose
    position_span: str = "sequence"  # positions span n·t (sequence: the paper) or max(n, L)·t (original: rows
    # shorter than L still see positions up to L·t)
    seed: int = 0  # t and positions of step k depend on (seed, k) only

    # --- inference ---
    inference_t: str = "continuous"  # continuous (t = max(1, len/L)), integer (ceil, the reference), fixed
    t_resolution: int = 16  # continuous t is rounded up to multiples of 1/t_resolution; 0 = exact
    fixed_t: float | None = None  # the t of the "fixed" policy
    original_length: int | None = None  # L; None = the model's max_position_embeddings
    log_scale: bool = False  # scale queries by log(len)/log(L) past L (CLEX-7B-16K was trained with it)

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"CLEXConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                bad(name, "one of " + ", ".join(repr(a) for a in allowed))

        def number(name, ok, expected, integer=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
                bad(name, expected)
            if not math.isfinite(v) or not ok(v):
                bad(name, expected)

        number("max_factor", lambda v: v >= 1, "a number >= 1")
        number("param_factor", lambda v: v >= 1, "an integer >= 1", integer=True)
        number("time_dt", lambda v: v > 0, "a number > 0")
        if self.log_dt is not None:
            number("log_dt", lambda v: v > 0, "a number > 0, or None for uniform steps of time_dt")
        number("rtol", lambda v: v > 0, "a number > 0")
        number("atol", lambda v: v > 0, "a number > 0")
        number("t_resolution", lambda v: v >= 0, "an integer >= 0 (0 = exact continuous t)", integer=True)
        number("seed", lambda v: True, "an integer", integer=True)
        number("adapter_rank", lambda v: v >= 0, "an integer >= 0 (0: no t-conditioned adapter)", integer=True)
        number("adapter_scale", lambda v: v > 0, "a number > 0")
        targets = self.adapter_targets
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            bad("adapter_targets", "a non-empty list of linear layer names, e.g. ['q_proj', 'o_proj']")
        if not all(isinstance(x, str) and x and "." not in x for x in targets) or len(set(targets)) != len(targets):
            bad("adapter_targets", "distinct layer names without dots, e.g. ['q_proj', 'o_proj']")
        choice("act", tuple(ACTIVATIONS))
        choice("prior", tuple(PRIORS))
        choice("past_max", PAST_MAX)
        choice("mscale", MSCALES)
        if not isinstance(self.angle_cap, bool):
            bad("angle_cap", "True or False")
        choice("method", SOLVER_METHODS)
        choice("formulation", FORMULATIONS)
        if self.method == "rk4-fused" and self.formulation != "residual":
            raise ValueError(
                f"CLEXConfig.method='rk4-fused' solves formulation 'residual' only, got formulation="
                f"{self.formulation!r}: set formulation='residual', or a torchdiffeq method such as method='rk4'"
            )
        if self.prior != "ntk" and self.formulation != "residual":
            raise ValueError(
                f"CLEXConfig.prior={self.prior!r} needs formulation='residual' (the reference formulation integrates "
                f"the NTK prior only), got formulation={self.formulation!r}"
            )
        choice("train_t", (*T_SAMPLERS, *T_SEQUENCES))
        choice("position_sampler", tuple(POSITION_SAMPLERS))
        choice("position_span", POSITION_SPANS)
        choice("solve_device", SOLVE_DEVICES)
        choice("inference_t", INFERENCE_POLICIES)
        if self.prior_base is not None:
            number("prior_base", lambda v: v > 1, "a number > 1, or None for the model's rope_theta")
        if self.original_length is not None:
            number("original_length", lambda v: v >= 1, "an integer >= 1, or None", integer=True)
        if self.fixed_t is not None:
            number("fixed_t", lambda v: v >= 1, "a number >= 1, or None")
            if self.inference_t != "fixed":
                raise ValueError(
                    f"CLEXConfig.fixed_t applies to inference_t='fixed' only, got fixed_t={self.fixed_t!r} with "
                    f"inference_t={self.inference_t!r}: set inference_t='fixed', or fixed_t=None"
                )
        elif self.inference_t == "fixed":
            raise ValueError("CLEXConfig.inference_t='fixed' needs fixed_t (a number >= 1), got fixed_t=None")
        if not isinstance(self.log_scale, bool):
            bad("log_scale", "True or False")
        # normalisations (frozen: through object.__setattr__, here only)
        object.__setattr__(self, "param_factor", int(self.param_factor))
        object.__setattr__(self, "t_resolution", int(self.t_resolution))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "adapter_rank", int(self.adapter_rank))
        object.__setattr__(self, "adapter_targets", tuple(self.adapter_targets))
        if self.original_length is not None:
            object.__setattr__(self, "original_length", int(self.original_length))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adapter_targets"] = list(self.adapter_targets)  # JSON and YAML hold lists
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CLEXConfig:
        """Every key must be a field: an unknown one is refused with the valid names (foreign keys of saved
        configs, such as rope_theta or the authors' ``type``, are mapped by :mod:`clex.hf.loading`)."""
        if not isinstance(d, dict):
            raise ValueError(f"CLEXConfig.from_dict needs a dict, got {type(d).__name__}")
        check_keys(d, cls.field_names())
        return cls(**d)

    def replace(self, **changes) -> CLEXConfig:
        """A copy with ``changes``, validated again (the config itself is immutable)."""
        check_keys(changes, self.field_names())
        return dataclasses.replace(self, **changes)
