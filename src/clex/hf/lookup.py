"""Finding a model's rotary module (plain RoPE or CLEX) and its text config: the one place that knows
where transformers keeps them."""

from __future__ import annotations

from torch import Tensor, nn

from ..core.rotary_embedding import CLEXRotaryEmbedding


def find_rotary(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of the model's single RoPE module; a clear ValueError if none or several."""
    hits = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "inv_freq", None), Tensor) and "rotary" in type(m).__name__.lower()
    ]
    if not hits:
        raise ValueError(
            f"{type(model).__name__} has no RoPE rotary module (a `rotary_emb` with an `inv_freq` buffer): "
            "CLEX applies to RoPE models only (LLaMA, Mistral, Mixtral, Qwen2/3, Phi, Phi-3, GPT-NeoX, ...)"
        )
    if len(hits) > 1:
        names = ", ".join(n for n, _ in hits)
        raise ValueError(f"{type(model).__name__} has several rotary modules ({names}); CLEX supports one")
    return hits[0]


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def get_clex_rotary(model: nn.Module) -> CLEXRotaryEmbedding:
    """The model's CLEX rotary module (its config, θ(t) and ODE weights); ValueError if CLEX was not applied.

    Args:
        model: a model that :func:`clex.apply_clex` changed (or :func:`clex.load_model` loaded with CLEX)
    """
    _, rotary = find_rotary(model)
    if not isinstance(rotary, CLEXRotaryEmbedding):
        raise ValueError(f"{type(model).__name__} has no CLEX rotary module: call clex.apply_clex(model) first")
    return rotary
