"""Generation with CLEX: a key cache kept consistent when t changes, at about the cost of plain RoPE;
and a fixed-t policy.

The problem. In inference mode each row's t follows its key length (see :mod:`clex.core.rotary_embedding`), so θ(t) changes
as a sequence grows. transformers caches keys *already rotated*: a key at position p was stored as
R(p·θ_old)·k, and once t moves on, the new queries are rotated with θ_new but the cached keys still carry
θ_old, so q·k no longer depends on the distance alone (the dynamic-NTK bug, transformers issue 25104).

What "exact" can mean. Per layer, the re-rotated cache gives exactly the attention of one full forward with
the current θ. Across layers no cache can: the keys of layer l >= 1 were computed from hidden states that
went through earlier layers' attention with the θ of *their* time, and a full forward with the new θ would
change those hidden states too (tests: test_deeper_layers_cannot_match_a_full_forward). The reference code
(unrotated keys, all rotated with the current θ at every step) has the same semantics. So: a ONE-layer
model matches a full forward at every step; any model matches the reference's recipe at every step (both
tested to 1e-4 in float32, in practice ~1e-6); the fixed-t policy below matches a full forward at that t at
every step, for any depth, because θ never changes.

The fix, and why this one. RoPE rotates each pair (j, j + d/2) of a key by the angle a_j = p·θ_j, and plane
rotations compose: R(a_new) = R(a_new − a_old)·R(a_old). So when a row's θ changes, its cached keys are
re-rotated ONCE, in place, by

    δ[p, j] = p·θ_new,j − p·θ_old,j,      k ← k·cos δ + rotate_half(k)·sin δ      (rotary dims only)

and left alone while θ stays put. With t on a grid of step 1/r (``CLEXConfig.t_resolution``, r = 16 by
default) θ changes once every L/r tokens, so the O(cached length) re-rotation (a few memory passes over the
keys, less than one decode step's worth at long context) is paid once per L/r decode steps instead of at
every step as in the reference: amortised < r/L of a step (benchmarks/decode.py measures it). Both angles
are formed in float32 exactly as the rotary module forms them, and δ, cos δ, sin δ in float64, so a
re-rotated key equals a freshly rotated one up to one rounding (fp32: ~1e-7 relative per change; bf16/fp16
keys take one more rounding per change, so prefer a coarse grid or the fixed-t policy there). Alternatives
weighed: caching unrotated keys (a new attention per family, and the per-step rotation this avoids), or a
Cache subclass per cache type (users of ``generate`` rarely pass one, and every cache class of transformers
would need its own).

Hooking (:class:`ExactKeyCache`). A forward pre-hook on the module that owns the rotary (``model.model``)
notes the forward's cache, making the model's default ``DynamicCache`` itself when the forward would; the
rotary's ``inference_listener``, called once θ is chosen and before any layer runs, compares each row's θ
with the θ its cached keys carry and re-rotates, in every layer, the rows that changed. Nothing happens in
training mode or without a cache. The state (θ per row, and every cached key's position id as the rotary saw
it, so left padding and custom ``position_ids`` are handled) lives on the cache object
(``cache._clex_keys``); crop (assisted decoding), reset and batch repeats are followed. Supported:
``DynamicCache`` and ``StaticCache`` (sliding-window layers too). Quantized or offloaded caches are refused
with a clear error (their keys cannot be rotated in place): the fixed-t policy works with them.

Fixed t. :func:`fixed_t_for` picks one t from prompt length + max_new_tokens; :func:`fixed_t` sets it for a
block (:func:`fixed_clex_t`: the t of a final length, for any model) and :func:`generate_fixed_t` wraps
``model.generate``: θ never changes, so nothing is re-rotated, at
the price of rotating short prefixes with the frequencies of the final length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..core.policies import INFERENCE_T
from ..core.rotary_embedding import CLEXRotaryEmbedding
from .keycache import (
    REROTATE_MODES,
    SUPPORTED_LAYERS,
    ExactKeyCache,
    check_cache,
    rotate_keys_,
    rotation_delta,
)
from .lookup import find_rotary, get_clex_rotary

__all__ = [
    "REROTATE_MODES",
    "SUPPORTED_LAYERS",
    "ExactKeyCache",
    "check_cache",
    "disable_exact_cache",
    "enable_exact_cache",
    "fixed_clex_t",
    "fixed_t",
    "fixed_t_for",
    "generate_fixed_t",
    "rotate_keys_",
    "rotation_delta",
]


# --- public entry points -------------------------------------------------------------------------------


def enable_exact_cache(model: nn.Module, *, rerotate: str = "on_change") -> ExactKeyCache:
    """Keep the key cache of a CLEX model consistent when t changes, in ``generate`` and any cached forward.

    At every step each attention then sees all its keys rotated with the current θ: the reference's
    semantics, and for a one-layer model exactly one full forward with the current t (module docstring).
    Idempotent: a second call with the same ``rerotate`` returns the hooks already in place. Undo with
    :func:`disable_exact_cache` or ``hooks.remove()``.

    Args:
        model: a CLEX model (:func:`clex.apply_clex` calls this already unless ``exact_cache=False``)
        rerotate: ``on_change`` (default: when a row's t changes) or ``every_step`` (the reference's cost;
            for benchmarks)

    Returns:
        The hooks (:class:`ExactKeyCache`).
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
    """Remove the hooks of :func:`enable_exact_cache` (no-op if none).

    Args:
        model: a CLEX model
    """
    hooks = getattr(get_clex_rotary(model), "_clex_exact_cache", None)
    if hooks is not None:
        hooks.remove()


def fixed_t_for(model: nn.Module, prompt_len: int, max_new_tokens: int) -> float:
    """The one t for a whole generation: the model's t policy at the final length prompt_len + max_new_tokens.

    ``continuous`` (rounded up to 1/t_resolution) and ``integer`` are used as configured; a model already on
    ``fixed`` uses ``continuous`` at its t_resolution.

    Args:
        model: a CLEX model
        prompt_len: tokens of the (longest) prompt, >= 0
        max_new_tokens: tokens the generation adds, >= 0
    """
    for name, value in (("prompt_len", prompt_len), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    rotary = get_clex_rotary(model)
    c = rotary.config
    policy = c.inference_t if c.inference_t in INFERENCE_T else "continuous"
    length = torch.tensor([max(1, int(prompt_len) + int(max_new_tokens))])
    return float(INFERENCE_T[policy](length, rotary.original_length, c.t_resolution)[0])


@contextlib.contextmanager
def fixed_t(model: nn.Module, t: float, *, log_scale_length: int | None = None) -> Iterator[None]:
    """Within the block every forward of ``model`` uses θ(t) for every row (``inference_t="fixed"``).

    log_scale_length: with ``log_scale``, also pin the query scale to this many keys (a chunked forward
    that must equal one full forward over that length); None scales by each forward's own key length.
    """
    rotary = get_clex_rotary(model)
    saved, saved_length = rotary.config, rotary.log_scale_length
    rotary.config = saved.replace(inference_t="fixed", fixed_t=float(t))  # validates t
    rotary.log_scale_length = float(log_scale_length) if log_scale_length else saved_length
    try:
        yield
    finally:
        rotary.config, rotary.log_scale_length = saved, saved_length


@contextlib.contextmanager
def fixed_clex_t(model: nn.Module, length: int) -> Iterator[float | None]:
    """Within the block, a CLEX model uses the t of ``length`` keys for every forward (yields that t).

    t is what the model's own policy gives a sequence of ``length`` keys, so a chunked forward (or a
    generation) that ends at ``length`` uses the same frequencies as one full forward over ``length``
    tokens, and the key cache stays exact: the t pin every evaluation uses (perplexity's chunks, retrieval's
    and RULER's generations). With ``log_scale`` the query scale is pinned to ``length`` too (a full
    forward's). Any other model (plain RoPE, no RoPE, not a torch module) is left alone (yields None).
    """
    rotary = None
    if isinstance(model, nn.Module):
        with contextlib.suppress(ValueError):  # no RoPE, or several rotaries: not a CLEX model
            rotary = find_rotary(model)[1]
    if not isinstance(rotary, CLEXRotaryEmbedding):
        yield None
        return
    t = float(rotary.t_for_length(torch.tensor([int(length)]))[0])
    with fixed_t(model, t, log_scale_length=int(length)):
        yield t


def generate_fixed_t(
    model: nn.Module, input_ids: Tensor, *, max_new_tokens: int, attention_mask: Tensor | None = None, **kwargs: object
) -> object:
    """``model.generate`` with t fixed once from the longest prompt + max_new_tokens (:func:`fixed_t_for`).

    θ never changes during the generation, so no key is ever re-rotated; works with every cache type. With
    ``log_scale`` the query scale is pinned to that final length too (what an export at that length holds).

    Args:
        model: a CLEX model
        input_ids: the prompt(s), [B, P]
        max_new_tokens: tokens to generate
        attention_mask: the prompts' mask ([B, P], left padding), or None for unpadded prompts
        **kwargs: everything else ``model.generate`` takes (do_sample, temperature, ...)

    Returns:
        What ``model.generate`` returns.
    """
    prompt = int(attention_mask.sum(dim=-1).max()) if attention_mask is not None else input_ids.shape[-1]
    final = int(prompt) + int(max_new_tokens)
    with fixed_t(model, fixed_t_for(model, prompt, max_new_tokens), log_scale_length=max(1, final)):
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs)
