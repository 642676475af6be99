"""Putting CLEX into a transformers model: one call, one attribute swap.

transformers models of the RoPE families (LLaMA, Mistral, Mixtral, Qwen2/3, Phi, Phi-3, GPT-NeoX, ...) build
ONE rotary module per model (``model.model.rotary_emb``), call it once per forward and hand its (cos, sin)
to every layer. :func:`apply_clex` swaps that module for a :class:`CLEXRotaryEmbedding`, so the whole model
sees CLEX frequencies; ``model.save_pretrained`` then records the CLEX config in config.json's
``rope_parameters`` (type "clex").
"""

from __future__ import annotations

import json
import types
from pathlib import Path

from torch import nn

from ..core.config import CLEXConfig, check_keys
from ..core.rotary_embedding import CLEXRotaryEmbedding
from .fused_rotation import FUSED_ROTATION, use_fused_rotation
from .lookup import find_rotary, get_clex_rotary, text_config
from .t_adapter import attach_t_adapters

CLEX_KEYS = {"rope_type", *CLEXConfig.field_names()}


def plain_rope_keys() -> frozenset[str]:
    """The keys transformers knows in a ``rope_parameters`` dict (its ``RopeParameters``), e.g. rope_theta."""
    try:
        from transformers.modeling_rope_utils import RopeParameters

        return frozenset(RopeParameters.__annotations__)
    except (ImportError, AttributeError):  # an older transformers
        return frozenset(
            {"rope_theta", "rope_type", "partial_rotary_factor", "factor", "original_max_position_embeddings"}
        )


def apply_clex(
    model: nn.Module,
    config: CLEXConfig | dict | None = None,
    *,
    exact_cache: bool = True,
    fused_rotation: str = "auto",
    **overrides: object,
) -> nn.Module:
    """Replace the model's RoPE with CLEX, in place, and return the model.

    ``original_length`` (L) defaults to the model's ``max_position_embeddings``. The model must use plain
    RoPE (``rope_type`` "default"): CLEX starts from the model's own frequencies θ⁰. ``model.save_pretrained``
    then writes a folder that :func:`clex.load_model` reads back.

    Args:
        model: a transformers causal LM of a RoPE family (LLaMA, Mistral, Qwen2/3, Phi-3, GPT-NeoX, ...)
        config: a :class:`CLEXConfig`, a dict of its fields, or None for the defaults
        exact_cache: keep cached keys consistent when t changes during generation (:mod:`clex.hf.generation`:
            cached keys are re-rotated once, in place, when a row's t changes)
        fused_rotation: how each layer's rotation backpropagates into CLEX's cos/sin while training
            (:mod:`clex.hf.fused_rotation`): "auto" (one Triton kernel on a GPU where Triton imports, else eager
            torch), "torch", "triton", or "off" (stock autograd). The same values and gradients (float64: to
            rounding); with ``mscale="learned"`` "auto" means "off" (the fused backward passes no gradient to
            the magnitude of cos/sin); inference and plain RoPE always run transformers' own function.
        **overrides: CLEXConfig fields that win over ``config``'s (e.g. ``max_factor=8``)

    Returns:
        ``model``, with a :class:`CLEXRotaryEmbedding` in place of its rotary module.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"apply_clex's model must be a transformers model (a torch nn.Module with RoPE), got {type(model).__name__}"
        )
    if isinstance(config, dict):
        config = CLEXConfig.from_dict(config)
    if config is None:
        config = CLEXConfig()
    if not isinstance(config, CLEXConfig):
        raise ValueError(f"config must be a CLEXConfig, a dict or None, got {type(config).__name__}")
    if not isinstance(exact_cache, bool):
        raise ValueError(f"apply_clex's exact_cache must be True or False, got {exact_cache!r}")
    if fused_rotation not in FUSED_ROTATION:
        raise ValueError(
            f"apply_clex's fused_rotation must be one of {', '.join(map(repr, FUSED_ROTATION))}; got {fused_rotation!r}"
        )
    if overrides:
        config = config.replace(**overrides)
    if config.mscale == "learned" and fused_rotation != "off":
        # the fused rotation's backward passes only the angle's part of the cos/sin gradient (cos² + sin² taken
        # as fixed): a temperature riding on their magnitude would get no gradient. "auto" picks stock autograd.
        if fused_rotation != "auto":
            raise ValueError(
                f"apply_clex's fused_rotation={fused_rotation!r} cannot train mscale='learned' (its backward drops "
                "the gradient of cos/sin's magnitude, where the learned temperature rides); use 'auto' or 'off'"
            )
        fused_rotation = "off"
    name, old = find_rotary(model)
    if isinstance(old, CLEXRotaryEmbedding):
        raise ValueError(f"{type(model).__name__} already has CLEX at `{name}`")
    register_rope_validation()  # from the first CLEX model on, transformers validates rope_type 'clex'
    rope_type = getattr(old, "rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"CLEX starts from plain RoPE, but this model's rope_type is {rope_type!r}; allowed: 'default'. "
            "Load the model without rope scaling, then apply CLEX"
        )
    hf = text_config(model)
    length = config.original_length or getattr(hf, "max_position_embeddings", None)
    if not length:
        raise ValueError("CLEXConfig.original_length is None and the model config has no max_position_embeddings")
    config = config.replace(original_length=int(length))
    rope_parameters = dict(getattr(hf, "rope_parameters", None) or {})
    inv_freq = getattr(old, "original_inv_freq", old.inv_freq)
    new = CLEXRotaryEmbedding(
        config,
        inv_freq,
        original_length=length,
        rope_theta=float(rope_parameters.get("rope_theta", 10000.0)),
        attention_scaling=float(getattr(old, "attention_scaling", 1.0)),
    ).to(inv_freq.device)
    new.train(old.training)
    attention = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "scaling", None), float)
    ]
    scaled = config.log_scale or config.mscale != "none"  # both act through each attention's `scaling`
    if scaled and not attention:
        raise ValueError(
            f"log_scale={config.log_scale} / mscale={config.mscale!r} need attention modules with a `scaling` "
            "attribute; this model has none: use log_scale=False, mscale='none'"
        )
    for attn in attention:
        attn._clex_base_scaling = getattr(attn, "_clex_base_scaling", attn.scaling)
    if scaled:
        new.register_forward_hook(_query_scale_hook(tuple(attention)))
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    use_fused_rotation(model, new, fused_rotation)
    attach_t_adapters(model)  # CLEXConfig.adapter_rank > 0: weights conditioned on t (clex.hf.t_adapter)
    if exact_cache:
        from .generation import enable_exact_cache  # generation builds on this module

        enable_exact_cache(model)
    return model


def _query_scale_hook(attention: tuple):
    """A forward hook of the CLEX rotary: each attention module's ``scaling`` (which every attention back-end of
    transformers multiplies into q·k: eager, sdpa, flash, flex) becomes its own scaling times the rotary's
    ``query_scale`` of this forward, before any layer runs."""

    def hook(rotary, args, output):
        for attn in attention:
            attn.scaling = attn._clex_base_scaling * rotary.query_scale

    return hook


def _save_pretrained(model, save_directory, *args, **kwargs):
    """``save_pretrained`` of a CLEX model: the model's own, then config.json's ``rope_parameters`` becomes
    {plain RoPE parameters, CLEX fields, "rope_type": "clex"}. (The in-memory config keeps rope_type
    "default": some configs validate rope types on assignment and know no "clex".)"""
    type(model).save_pretrained(model, save_directory, *args, **kwargs)
    file = Path(save_directory) / "config.json"
    if not kwargs.get("is_main_process", True) or not file.is_file():
        return
    raw = json.loads(file.read_text())
    plain = raw.get("rope_parameters") or {"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0)}
    raw["rope_parameters"] = {**plain, **get_clex_rotary(model).config.to_dict(), "rope_type": "clex"}
    raw["auto_map"] = dict(OWN_AUTO_MAP)
    file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    (file.parent / "clex_model.py").write_text(REMOTE_CODE)


#: The auto_map clex writes into a saved CLEX folder's config.json (the one clex's loaders accept: they never run
#: clex_model.py, they read the folder themselves).
OWN_AUTO_MAP = {"AutoModelForCausalLM": "clex_model.CLEXForCausalLM"}

#: Written beside config.json so that stock transformers loads the folder with ``trust_remote_code=True``
#: (through clex), and says what to install when clex is missing.
REMOTE_CODE = '''"""This folder holds a CLEX model (rope_type "clex"): load it with clex.load_model(folder), or with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) where the `clex` package is installed."""
try:
    import clex
except ImportError as e:
    raise ImportError("this folder holds a CLEX model: pip install clex, then clex.load_model(folder)") from e


class CLEXForCausalLM:
    @classmethod
    def register_for_auto_class(cls, auto_class=None):
        pass

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        return clex.load_model(path, dtype=kwargs.get("dtype"), attn_implementation=kwargs.get("attn_implementation"))
'''


def _validate_clex_rope_parameters(hf_config, rope_parameters: dict, ignore_keys=None) -> None:
    """transformers' check of a ``rope_parameters`` entry of type "clex" (it looks the method up by name on its
    config mixin): CLEXConfig's own, so a bad field fails with its name and the allowed values."""
    split_rope_parameters(rope_parameters)


def register_rope_validation() -> None:
    """Teach transformers' configs to validate rope_type "clex" (otherwise it logs "Missing validation
    function ... 'clex'" on every load and save). Idempotent; a no-op where transformers has no such mixin."""
    try:
        from transformers.modeling_rope_utils import RotaryEmbeddingConfigMixin
    except ImportError:  # an older transformers: it validates nothing by name
        return
    if not hasattr(RotaryEmbeddingConfigMixin, "_validate_clex_rope_parameters"):
        RotaryEmbeddingConfigMixin._validate_clex_rope_parameters = _validate_clex_rope_parameters


def split_rope_parameters(rope_parameters: dict) -> tuple[CLEXConfig, dict]:
    """A saved ``rope_parameters`` of type "clex" -> (CLEXConfig, the plain-RoPE parameters underneath).

    Its keys are CLEX fields or transformers' plain-RoPE keys (rope_theta, ...); any other is refused."""
    plain_keys = plain_rope_keys()
    check_keys(rope_parameters, CLEX_KEYS | plain_keys, where="rope_parameters of type 'clex'")
    clex = {k: v for k, v in rope_parameters.items() if k in CLEX_KEYS and k != "rope_type"}
    plain = {k: v for k, v in rope_parameters.items() if k not in CLEX_KEYS}
    return CLEXConfig.from_dict(clex), {**plain, "rope_type": "default"}
