"""What one request is served with: its length factor t and the frequencies, temperatures and cache key of that t.

A request that can end at ``length`` tokens (prompt + max_tokens) is served at ONE t for its whole life, chosen
from that final length, so every key it caches is rotated with the θ(t) its queries attend with. The same
object answers in the API process (t and the prefix-cache key of a request) and in the workers (θ(t) and the
scales), so both sides agree by construction. Three kinds, from a model's config:

- ``clex``: a folder saved by clex (``rope_parameters.rope_type == "clex"``). t is the model's own t policy at the
  final length (:meth:`clex.CLEXRotaryEmbedding.generation_t`, what :func:`clex.generate_fixed_t` pins), θ(t) is
  what a forward at that fixed t uses (:meth:`~clex.CLEXRotaryEmbedding.fixed_frequencies`), and the query scale
  is ``query_scale_for(length, t)``: a ``log_scale`` model's log(length)/log(L) pinned at the final length, times
  YaRN's temperature with ``mscale="yarn"``. So a served request equals
  ``clex.hf.generation.fixed_t(model, t, log_scale_length=length)``.
- ``yarn``: a stock model with YaRN (``rope_type == "yarn"``, factor F, original length L): YaRN with factor t
  instead of F, t = max(1, length / L) rounded up to 1/16. At t = 1 the model's own frequencies (a short request
  is served as the unscaled model); at t = F the static YaRN the config describes, attention factor included.
- ``dynamic``: dynamic NTK (``rope_type == "dynamic"``), with the sequence length of transformers' formula set to
  t·L, the same t grid.

Everything else is refused with one line naming the rope type. The prefix-cache key (:meth:`cache_key`) names t
and the query scale: two requests share cached blocks only if every layer's keys were computed alike (the query
scale changes the hidden states of the layers after the first, so it belongs in the key too).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.config import CLEXConfig
from ..core.policies import INFERENCE_T
from ..core.rotary_embedding import CLEXRotaryEmbedding
from ..hf.loading import ODE_WEIGHTS, clex_config_of

#: rope types served per request (a plain model has nothing to scale: serve it with vLLM as it is)
KINDS = ("clex", "yarn", "dynamic")
#: t grid of the stock kinds: t rounded up to multiples of 1/T_RESOLUTION (clex's own continuous policy's default)
T_RESOLUTION = 16


def default_inv_freq(base: float, dim: int) -> Tensor:
    """A model's own RoPE frequencies θ⁰_j = base^(-2j/d), float32, computed as transformers computes them."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


class RequestScaling:
    """One model's per-request scaling. ``t_for(length)``; ``theta(t)`` [d/2] float32; ``cos_sin_scale(t)`` (multiplies
    cos and sin, so cached keys carry it); ``query_scale(length, t)`` (multiplies queries only); ``cache_key(length)``.
    ``scales_cos_sin`` / ``scales_queries``: whether any request can get a factor other than 1 (the workers skip
    the multiplication otherwise)."""

    kind = ""
    scales_cos_sin = False
    scales_queries = False

    def __init__(self, *, original_length: int, rotary_dim: int, base: float, max_length: int):
        self.original_length = int(original_length)
        self.rotary_dim = int(rotary_dim)
        self.base = float(base)
        self.max_length = int(max_length)  # the longest request the config describes (a default max_model_len)
        self.inv_freq = default_inv_freq(self.base, self.rotary_dim)
        self._theta: dict[float, Tensor] = {}  # t -> θ(t): at most one entry per t of the grid

    def t_for(self, length: int) -> float:
        return float(self.t_for_lengths(torch.tensor([int(length)]))[0])

    def t_for_lengths(self, lengths: Tensor) -> Tensor:
        """t of requests of final lengths ``lengths`` (a length below 1 counts as 1), float64."""
        return INFERENCE_T["continuous"](lengths.clamp(min=1), self.original_length, T_RESOLUTION)

    def theta(self, t: float) -> Tensor:
        if t not in self._theta:
            self._theta[t] = self.inv_freq.clone() if t == 1.0 else self._solve(t).float()
        return self._theta[t]

    def _solve(self, t: float) -> Tensor:
        raise NotImplementedError

    def cos_sin_scale(self, t: float) -> float:
        return 1.0

    def query_scale(self, length: int, t: float) -> float:
        return 1.0

    def cache_key(self, length: int) -> str:
        """The prefix-cache salt of a request of final ``length``: equal keys <=> equal keys in every layer."""
        t = self.t_for(length)
        return f"{self.kind}:t={t!r}:q={self.query_scale(length, t)!r}"

    def load_ode(self, weights: dict[str, Tensor]) -> None:
        """Only CLEX has weights of its own; the stock kinds refuse any."""
        if weights:
            raise ValueError(f"a {self.kind} model has no ODE weights, but the folder holds {sorted(weights)}")

    def describe(self) -> str:
        return f"{self.kind}, L={self.original_length}, d={self.rotary_dim}"


class CLEXScaling(RequestScaling):
    """A CLEX model: the t policy, θ(t) and the query scale of its own :class:`~clex.CLEXRotaryEmbedding`."""

    kind = "clex"

    def __init__(self, config: CLEXConfig, *, rotary_dim: int, base: float):
        if getattr(config, "adapter_rank", 0):
            raise ValueError(
                f"a CLEX model with t-conditioned adapters (adapter_rank={config.adapter_rank}) cannot be served per "
                "request: its weights change with t, and a vLLM batch has one set of weights; serve a pinned export "
                "(clex export merges them at N/L) or generate with clex"
            )
        L = int(config.original_length)
        super().__init__(original_length=L, rotary_dim=rotary_dim, base=base, max_length=int(L * config.max_factor))
        self.rotary = CLEXRotaryEmbedding(config, self.inv_freq, original_length=L, rope_theta=self.base).eval()
        self.scales_queries = config.log_scale or config.mscale != "none"
        self._loaded = False

    def load_ode(self, weights: dict[str, Tensor]) -> None:
        """The ODE weights, by the suffixes clex saves them under (``ode_up_proj``, ``ode_down_proj``), and a learned
        temperature's (``rotary_emb.temperature``, with ``mscale="learned"``)."""
        dyn = self.rotary.dynamics
        own = [(dyn, name, name) for name in ODE_WEIGHTS]
        if getattr(self.rotary, "temperature", None) is not None:
            own.append((self.rotary, "temperature", "rotary_emb.temperature"))
        elif any(k.endswith("rotary_emb.temperature") for k in weights):
            raise ValueError("the CLEX folder holds a learned temperature, but its config says mscale != 'learned'")
        for module, name, suffix in own:
            hits = [v for k, v in weights.items() if k.endswith(suffix)]
            if len(hits) != 1:
                raise ValueError(f"expected one `{suffix}` tensor in the CLEX folder's weights, found {len(hits)}")
            param = getattr(module, name)
            if hits[0].shape != param.shape:
                raise ValueError(f"`{name}` has shape {tuple(hits[0].shape)}, expected {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(hits[0].detach().to(device="cpu", dtype=param.dtype))
        self._theta.clear()
        self._loaded = True

    def t_for_lengths(self, lengths: Tensor) -> Tensor:
        c = self.rotary.config
        policy = c.inference_t if c.inference_t in INFERENCE_T else "continuous"  # generation_t's rule, vectorised
        return INFERENCE_T[policy](lengths.clamp(min=1), self.original_length, c.t_resolution)

    def _solve(self, t: float) -> Tensor:
        if not self._loaded:
            raise RuntimeError("CLEX's ODE weights were not loaded before θ(t) was asked for")
        return self.rotary.fixed_frequencies(t)

    def cos_sin_scale(self, t: float) -> float:
        return float(self.rotary.attention_scaling)

    def query_scale(self, length: int, t: float) -> float:
        return float(self.rotary.query_scale_for(float(max(1, int(length))), t))

    def describe(self) -> str:
        c = self.rotary.config
        extra = (
            [f"max_factor={c.max_factor:g}"]
            + ["log_scale"] * c.log_scale
            + [f"mscale={c.mscale}"] * (c.mscale != "none")
        )
        return ", ".join([super().describe(), *extra])


class YaRNScaling(RequestScaling):
    """YaRN (transformers' and vLLM's formula) with factor t in place of the config's factor."""

    kind = "yarn"
    scales_cos_sin = True

    def __init__(self, params: dict, *, original_length: int, rotary_dim: int, base: float):
        factor = float(params["factor"])
        super().__init__(
            original_length=original_length,
            rotary_dim=rotary_dim,
            base=base,
            max_length=math.ceil(original_length * factor),
        )
        self.factor = factor
        self.beta_fast = float(params.get("beta_fast") or 32)
        self.beta_slow = float(params.get("beta_slow") or 1)
        self.truncate = bool(params.get("truncate", True))
        self.mscale = params.get("mscale")
        self.mscale_all_dim = params.get("mscale_all_dim")

    def _solve(self, t: float) -> Tensor:
        d = self.rotary_dim
        pos_freqs = self.base ** (torch.arange(0, d, 2, dtype=torch.float) / d)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (t * pos_freqs)
        low, high = (
            d * math.log(self.original_length / (rot * 2 * math.pi)) / (2 * math.log(self.base))
            for rot in (self.beta_fast, self.beta_slow)
        )
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp  # 1: extrapolate (the pair keeps its own frequency), 0: interpolate by t
        return interpolation * (1 - keep) + extrapolation * keep

    def cos_sin_scale(self, t: float) -> float:
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(mscale(t, self.mscale) / mscale(t, self.mscale_all_dim))
        return mscale(t)

    def describe(self) -> str:
        return super().describe() + f", factor={self.factor:g} (the longest requests)"


class DynamicNTKScaling(RequestScaling):
    """Dynamic NTK (transformers' formula) at the sequence length t·L: base·(factor·t − factor + 1)^(d/(d−2))."""

    kind = "dynamic"

    def __init__(self, params: dict, *, original_length: int, rotary_dim: int, base: float):
        factor = float(params["factor"])
        super().__init__(
            original_length=original_length,
            rotary_dim=rotary_dim,
            base=base,
            max_length=math.ceil(original_length * factor),
        )
        self.factor = factor

    def _solve(self, t: float) -> Tensor:
        d = self.rotary_dim
        base = self.base * ((self.factor * t) - (self.factor - 1)) ** (d / (d - 2))
        return default_inv_freq(base, d)


def _rotary_dim(raw: dict, params: dict) -> int:
    heads = raw.get("num_attention_heads")
    head_dim = raw.get("head_dim") or (raw["hidden_size"] // heads if heads else None)
    if not head_dim:
        raise ValueError("the model config has neither head_dim nor hidden_size and num_attention_heads")
    return int(head_dim * float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) or 1.0))


def scaling_for(raw: dict) -> RequestScaling:
    """The per-request scaling of a model, from its config.json as a dict (or a transformers config's ``to_dict()``).

    A ValueError names the rope type when it cannot be served per request: plain RoPE (nothing to scale),
    linear, llama3, longrope (vLLM picks its factors once per server), and any other."""
    raw = dict(raw)
    for key in ("rope_parameters", "rope_scaling"):  # clex serve's marker for vLLM's positions hook (clex.serve.models)
        if isinstance(raw.get(key), dict):
            raw[key] = {k: v for k, v in raw[key].items() if k != "mrope_section"}
    clex, cleaned = clex_config_of(raw)
    params = dict(cleaned.get("rope_parameters") or cleaned.get("rope_scaling") or {})
    base = float(params.get("rope_theta", cleaned.get("rope_theta", 10000.0)))
    rotary_dim = _rotary_dim(cleaned, params)
    if clex is not None:
        if clex.original_length is None:
            clex = clex.replace(original_length=int(cleaned["max_position_embeddings"]))
        return CLEXScaling(clex, rotary_dim=rotary_dim, base=base)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind in ("yarn", "dynamic"):
        if params.get("factor") is None or float(params["factor"]) < 1:
            raise ValueError(
                f"rope_parameters.factor must be a number >= 1 for rope_type {kind!r}, got {params.get('factor')!r}"
            )
    if kind == "yarn":
        if params.get("attention_factor") is not None:
            raise ValueError(
                f"rope_parameters.attention_factor={params['attention_factor']!r} is one fixed temperature for every "
                "length; per-request YaRN derives it from t (remove attention_factor to serve per request)"
            )
        L = params.get("original_max_position_embeddings") or cleaned.get("max_position_embeddings")
        return YaRNScaling(params, original_length=int(L), rotary_dim=rotary_dim, base=base)
    if kind == "dynamic":
        if "alpha" in params:
            raise ValueError("rope_parameters.alpha (dynamic NTK by alpha) is not served per request; use factor")
        L = int(cleaned["max_position_embeddings"])  # transformers' dynamic NTK is relative to it
        return DynamicNTKScaling(params, original_length=L, rotary_dim=rotary_dim, base=base)
    raise ValueError(
        f"rope_type {kind!r} cannot be served per request; allowed: {', '.join(map(repr, KINDS))}"
        + (
            " (a model without rope scaling has nothing to scale: serve it with vLLM as it is)"
            if kind == "default"
            else ""
        )
    )
