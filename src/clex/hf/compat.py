"""What differs between the transformers releases clex accepts (``transformers>=5,<6``), in one place.

transformers 5.24 renamed the cache argument of every model's ``forward`` from ``past_key_values`` to
``cache`` (and the output field likewise; the old names stay as deprecated aliases until 5.40). Code that
hooks or drives a model's cache asks here for the name instead of spelling it.
"""

from __future__ import annotations

import functools
import inspect

import transformers

#: The names a model's forward has used for its key/value cache, newest first.
CACHE_ARGS = ("cache", "past_key_values")
TRANSFORMERS_VERSION = transformers.__version__


def cache_argument(forward) -> str:
    """The name of the cache parameter of a model's ``forward`` (``cache`` or ``past_key_values``).

    Raises a RuntimeError naming the transformers version when the signature has neither: the exact key
    cache would not see the cache, and decoding would silently use stale keys.
    """
    params = inspect.signature(forward).parameters
    for name in CACHE_ARGS:
        if name in params:
            return name
    raise RuntimeError(
        f"{getattr(forward, '__qualname__', forward)} takes none of {', '.join(CACHE_ARGS)} in transformers "
        f"{TRANSFORMERS_VERSION}: clex cannot find the model's key cache on this release; please report it, and "
        "use clex.generate_fixed_t (which needs no hook) meanwhile"
    )


def output_cache(output):
    """The cache a model's forward returned (``output.cache`` or ``output.past_key_values``), or None."""
    for name in CACHE_ARGS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` for calling a model with a cache on this release (no deprecation warning)."""
    return {_cache_name(): cache}


@functools.cache
def _cache_name() -> str:
    """This release's name for the cache argument, read once (on first use) from LLaMA's forward."""
    from transformers import LlamaModel

    return cache_argument(LlamaModel.forward)


def set_activation_checkpointing(model, on: bool = True) -> None:
    """Non-reentrant activation checkpointing on ``model`` on or off: ``activation_checkpointing_enable`` /
    ``_disable`` where the release has them (5.24 on), else ``gradient_checkpointing_*`` (their names before;
    deprecated aliases until v6)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if on and new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False):
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
