"""Generation with CLEX: an exact key cache when t changes, at the cost of plain RoPE; and a fixed-t policy.

The problem. In inference mode each row's t follows its key length (see :mod:`clex.rotary`), so θ(t) changes
as a sequence grows. transformers caches keys *already rotated*: a key at position p was stored as
R(p·θ_old)·k, and once t moves on, a full forward would use R(p·θ_new)·k instead. The cache is stale (the
dynamic-NTK bug, transformers issue 25104).

The fix, and why this one. RoPE rotates each pair (j, j + d/2) of a key by the angle a_j = p·θ_j, and plane
rotations compose: R(a_new) = R(a_new − a_old)·R(a_old). So when a row's θ changes, its cached keys are
re-rotated ONCE, in place, by

    δ[p, j] = p·θ_new,j − p·θ_old,j,      k ← k·cos δ + rotate_half(k)·sin δ      (rotary dims only)

and left alone while θ stays put. With t on a grid of step 1/r (``CLEXConfig.t_resolution``, r = 16 by
default) θ changes once every L/r tokens, so the O(cached length) re-rotation is paid once per L/r decode
steps instead of at every step, as the reference does (it caches unrotated keys and rotates the whole cache
every step). Both angles are formed in float32 exactly as the rotary module forms them, and δ, cos δ, sin δ in
float64, so the re-rotated keys equal the ones a full forward would compute up to one rounding of the key
(fp32: ~1e-7 relative per change; in bf16/fp16 every change rounds the keys once more, so prefer a coarse
grid or the fixed-t policy there). The alternatives weighed: caching unrotated keys (needs a new attention
per family, and the per-step rotation this avoids), or a Cache subclass per cache type (users of
``generate`` rarely pass one, and each of transformers' cache classes would need its own). Hooks work with
the caches ``generate`` builds itself.

Hooking. :func:`enable_exact_cache` adds three hooks, all no-ops in training mode or without a cache:
a forward pre-hook on the module that owns the rotary (``model.model``) notes ``past_key_values``; a forward
hook on the rotary, which runs before any layer, compares each row's new θ with the θ its cached keys carry
and re-rotates the rows that changed in every layer; a forward hook on the owner records the state of a cache
that the forward created itself. The state (θ per row, and every cached key's position, as the rotary saw it:
left padding and any custom ``position_ids`` are handled) lives on the cache object (``cache._clex_keys``).
Supported: ``DynamicCache`` and ``StaticCache`` (sliding-window layers too); quantized or offloaded caches
are refused with a clear error (their keys cannot be rotated in place) — use the fixed-t policy there.

Fixed t. :func:`fixed_t_for` picks one t for prompt length + max_new_tokens; :func:`fixed_t` sets it for a
block and :func:`generate_fixed_t` wraps ``model.generate``: θ never changes, so nothing is ever re-rotated
(at the price of rotating short prefixes with the long-context frequencies).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from .equations import rope_angles
from .patch import find_rotary, get_clex_rotary
from .rotary import CLEXRotaryEmbedding
from .sampling import INFERENCE_T

#: When to re-rotate: ``on_change`` (ours: only rows whose θ changed) or ``every_step`` (the whole cache at
#: every step, in float32: the reference's cost, kept for benchmarks).
REROTATE_MODES = ("on_change", "every_step")
#: Cache layer classes whose keys are plain tensors we may rotate in place (exact types: the quantized layers
#: subclass DynamicLayer but store their keys quantized).
SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer)
_STATE = "_clex_keys"  # the attribute of a Cache that holds its _KeyState


# --- the math -------------------------------------------------------------------------------------------


def rotation_delta(positions: Tensor, theta_old: Tensor, theta_new: Tensor, *, precise: bool = True):
    """cos δ, sin δ of δ = p·θ_new − p·θ_old, in the rotate-half layout.

    positions: [B, S] float32 (as the rotary module saw them), theta_old/new: [B, d/2] float32
    -> (cos, sin): [B, S, d] float32. Each angle is formed in float32 exactly as :func:`rope_angles` forms
    it for the rotary module; with ``precise`` their difference and its cos/sin are taken in float64.
    """
    new, old = rope_angles(positions, theta_new), rope_angles(positions, theta_old)  # [B, S, d] float32
    delta = new.double() - old.double() if precise else new - old
    return delta.cos().float(), delta.sin().float()


def rotate_keys_(keys: Tensor, cos: Tensor, sin: Tensor, rows: Tensor | None = None) -> None:
    """In place: keys[rows, :, :S, :d] ← k·cos + rotate_half(k)·sin (the rotary dims come first in the head).

    keys: [B, H, slots, head_dim] (any float dtype; computed in float32), cos/sin: [b, S, d] with b = len(rows)
    (or B when rows is None), S <= slots. Only the first d dims of each head are rotated (partial rotary).
    """
    n, d = cos.shape[1], cos.shape[2]
    view = keys[:, :, :n, :d] if rows is None else keys[rows][:, :, :n, :d]  # [b, H, S, d]
    k = view.float()
    half = d // 2
    turned = torch.cat((-k[..., half:], k[..., :half]), dim=-1)  # rotate_half
    out = (k * cos.unsqueeze(1) + turned * sin.unsqueeze(1)).to(keys.dtype)
    if rows is None:
        view.copy_(out)
    else:
        keys[rows, :, :n, :d] = out


# --- the state a cache carries -----------------------------------------------------------------------------


@dataclass
class _KeyState:
    """What the cached keys were rotated with: θ per row [B, d/2] float32, positions [B, S] float32."""

    theta: Tensor
    chunks: list = field(default_factory=list)  # [B, P] float32 position blocks, in cache order
    length: int = 0  # S, the number of positions recorded
    layers_checked: int = -1  # len(cache.layers) when the layer types were last checked

    def positions(self) -> Tensor:
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks, dim=-1)]
        return self.chunks[0]

    def append(self, positions: Tensor) -> None:
        self.chunks.append(positions)
        self.length += positions.shape[-1]

    def crop(self, length: int) -> None:
        self.chunks = [self.positions()[:, :length]]
        self.length = length

    def expand_batch(self, batch: int) -> None:
        """Follow ``Cache.batch_repeat_interleave`` (e.g. num_return_sequences after a prefill)."""
        have = self.theta.shape[0]
        if batch % have:
            raise ValueError(
                f"the cache now holds {batch} rows but its CLEX state {have}; only repeats of whole rows are supported"
            )
        self.theta = self.theta.repeat_interleave(batch // have, dim=0)
        self.chunks = [self.positions().repeat_interleave(batch // have, dim=0)]


def check_cache(cache) -> None:
    """ValueError unless ``cache`` is a Cache whose keys we can re-rotate in place."""
    if not isinstance(cache, Cache):
        raise ValueError(
            f"past_key_values must be a transformers Cache (DynamicCache or StaticCache) for CLEX's exact key "
            f"cache, got {type(cache).__name__}"
        )
    layers = list(cache.layers) or [cache.layer_class_to_replicate]
    bad = sorted({type(x).__name__ if not isinstance(x, type) else x.__name__ for x in layers} - {c.__name__ for c in SUPPORTED_LAYERS})
    why = ""
    if bad:
        why = f"its layers are {', '.join(bad)}"
    elif getattr(cache, "offloading", False):
        why = "it offloads layers to the CPU"
    if why:
        raise ValueError(
            f"CLEX's exact key cache cannot re-rotate the keys of a {type(cache).__name__}: {why}. Supported: "
            "DynamicCache and StaticCache (sliding-window layers too), without offloading. Use one of those, or "
            "the fixed-t policy (clex.generation.generate_fixed_t), which never re-rotates keys"
        )


# --- the hooks ---------------------------------------------------------------------------------------------


class ExactKeyCache:
    """The hooks that keep a CLEX model's key cache exact; made by :func:`enable_exact_cache`.

    ``rerotations`` counts the re-rotations done (one per forward in which some row's θ changed).
    """

    def __init__(self, model: nn.Module, rerotate: str = "on_change"):
        if rerotate not in REROTATE_MODES:
            raise ValueError(f"rerotate must be one of {', '.join(map(repr, REROTATE_MODES))}, got {rerotate!r}")
        name, rotary = find_rotary(model)
        if not isinstance(rotary, CLEXRotaryEmbedding):
            get_clex_rotary(model)  # raises the standard "call clex.apply_clex" error
        owner = model.get_submodule(name.rpartition(".")[0])
        self.model, self.rotary, self.owner, self.rerotate = model, rotary, owner, rerotate
        self.rotary_dim = 2 * rotary.inv_freq.numel()
        self.rerotations = 0
        self._cache = None  # the cache handed to the running forward (None: none, or made inside)
        self._pending = None  # (θ [B, d/2], positions [B, P]) of the running forward
        self._handles = [
            owner.register_forward_pre_hook(self._before, with_kwargs=True),
            rotary.register_forward_hook(self._after_rotary, with_kwargs=True),
            owner.register_forward_hook(self._after, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Take the hooks off (see :func:`disable_exact_cache`)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self.rotary, "_clex_exact_cache", None) is self:
            del self.rotary._clex_exact_cache

    # 1. the owner's forward starts: note the cache
    def _before(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None and len(args) > 3:  # (input_ids, attention_mask, position_ids, past_key_values, ...)
            cache = args[3] if isinstance(args[3], Cache) else None
        self._cache = None if self.rotary.training else cache
        self._pending = None

    # 2. the rotary has chosen θ for this forward: bring the cached keys to it before any layer reads them
    def _after_rotary(self, module, args, kwargs, output):
        if self.rotary.training:
            return
        x = args[0] if args else kwargs["x"]
        position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
        batch = x.shape[0]
        theta = self.rotary.last_inv_freq.expand(batch, -1)  # [B, d/2]
        positions = position_ids.float().expand(batch, -1)  # [B, P]: what the rotary rotated with
        cache = self._cache
        if cache is None:
            self._pending = (theta, positions)
            return
        state = getattr(cache, _STATE, None)
        seen = int(cache.get_seq_length())
        if state is None:
            check_cache(cache)
            if seen:
                raise ValueError(
                    f"past_key_values already holds {seen} keys that were cached without CLEX's exact key cache "
                    "(enable_exact_cache was called after they were written?): start from an empty cache"
                )
            state = _KeyState(theta=theta)
            setattr(cache, _STATE, state)
        self._sync(cache, state, seen, batch)
        if self.rerotate == "every_step":
            if state.length:
                self._rotate(cache, state, theta, rows=None, precise=False)
        elif not torch.equal(theta, state.theta):
            changed = (theta != state.theta).any(dim=-1)  # [B]
            rows = None if bool(changed.all()) else changed.nonzero().flatten()
            if state.length:
                self._rotate(cache, state, theta, rows=rows, precise=True)
        state.theta = theta
        state.append(positions)

    # 3. the owner's forward is done: a cache it created itself gets its state now
    def _after(self, module, args, kwargs, output):
        pending, self._pending, self._cache = self._pending, None, None
        cache = getattr(output, "past_key_values", None)
        if pending is None or not isinstance(cache, Cache) or getattr(cache, _STATE, None) is not None:
            return
        check_cache(cache)
        state = _KeyState(theta=pending[0])
        state.append(pending[1])
        setattr(cache, _STATE, state)

    def _sync(self, cache, state: _KeyState, seen: int, batch: int) -> None:
        """Follow what happened to the cache since the last forward: crop, reset, batch expansion, new layers."""
        if seen != state.length:
            if seen > state.length:
                raise ValueError(
                    f"past_key_values holds {seen} keys but CLEX's exact key cache recorded {state.length}: keys were "
                    "added without it (by a forward with the hooks removed?); start from an empty cache"
                )
            state.crop(seen)  # Cache.crop (assisted decoding) or reset
        if state.theta.shape[0] != batch:
            state.expand_batch(batch)
        if len(cache.layers) != state.layers_checked:
            check_cache(cache)
            state.layers_checked = len(cache.layers)

    def _rotate(self, cache, state: _KeyState, theta: Tensor, rows: Tensor | None, precise: bool) -> None:
        positions = state.positions()  # [B, S]
        old = state.theta
        if rows is not None:
            positions, old, theta = positions[rows], old[rows], theta[rows]
        cos = sin = None
        for layer in cache.layers:
            keys = layer.keys
            if keys is None or keys.numel() == 0:
                continue
            n = min(state.length, keys.shape[-2])  # a sliding window keeps only the last n keys, in order
            if cos is None:
                cos, sin = rotation_delta(positions, old.to(positions.device), theta.to(positions.device), precise=precise)
            c, s = cos[:, -n:].to(keys.device), sin[:, -n:].to(keys.device)
            rotate_keys_(keys, c, s, None if rows is None else rows.to(keys.device))
        self.rerotations += 1


# --- public entry points -------------------------------------------------------------------------------


def enable_exact_cache(model: nn.Module, *, rerotate: str = "on_change") -> ExactKeyCache:
    """Make ``model.generate`` (and any cached forward) of a CLEX model exact when t changes; returns the hooks.

    Every step's logits then equal one full forward over the whole sequence so far with the current t.
    Idempotent: a second call with the same ``rerotate`` returns the hooks already in place.
    rerotate: ``on_change`` (default) or ``every_step`` (the reference's cost; for benchmarks).
    """
    rotary = get_clex_rotary(model)
    old = getattr(rotary, "_clex_exact_cache", None)
    if old is not None:
        if old.rerotate == rerotate:
            return old
        old.remove()
    hooks = ExactKeyCache(model, rerotate)
    rotary._clex_exact_cache = hooks
    return hooks


def disable_exact_cache(model: nn.Module) -> None:
    """Remove the hooks of :func:`enable_exact_cache` (no-op if none)."""
    hooks = getattr(get_clex_rotary(model), "_clex_exact_cache", None)
    if hooks is not None:
        hooks.remove()


def fixed_t_for(model: nn.Module, prompt_len: int, max_new_tokens: int) -> float:
    """The one t for a whole generation: the model's t policy at the final length prompt_len + max_new_tokens.

    ``continuous`` (rounded up to 1/t_resolution) and ``integer`` are used as configured; a model already on
    ``fixed`` uses ``continuous`` at its t_resolution.
    """
    if prompt_len < 0 or max_new_tokens < 0:
        raise ValueError(f"prompt_len and max_new_tokens must be >= 0, got {prompt_len} and {max_new_tokens}")
    rotary = get_clex_rotary(model)
    c = rotary.config
    policy = c.inference_t if c.inference_t in INFERENCE_T else "continuous"
    length = torch.tensor([max(1, int(prompt_len) + int(max_new_tokens))])
    return float(INFERENCE_T[policy](length, rotary.original_length, c.t_resolution)[0])


@contextlib.contextmanager
def fixed_t(model: nn.Module, t: float) -> Iterator[None]:
    """Within the block every forward of ``model`` uses θ(t) for every row (``inference_t="fixed"``)."""
    rotary = get_clex_rotary(model)
    saved = rotary.config
    rotary.config = saved.replace(inference_t="fixed", fixed_t=float(t))  # validates t
    try:
        yield
    finally:
        rotary.config = saved


def generate_fixed_t(model: nn.Module, input_ids: Tensor, *, max_new_tokens: int, attention_mask: Tensor | None = None, **kwargs):
    """``model.generate`` with t fixed once from the longest prompt + max_new_tokens (:func:`fixed_t_for`).

    θ never changes during the generation, so no key is ever re-rotated; works with every cache type.
    """
    prompt = int(attention_mask.sum(dim=-1).max()) if attention_mask is not None else input_ids.shape[-1]
    with fixed_t(model, fixed_t_for(model, prompt, max_new_tokens)):
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs)
