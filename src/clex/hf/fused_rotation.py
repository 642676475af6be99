"""CLEX's fused rotation (:mod:`clex.core.fused_rotation`) inside transformers' attention layers.

transformers' attention modules call their module's ``apply_rotary_pos_emb(q, k, cos, sin)`` by its global
name. :func:`use_fused_rotation` replaces that function, in each modeling module whose function is LLaMA's
(compared by bytecode, so the copies in Mistral, Qwen2, ... qualify and variants such as partial rotary or
M-RoPE do not), by a dispatcher: cos/sin tagged by the CLEX rotary's forward hook (only while they
require grad) take the fused rotation; anything else — plain RoPE, inference, other models in the process,
torch.compile tracing — runs the original function untouched. The patch is process-wide and idempotent,
like liger-kernel's.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from ..core.fused_rotation import BACKENDS, fused_rotate, rotate_half
from ..core.rotary_embedding import CLEXRotaryEmbedding

#: apply_clex's ``fused_rotation`` values: "off" (stock autograd) or a backend of the fused backward
FUSED_ROTATION = ("off", *BACKENDS)


def _llama_rotation(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' LLaMA ``apply_rotary_pos_emb``, token for token: the bytecode its copies must match."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def _same_code(fn, reference) -> bool:
    code, ref = getattr(fn, "__code__", None), reference.__code__
    return (
        code is not None
        and (code.co_code, code.co_names, code.co_varnames, code.co_consts[1:])
        == (ref.co_code, ref.co_names, ref.co_varnames, ref.co_consts[1:])
        and fn.__defaults__ == reference.__defaults__
    )


def _python_function(fn):
    """The Python function behind a modeling module's ``apply_rotary_pos_emb``: the function itself, or the one a
    `kernels` hub wrapper falls back to (transformers >= 5.25 wraps it in a module when `kernels` is installed)."""
    if inspect.isfunction(fn):
        return fn
    forward = getattr(type(fn), "forward", None)
    if inspect.isfunction(forward) and forward.__closure__:
        inner = inspect.getclosurevars(forward).nonlocals.get("func")
        if inspect.isfunction(inner):
            return inner
    return None


def is_llama_rotation(fn) -> bool:
    """``fn`` is transformers' LLaMA rotation (or a byte-identical copy, or either behind a `kernels` hub
    wrapper) calling the stock ``rotate_half``."""
    fn = _python_function(fn)
    return (
        fn is not None
        and _same_code(fn, _llama_rotation)
        and _same_code(fn.__globals__.get("rotate_half"), rotate_half)
    )


def _dispatcher(stock):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if torch.compiler.is_compiling() or unsqueeze_dim != 1 or not torch.is_grad_enabled():
            return stock(q, k, cos, sin, unsqueeze_dim)
        tag = getattr(cos, "_clex_rotation", None)  # (backend, attention_scaling) from CLEXRotaryEmbedding
        if tag is None or getattr(sin, "_clex_rotation", None) != tag or q.dim() != 4 or cos.dim() != 3:
            return stock(q, k, cos, sin, unsqueeze_dim)
        return fused_rotate(q, k, cos, sin, *tag)

    apply_rotary_pos_emb.clex_stock = stock
    apply_rotary_pos_emb.__doc__ = stock.__doc__
    return apply_rotary_pos_emb


def _tag_hook(rotary, args, output):
    """A forward hook of the CLEX rotary: tags cos/sin that require grad with (backend, attention_scaling), the
    dispatcher's signal that they are s·cos a, s·sin a with a duplicated over the halves."""
    cos, sin = output
    if rotary.fused_rotation and cos.requires_grad:
        cos._clex_rotation = sin._clex_rotation = (rotary.fused_rotation, rotary.attention_scaling)


def use_fused_rotation(model: nn.Module, rotary: CLEXRotaryEmbedding, mode: str) -> list[str]:
    """Turn CLEX's fused rotation on (a backend) or off for ``model``; the modeling modules that run it.

    mode: "off", "torch", "triton" or "auto" (Triton for CUDA tensors where it imports, else torch), checked
    by :func:`clex.apply_clex` before it changes the model. The rotary module tags its cos/sin with the
    backend; the attention's module function is patched once."""
    rotary.fused_rotation = None if mode == "off" else mode
    if mode == "off":
        return []
    rotary.register_forward_hook(_tag_hook)
    modules = []
    for module_name in dict.fromkeys(
        type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")
    ):
        module = sys.modules.get(module_name)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is not None and not hasattr(fn, "clex_stock") and is_llama_rotation(fn):
            module.apply_rotary_pos_emb = _dispatcher(fn)
        if hasattr(getattr(module, "apply_rotary_pos_emb", None), "clex_stock"):
            modules.append(module_name)
    rotary.fused_rotation_modules = tuple(modules)
    return modules
