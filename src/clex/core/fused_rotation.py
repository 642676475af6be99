"""The rotate-half rotation with a backward that also yields the angle's gradient, in one pass per layer.

    q' = q · cos + rotate_half(q) · sin,   rotate_half([q₁, q₂]) = [-q₂, q₁]      (RoPE, the rotate-half layout)

CLEX trains through cos = s·cos a and sin = s·sin a (a: the angles [B, P, d], duplicated over the two halves,
s: a constant ``attention_scaling``), so every layer's rotation backpropagates into them. Stock autograd does
that with two extra products and two reductions over the heads for each of q and k, and keeps q and
rotate_half(q) alive for it. With the halves duplicated, each pair (j, j + d/2) is a plane rotation by a_j, so

    ∂q'/∂a = rotate_half(q'),   dL/da[b, p, :] = Σ_h g_q[b, h, p, :] · rotate_half(q')[b, h, p, :]  (+ the same for k)

(g: the gradient of q'): the angle's gradient needs only the outputs, which attention keeps anyway, and
their gradients. The backward returns for (cos, sin) the tangent part of their gradient,
``-sin · G / s²`` and ``cos · G / s²`` with G the sum above: whatever reaches cos and sin
through an angle gets exactly dL/da = G (-sin·g_cos + cos·g_sin = G; cos² + sin² = s², s given). It is *not*
the gradient of a cos/sin that is a free tensor: use it only for cos/sin made from angles duplicated over the
halves, as CLEX makes them.

The forward is the stock expression, op for op (its output is bitwise the stock one). The backward runs in
eager torch (``backend="torch"``) or as one Triton kernel per call on a GPU (``"triton"``,
:mod:`clex.core.fused_rotation_triton`): it reads g, q', cos and sin once and writes grad_q and the per-position sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: how the backward runs: eager torch; one Triton kernel (CUDA tensors, Triton installed); triton where it can
BACKENDS = ("torch", "triton", "auto")


def rotate_half(x: Tensor) -> Tensor:
    """[x₁, x₂] -> [-x₂, x₁] over the last dimension (transformers' own, op for op)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The stock rotation (transformers' ``apply_rotary_pos_emb`` with unsqueeze_dim=1), no custom backward.

    q: [B, H, P, d], k: [B, H_kv, P, d], cos, sin: [B, P, d] -> (q', k') in the promoted dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def triton_available() -> bool:
    """Triton imports (it is what ``backend="triton"`` needs, with CUDA tensors)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_FAILED: list[str] = []  # the error of a failed kernel under "auto": the process then stays on torch


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``auto-triton`` (the kernel, falling back to torch if it fails) on CUDA where Triton
    imports, else ``torch``; the others are checked and kept."""
    if backend not in BACKENDS:
        raise ValueError(f"the fused rotation's backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "auto-triton" if device.type == "cuda" and not _TRITON_FAILED and triton_available() else "torch"
    return backend


def _triton_backward(args, *, strict: bool):
    """The kernels; under "auto" a failure (a Triton that cannot compile here) warns once and runs torch's."""
    try:
        from .fused_rotation_triton import rotation_backward

        return rotation_backward(*args)
    except Exception as e:  # noqa: BLE001 (any compiler or driver error)
        if strict:
            raise
        import warnings

        _TRITON_FAILED.append(repr(e))
        warnings.warn(
            f"CLEX's fused rotation: the Triton kernel failed ({e!r}); using the eager-torch backward", stacklevel=2
        )
        return rotation_backward_torch(*args)


def fused_rotate(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backend: str = "auto", scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """:func:`rotate`'s values, with the one-pass backward described in this module's docstring.

    q: [B, H, P, d], k: [B, H_kv, P, d], cos, sin: [B, P, d] = scale·cos a, scale·sin a with the same angles a
    in both halves of d (scale: a constant, transformers' ``attention_scaling``)."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape or q.shape[-1] % 2:
        raise ValueError(
            f"fused_rotate needs q [B, H, P, d], k [B, H_kv, P, d] and cos, sin [B, P, d] with d even; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if not scale > 0:
        raise ValueError(f"fused_rotate's scale must be > 0, got {scale!r}")
    return _FusedRotation.apply(q, k, cos, sin, resolve_backend(backend, q.device), float(scale))


class _FusedRotation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, backend, scale):
        q_out, k_out = rotate(q, k, cos, sin)
        ctx.save_for_backward(q_out, k_out, cos, sin)
        ctx.backend, ctx.dtypes, ctx.inv_scale2 = backend, (q.dtype, k.dtype), 1.0 / (scale * scale)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q_out, grad_k_out):
        q_out, k_out, cos, sin = ctx.saved_tensors
        grad_q_out = torch.zeros_like(q_out) if grad_q_out is None else grad_q_out
        grad_k_out = torch.zeros_like(k_out) if grad_k_out is None else grad_k_out
        args = (grad_q_out, grad_k_out, q_out, k_out, cos, sin, ctx.dtypes, ctx.inv_scale2)
        if ctx.backend in ("triton", "auto-triton"):  # (CPU tensors only under TRITON_INTERPRET=1, as in the tests)
            grads = _triton_backward(args, strict=ctx.backend == "triton")
        else:
            grads = rotation_backward_torch(*args)
        return (*(g if wanted else None for g, wanted in zip(grads, ctx.needs_input_grad)), None, None)


def _input_grad(g: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype) -> Tensor:
    """dL/dq = g·cos + [g₂·sin₂, -g₁·sin₁] (rotate_half's transpose), as three ops.  g: [B, H, P, d]"""
    half = g.shape[-1] // 2
    out = g * cos
    out[..., :half].addcmul_(g[..., half:], sin[..., half:])
    out[..., half:].addcmul_(g[..., :half], sin[..., :half], value=-1)
    return out.to(dtype)


def _swapped_products(g: Tensor, out: Tensor, acc: torch.dtype) -> Tensor:
    """Σ_h [g₁·out₂, g₂·out₁], [B, P, d] in ``acc``: one product, written half by half, and one reduction.
    (Σ_h g·rotate_half(out) is this with its first half negated.)"""
    half = g.shape[-1] // 2
    prod = torch.empty(
        g.shape, dtype=g.dtype if g.dtype == out.dtype else torch.promote_types(g.dtype, out.dtype), device=g.device
    )
    torch.mul(g[..., :half], out[..., half:], out=prod[..., :half])
    torch.mul(g[..., half:], out[..., :half], out=prod[..., half:])
    return prod.sum(1, dtype=acc)


def tangent_grads(swapped: Tensor, cos: Tensor, sin: Tensor, inv_scale2: float = 1.0) -> tuple[Tensor, Tensor]:
    """(g_cos, g_sin) = (-sin, cos) · G / scale², G = [-S₁, S₂] (S = ``swapped``), in cos's dtype: the pair
    that gives dL/da = G through cos = scale·cos a, sin = scale·sin a.  all [B, P, d]"""
    half = swapped.shape[-1] // 2
    if inv_scale2 != 1.0:
        swapped = swapped * inv_scale2
    g_cos, g_sin = sin * swapped, cos * swapped  # -sin·G = [sin₁·S₁, -sin₂·S₂], cos·G = [-cos₁·S₁, cos₂·S₂]
    g_cos[..., half:].neg_()
    g_sin[..., :half].neg_()
    return g_cos.to(cos.dtype), g_sin.to(sin.dtype)


def rotation_backward_torch(gq, gk, q_out, k_out, cos, sin, dtypes, inv_scale2=1.0):
    """The backward in eager torch: (grad_q, grad_k, g_cos, g_sin).  gq, q_out: [B, H, P, d]; cos: [B, P, d]"""
    acc = torch.float64 if cos.dtype == torch.float64 else torch.float32
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    swapped = _swapped_products(gq, q_out, acc).add_(_swapped_products(gk, k_out, acc))
    return (
        _input_grad(gq, c, s, dtypes[0]),
        _input_grad(gk, c, s, dtypes[1]),
        *tangent_grads(swapped, cos, sin, inv_scale2),
    )
