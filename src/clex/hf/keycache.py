"""The exact key cache's machinery: re-rotation math, the state a cache carries, and the hooks.

See :mod:`clex.hf.generation` for what it does and why; this module holds the parts:

- :func:`rotation_delta`, :func:`rotate_keys_`: R(δ) with δ = p·θ_new − p·θ_old, applied in place;
- ``_KeyState``: θ per row and the position ids of every cached key, on the cache as ``cache._clex_keys``;
- :class:`ExactKeyCache`: a pre-hook on the rotary's owner and the rotary's ``inference_listener``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from ..core.rotary_embedding import CLEXRotaryEmbedding
from .compat import CACHE_ARGS, TRANSFORMERS_VERSION, cache_argument, output_cache
from .lookup import find_rotary, get_clex_rotary
from .t_adapter import writes_cache

#: When to re-rotate: ``on_change`` (ours: only rows whose θ changed) or ``every_step`` (the whole cache at
#: every step, in float32: the reference's cost, kept for benchmarks).
REROTATE_MODES = ("on_change", "every_step")
#: Cache layer classes whose keys are plain tensors we may rotate in place (exact types: the quantized layers
#: subclass DynamicLayer but store their keys quantized).
SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer)
_STATE = "_clex_keys"  # the attribute of a Cache that holds its _KeyState
_CPU_BLOCK_BYTES = 1 << 19  # keys re-rotated per block on CPU


# --- the math -------------------------------------------------------------------------------------------


def rotation_delta(positions: Tensor, theta_old: Tensor, theta_new: Tensor, *, precise: bool = True):
    """cos δ, sin δ of δ = p·θ_new − p·θ_old, one per rotated pair.

    positions: [B, S] float32 (as the rotary module saw them), theta_old/new: [B, d/2] float32
    -> (cos, sin): [B, S, d/2] float32. Each angle is formed in float32 exactly as :func:`rope_angles` forms
    it for the rotary module (p·θ_j, one product); with ``precise`` their difference and its cos/sin are
    taken in float64, so that R(δ)·R(fl(p·θ_old)) = R(fl(p·θ_new)) up to the final rounding.
    """
    p = positions.unsqueeze(-1)  # [B, S, 1]
    new, old = p * theta_new.unsqueeze(1), p * theta_old.unsqueeze(1)  # [B, S, d/2] float32, as rope_angles
    delta = new.double() - old.double() if precise else new - old
    return delta.cos().float(), delta.sin().float()


def rotate_keys_(keys: Tensor, cos: Tensor, sin: Tensor, rows: Tensor | None = None) -> None:
    """In place, the rotate-half rotation of the first d dims of every head (partial rotary: the rest stays):

        k1 ← k1·cos δ − k2·sin δ,   k2 ← k2·cos δ + k1·sin δ,    k1 = k[..., :d/2], k2 = k[..., d/2:d]

    keys: [B, H, slots, head_dim] (any float dtype; computed in float32); cos/sin: [b, S, d/2] with b =
    len(rows) (or B when rows is None), S <= slots: the first S slots are rotated. float32 keys of all rows
    are updated in place with one temporary (five memory-bound passes; on CPU block by block, in cache).
    """
    n, half = cos.shape[1], cos.shape[2]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [b, 1, S, d/2]: the same for every head
    if rows is None and keys.dtype == torch.float32:
        step = n
        if keys.device.type == "cpu":  # blocks of ~512 KB stay in cache across the five passes (~2x faster)
            step = max(16, _CPU_BLOCK_BYTES // (keys.shape[0] * keys.shape[1] * 2 * half * keys.element_size()))
        for i in range(0, n, step):
            k1, k2 = keys[:, :, i : i + step, :half], keys[:, :, i : i + step, half : 2 * half]  # cache views
            c, s = cos[:, :, i : i + step], sin[:, :, i : i + step]
            k1_sin = k1 * s
            k1.mul_(c).addcmul_(k2, s, value=-1)
            k2.mul_(c).add_(k1_sin)
        return
    k = (keys if rows is None else keys[rows])[:, :, :n, : 2 * half].float()  # [b, H, S, d] float32 copy
    k1, k2 = k[..., :half], k[..., half:]
    out = torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1).to(keys.dtype)
    if rows is None:
        keys[:, :, :n, : 2 * half] = out
    else:
        keys[rows, :, :n, : 2 * half] = out


# --- the state a cache carries -----------------------------------------------------------------------------


@dataclass
class _KeyState:
    """What a cache's keys were rotated with: θ per row and the position ids of every cached key.

    theta: [B or 1, d/2] float32 (the rotary's ``last_inv_freq``); chunks: the ``position_ids`` of each
    forward, [B or 1, P], in cache order (converted to float32 as the rotary does, only when rotating).
    """

    theta: Tensor
    batch: int
    chunks: list = field(default_factory=list)
    length: int = 0  # S, the number of positions recorded
    layers_checked: int = -1  # len(cache.layers) when the layer types were last checked

    def positions(self) -> Tensor:
        """[B, S] float32, exactly the positions the rotary rotated the cached keys with."""
        if len(self.chunks) != 1 or self.chunks[0].shape[0] != self.batch:
            self.chunks = [torch.cat([c.expand(self.batch, -1) for c in self.chunks], dim=-1)]
        return self.chunks[0].float()

    def append(self, position_ids: Tensor) -> None:
        self.chunks.append(position_ids)
        self.length += position_ids.shape[-1]
        if len(self.chunks) > 256:  # bounded bookkeeping when t rarely changes (fixed t)
            self.positions()

    def crop(self, length: int) -> None:
        self.chunks = [torch.cat([c.expand(self.batch, -1) for c in self.chunks], dim=-1)[:, :length]]
        self.length = length

    def expand_batch(self, batch: int) -> None:
        """Follow ``Cache.batch_repeat_interleave`` (e.g. num_return_sequences after a prefill)."""
        if batch % self.batch:
            raise ValueError(
                f"the cache now holds {batch} rows but its CLEX state {self.batch}; only repeats of whole rows are "
                "supported"
            )
        repeats = batch // self.batch
        self.chunks = [c.repeat_interleave(repeats, dim=0) if c.shape[0] > 1 else c for c in self.chunks]
        self.theta = self.theta.repeat_interleave(repeats, dim=0) if self.theta.shape[0] > 1 else self.theta
        self.batch = batch


def check_cache(cache) -> None:
    """ValueError unless ``cache`` is a Cache whose keys we can re-rotate in place."""
    if not isinstance(cache, Cache):
        raise ValueError(
            f"the key cache must be a transformers Cache (DynamicCache or StaticCache) for CLEX's exact key "
            f"cache, got {type(cache).__name__}"
        )
    classes = [x if isinstance(x, type) else type(x) for x in (cache.layers or [cache.layer_class_to_replicate])]
    bad = sorted({c.__name__ for c in classes if c not in SUPPORTED_LAYERS})
    why = ""
    if bad:
        why = f"its layers are {', '.join(bad)}"
    elif getattr(cache, "offloading", False):
        why = "it offloads layers to the CPU"
    if why:
        raise ValueError(
            f"CLEX's exact key cache cannot re-rotate the keys of a {type(cache).__name__}: {why}. Supported: "
            "DynamicCache and StaticCache (sliding-window layers too), without offloading. Use one of those, or "
            "the fixed-t policy (clex.hf.generation.generate_fixed_t), which never re-rotates keys"
        )


# --- the hooks ---------------------------------------------------------------------------------------------


class ExactKeyCache:
    """Keeps a CLEX model's key cache exact; made by :func:`enable_exact_cache`, undone by :meth:`remove`.

    Three pieces: a forward pre-hook on the module that owns the rotary (``model.model``) notes the cache of
    the forward (making the model's default ``DynamicCache`` itself when the forward would, so that every
    cache gets its state from its first keys); the rotary's ``inference_listener``, called once θ is
    chosen and before any layer runs, re-rotates the cached keys of the rows whose θ changed; and a forward
    hook that checks the cache the forward returned is one the hooks followed, so that a transformers
    release that passes the cache some new way fails loudly instead of decoding with stale keys.
    ``rerotations`` counts the forwards in which keys were re-rotated.
    """

    def __init__(self, model: nn.Module, rerotate: str = "on_change"):
        if rerotate not in REROTATE_MODES:
            raise ValueError(f"rerotate must be one of {', '.join(map(repr, REROTATE_MODES))}, got {rerotate!r}")
        name, rotary = find_rotary(model)
        if not isinstance(rotary, CLEXRotaryEmbedding):
            get_clex_rotary(model)  # raises the standard "call clex.apply_clex" error
        owner = model.get_submodule(name.rpartition(".")[0])
        if rotary.inference_listener is not None:
            raise ValueError("the CLEX rotary already has an inference_listener: call disable_exact_cache(model) first")
        self.model, self.rotary, self.owner, self.rerotate = model, rotary, owner, rerotate
        self.rerotations = 0
        c = rotary.config  # adapters on layers that write the cache: a change of t cannot be followed (t_adapter)
        self._t_in_cache = [n for n in c.adapter_targets if c.adapter_rank and writes_cache([n])]
        self._cache = None  # the cache of the running forward, until the rotary's listener takes it
        self._followed = None  # the cache the listener brought to the current θ in this forward
        self._arg_names = tuple(inspect.signature(owner.forward).parameters)  # to read positional arguments
        self._cache_arg = cache_argument(owner.forward)  # "cache" (transformers >= 5.24) or "past_key_values"
        self._handle = owner.register_forward_pre_hook(self._before, with_kwargs=True)
        self._after_handle = owner.register_forward_hook(self._after)
        rotary.inference_listener = self._on_frequencies

    def remove(self) -> None:
        """Take the hook and the listener off (see :func:`disable_exact_cache`)."""
        self._handle.remove()
        self._after_handle.remove()
        if self.rotary.inference_listener == self._on_frequencies:
            self.rotary.inference_listener = None
        if getattr(self.rotary, "_clex_exact_cache", None) is self:
            del self.rotary._clex_exact_cache

    # 1. the owner's forward starts: note its cache (or make the one it would make)
    def _before(self, module, args, kwargs):
        if args:  # rare: positional arguments after input_ids
            kwargs = {**dict(zip(self._arg_names, args)), **kwargs}
            args = ()
        cache = next((kwargs[n] for n in (self._cache_arg, *CACHE_ARGS) if kwargs.get(n) is not None), None)
        if cache is None and not self.rotary.training:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(module.config, "use_cache", False)
            if use_cache:  # what the model does itself when given no cache
                for name in CACHE_ARGS:
                    kwargs.pop(name, None)
                cache = kwargs[self._cache_arg] = DynamicCache(config=module.config)
        self._cache = None if self.rotary.training else cache
        return args, kwargs

    # 3. the forward is done: the cache it returns must be one whose keys the hooks followed
    def _after(self, module, args, output):
        followed, self._followed, self._cache = self._followed, None, None
        if self.rotary.training:
            return
        cache = output_cache(output)
        if isinstance(cache, Cache) and cache.__dict__.get(_STATE) is None and cache.get_seq_length() > 0:
            raise RuntimeError(
                f"CLEX's exact key cache did not see the key cache of this forward (transformers "
                f"{TRANSFORMERS_VERSION} passes it to {type(module).__name__}.forward in a way clex does not know): "
                "its keys would go stale when t changes. Please report it; meanwhile use clex.generate_fixed_t, "
                "or apply_clex(..., exact_cache=False) to decode without the exact cache knowingly"
            )
        if followed is not None and cache is not None and cache is not followed:
            raise RuntimeError(
                f"CLEX's exact key cache followed one cache but {type(module).__name__}.forward returned another "
                f"(transformers {TRANSFORMERS_VERSION}): its keys would go stale when t changes; please report it"
            )

    # 2. the rotary has chosen θ for this forward: bring the cached keys to it before any layer reads them
    def _on_frequencies(self, x: Tensor, position_ids: Tensor, theta: Tensor) -> None:
        """x: [B, P, hidden]; position_ids: [B or 1, P]; theta: [B or 1, d/2], what the rotary rotates with."""
        cache, self._cache = self._cache, None
        self._followed = cache
        if cache is None:  # a forward without a cache, or the rotary called on its own
            return
        batch = x.shape[0]
        state = cache.__dict__.get(_STATE)
        seen = int(cache.get_seq_length())
        if state is None:
            state = self._new_state(cache, seen, theta, batch)
        if seen != state.length or batch != state.batch or len(cache.layers) != state.layers_checked:
            self._sync(cache, state, seen, batch)
        if state.length and self._t_in_cache and theta is not state.theta and not torch.equal(theta, state.theta):
            raise ValueError(
                f"this CLEX model's t-conditioned adapters sit on {', '.join(self._t_in_cache)}, which write the key "
                "cache: its cached keys and values were computed at another t, and re-rotation cannot mend that. "
                "Generate at one t (clex.generate_fixed_t, or inference_t='fixed'), or put the adapters on "
                "query/output layers only (CLEXConfig.adapter_targets, e.g. ['q_proj', 'o_proj'])"
            )
        if self.rerotate == "every_step":
            if state.length:
                self._rotate(cache, state, theta, rows=None, precise=False)
        elif theta is not state.theta and not torch.equal(theta, state.theta):
            if state.length:
                new, old = theta.expand(state.batch, -1), state.theta.expand(state.batch, -1)
                changed = (new != old).any(dim=-1)  # [B]
                self._rotate(cache, state, theta, rows=None if bool(changed.all()) else changed.nonzero().flatten())
        state.theta = theta
        state.append(position_ids)

    @staticmethod
    def _new_state(cache, seen: int, theta: Tensor, batch: int) -> _KeyState:
        check_cache(cache)
        if seen:
            raise ValueError(
                f"the key cache already holds {seen} keys that were cached without CLEX's exact key cache "
                "(enable_exact_cache was called after they were written?): start from an empty cache"
            )
        state = _KeyState(theta=theta, batch=batch)
        setattr(cache, _STATE, state)
        return state

    def _sync(self, cache, state: _KeyState, seen: int, batch: int) -> None:
        """Follow what happened to the cache since the last forward: crop, reset, batch expansion, new layers."""
        if seen != state.length:
            if seen > state.length:
                raise ValueError(
                    f"the key cache holds {seen} keys but CLEX's exact key cache recorded {state.length}: keys were "
                    "added without it (by a forward with the hooks removed?); start from an empty cache"
                )
            state.crop(seen)  # Cache.crop (assisted decoding) or reset
        if batch != state.batch:
            state.expand_batch(batch)
        if len(cache.layers) != state.layers_checked:
            check_cache(cache)
            state.layers_checked = len(cache.layers)

    def _rotate(self, cache, state: _KeyState, theta: Tensor, rows: Tensor | None, precise: bool = True) -> None:
        positions = state.positions()  # [B, S] float32
        old, theta = state.theta.expand(state.batch, -1), theta.expand(state.batch, -1)  # [B, d/2]
        if rows is not None:
            positions, old, theta = positions[rows], old[rows], theta[rows]
        cos = sin = None
        for layer in cache.layers:
            keys = layer.keys
            if keys is None or keys.numel() == 0:
                continue
            n = min(state.length, keys.shape[-2])  # a sliding window keeps only the last n keys, in order
            if cos is None:
                device = positions.device
                cos, sin = rotation_delta(positions, old.to(device), theta.to(device), precise=precise)
            c, s = cos[:, -n:].to(keys.device), sin[:, -n:].to(keys.device)
            rotate_keys_(keys, c, s, None if rows is None else rows.to(keys.device))
        self.rerotations += 1
