"""Weights conditioned on t: a low-rank adapter per target linear whose components are gated by t.

One CLEX model serves every length factor t with one set of weights, so the far end (t near max_factor) and the
near end compete for the same fine-tuned weights. With ``CLEXConfig.adapter_rank = r`` every target linear
(``adapter_targets``, e.g. each attention's q_proj and o_proj) computes

    y = W x + s · up · diag(g(t)) · down · x,      g_k(t) = u(t)^(p_k),   u(t) = ln t / ln max_factor

(``down``: [r, in], kaiming-uniform as LoRA's A; ``up``: [out, r], zeros, so an untrained adapter adds nothing;
p_k = exp(``gate_power``_k), learned from p = 1; u is held at 1 past max_factor; s = ``adapter_scale``). At t = 1
every gate is exactly 0: the model up to its original length is the shared weights alone. Each row of a batch
gates by its own t (the rotary's ``last_t`` of the forward, set before any layer runs).

The key cache. An adapter on a layer that writes the cache (k_proj, v_proj, fused qkv) makes cached keys and
values depend on the t they were computed at. At a fixed t per generation that is exact: :func:`clex.generate_fixed_t`,
per-request serving, the chunked perplexity of ``clex eval`` (t pinned to the window) and an export at one length
(:func:`fixed_t_state_dict`). With t moving during a generation (the continuous policy and the exact key cache),
adapters on query and output layers only (:data:`CACHE_FREE_TARGETS`) keep the cache's semantics — keys
re-rotated, values untouched, the reference's semantics — while an adapter on any other target makes the exact
key cache refuse the change of t (:func:`writes_cache`) instead of attending to stale keys.

Export. At a fixed t the adapter is a fixed matrix: :func:`fixed_t_state_dict` merges it into W
(W + s · up · diag(g(t)) · down), which ``clex export`` writes (tested against the model at that t).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.equations import log_t_fraction
from .lookup import get_clex_rotary

#: Target names whose outputs never reach the key cache of their own layer (queries, attention outputs, MLPs):
#: adapters there keep the exact key cache exact when t changes. Any other target (k_proj, v_proj, qkv) writes it.
CACHE_FREE_TARGETS = frozenset(
    {"q_proj", "o_proj", "out_proj", "dense", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"}
)
ADAPTER = "clex_adapter"  # the child module's name on each target linear (state dict: <linear>.clex_adapter.*)


class TAdapter(nn.Module):
    """The t-gated low-rank term of one linear layer: s · up · diag(g(t)) · down."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.gate_power = nn.Parameter(torch.zeros(rank))  # p = exp(gate_power): g = u^p
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def gate(self, u: Tensor) -> Tensor:
        """g(u) = u^p per component: u [B] float32 in [0, 1] -> [B, r] float32 (0 where u = 0, no NaN gradient)."""
        log_u = torch.log(u.clamp(min=1e-12)).unsqueeze(-1)  # [B, 1]
        g = torch.exp(torch.exp(self.gate_power.float()) * log_u)  # [B, r]
        return torch.where(u.unsqueeze(-1) > 0, g, torch.zeros_like(g))

    def delta(self, x: Tensor, u: Tensor) -> Tensor:
        """The adapter's output for x [B, ..., in] with each row's u [B] -> [B, ..., out]."""
        h = F.linear(x, self.down)  # [B, ..., r]
        g = self.gate(u.to(h.device)).to(h.dtype)
        g = g.reshape(g.shape[0], *([1] * (h.dim() - 2)), g.shape[1])
        return F.linear(h * g, self.up) * self.scale

    def weight_at(self, t: float, max_factor: float) -> Tensor:
        """The fixed matrix the adapter is at one t: s · up · diag(g(t)) · down, float32 [out, in]."""
        u = torch.tensor([log_t_fraction(float(t), float(max_factor))], dtype=torch.float32)
        g = self.gate(u.to(self.up.device))[0]  # [r]
        return (self.up.float() * g) @ self.down.float() * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}, scale={self.scale:g}"


def writes_cache(targets) -> bool:
    """An adapter on these targets makes cached keys or values depend on t."""
    return any(name not in CACHE_FREE_TARGETS for name in targets)


class TAdapters:
    """The adapters of one model and the forward hooks that add them; made by :func:`attach_t_adapters`."""

    def __init__(self, model: nn.Module, rotary, linears: dict[str, nn.Module]):
        self.rotary, self.linears = rotary, linears
        self._u: tuple = (None, None)  # (the rotary's last_t object, u on a device): one conversion per forward
        self._handles = [m.register_forward_hook(self._hook) for m in linears.values()]

    def _u_rows(self, device) -> Tensor:
        t_rows = self.rotary.last_t
        if t_rows is None:
            raise RuntimeError("a t-conditioned adapter ran before the CLEX rotary chose t (call the whole model)")
        key, u = self._u
        if key is not t_rows or u.device != device:
            u = log_t_fraction(t_rows.to(torch.float32), float(self.rotary.config.max_factor)).to(device)
            self._u = (t_rows, u)
        return u

    def _hook(self, module, args, output):
        x = args[0]
        return output + getattr(module, ADAPTER).delta(x, self._u_rows(x.device))

    def remove(self) -> None:
        """Take the hooks off (the adapters stay as modules; see :func:`attach_t_adapters` to put them back)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def attach_t_adapters(model: nn.Module) -> TAdapters | None:
    """Give every target linear of ``model`` its :class:`TAdapter` (created once, kept on re-attach) and the hook
    that adds it; the CLEX rotary's config says the rank, targets and scale. None when adapter_rank is 0."""
    rotary = get_clex_rotary(model)
    c = rotary.config
    old = getattr(rotary, "_clex_t_adapters", None)
    if old is not None:
        old.remove()
    if c.adapter_rank == 0:
        return None
    linears = {
        name: m
        for name, m in model.named_modules()
        if name.rpartition(".")[2] in c.adapter_targets
        and isinstance(getattr(m, "weight", None), Tensor)
        and m.weight.dim() == 2
    }
    missing = sorted(set(c.adapter_targets) - {n.rpartition(".")[2] for n in linears})
    if missing:
        found = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"CLEXConfig.adapter_targets names {missing}, which this model has no linear layer of; its linear "
            f"layers: {', '.join(found)}"
        )
    for m in linears.values():
        if not isinstance(getattr(m, ADAPTER, None), TAdapter):
            out_features, in_features = m.weight.shape
            adapter = TAdapter(in_features, out_features, c.adapter_rank, c.adapter_scale)
            m.add_module(ADAPTER, adapter.to(device=m.weight.device, dtype=m.weight.dtype))
    hooks = TAdapters(model, rotary, linears)
    rotary._clex_t_adapters = hooks
    return hooks


def t_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the model's t-conditioned adapters (empty without them)."""
    return [p for m in model.modules() if isinstance(m, TAdapter) for p in m.parameters()]


def fixed_t_state_dict(model: nn.Module, t: float) -> dict[str, Tensor]:
    """The state dict of the plain model that this CLEX model is at a fixed t: the t-conditioned adapters merged
    into their linears' weights (W + s · up · diag(g(t)) · down, in float32, stored in W's dtype); the ODE
    weights, the learned temperature and the adapters themselves dropped (the frequencies and the temperature at
    t are the export's rope parameters)."""
    rotary = get_clex_rotary(model)
    merged = {}
    for name, m in model.named_modules():
        adapter = getattr(m, ADAPTER, None)
        if isinstance(adapter, TAdapter):
            w = m.weight.detach()
            merged[f"{name}.weight"] = (w.float() + adapter.weight_at(t, rotary.config.max_factor)).to(w.dtype)
    rotary_name = next(n for n, m in model.named_modules() if m is rotary)
    clex_only = (f"{rotary_name}.", f".{ADAPTER}.")
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(clex_only[0]) and key.removeprefix(clex_only[0]).split(".")[0] in ("dynamics", "temperature"):
            continue
        if clex_only[1] in key:
            continue
        state[key] = merged.get(key, value)
    return state
