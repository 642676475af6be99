"""The fused rotation's backward as Triton kernels (see :mod:`clex.core.fused_rotation` for the identity).

Kernel 1, one program per (block of positions, row, group of heads): reads g and q' (and g_k, k') once,
cos/sin once, writes grad_q, grad_k and a per-position partial sum Σ_heads g·rotate_half(q') in float32
[groups, B, P, d]. Kernel 2 sums the groups (a fixed order: deterministic) and writes the tangent gradients
of cos and sin. Heads are split into groups only to give a short sequence enough programs to fill the GPU.
Computed in float32 (float64 for float64 inputs); stored in the tensors' own dtypes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_P = 16  # positions per program
TARGET_PROGRAMS = 1024  # split the heads into groups until about this many programs run


@triton.jit
def _heads(
    g_ptr,
    o_ptr,
    d_ptr,
    b,
    h0,
    per: tl.constexpr,
    heads,
    rows,
    cols,
    inside,
    sgb,
    sgh,
    sgp,
    sob,
    soh,
    sop,
    c1,
    c2,
    s1,
    s2,
    acc1,
    acc2,
    HALF: tl.constexpr,
    ACC: tl.constexpr,
):
    """grad = g·cos + [g₂·sin₂, -g₁·sin₁] for heads h0 .. h0+per-1 (those < heads), stored; returns the
    sums += g·rotate_half(o)."""
    for i in range(per):
        h = h0 + i
        mask = inside & (h < heads)
        g_off = b * sgb + h * sgh + rows[:, None] * sgp + cols[None, :]
        o_off = b * sob + h * soh + rows[:, None] * sop + cols[None, :]  # grad has o's strides
        g1 = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(ACC)
        g2 = tl.load(g_ptr + g_off + HALF, mask=mask, other=0.0).to(ACC)
        o1 = tl.load(o_ptr + o_off, mask=mask, other=0.0).to(ACC)
        o2 = tl.load(o_ptr + o_off + HALF, mask=mask, other=0.0).to(ACC)
        tl.store(d_ptr + o_off, g1 * c1 + g2 * s2, mask=mask)
        tl.store(d_ptr + o_off + HALF, g2 * c2 - g1 * s1, mask=mask)
        acc1 -= g1 * o2  # rotate_half(o) = [-o₂, o₁]
        acc2 += g2 * o1
    return acc1, acc2


@triton.jit
def _backward_kernel(
    gq,
    oq,
    dq,
    gk,
    ok,
    dk,
    cos,
    sin,
    part,
    P,
    HQ,
    HK,
    HQ_PER: tl.constexpr,
    HK_PER: tl.constexpr,
    sgqb,
    sgqh,
    sgqp,
    soqb,
    soqh,
    soqp,
    sgkb,
    sgkh,
    sgkp,
    sokb,
    sokh,
    sokp,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2)
    nb = tl.num_programs(1)
    rows = pid_p * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HALF_PAD)
    mask = (rows[:, None] < P) & (cols[None, :] < HALF)
    cs = b * P * 2 * HALF + rows[:, None] * (2 * HALF) + cols[None, :]  # cos, sin: contiguous [B, P, d]
    c1 = tl.load(cos + cs, mask=mask, other=0.0).to(ACC)
    c2 = tl.load(cos + cs + HALF, mask=mask, other=0.0).to(ACC)
    s1 = tl.load(sin + cs, mask=mask, other=0.0).to(ACC)
    s2 = tl.load(sin + cs + HALF, mask=mask, other=0.0).to(ACC)
    acc1 = tl.zeros((BLOCK, HALF_PAD), dtype=ACC)
    acc2 = tl.zeros((BLOCK, HALF_PAD), dtype=ACC)
    acc1, acc2 = _heads(
        gq,
        oq,
        dq,
        b,
        group * HQ_PER,
        HQ_PER,
        HQ,
        rows,
        cols,
        mask,
        sgqb,
        sgqh,
        sgqp,
        soqb,
        soqh,
        soqp,
        c1,
        c2,
        s1,
        s2,
        acc1,
        acc2,
        HALF,
        ACC,
    )
    acc1, acc2 = _heads(
        gk,
        ok,
        dk,
        b,
        group * HK_PER,
        HK_PER,
        HK,
        rows,
        cols,
        mask,
        sgkb,
        sgkh,
        sgkp,
        sokb,
        sokh,
        sokp,
        c1,
        c2,
        s1,
        s2,
        acc1,
        acc2,
        HALF,
        ACC,
    )
    out = group * nb * P * 2 * HALF + cs  # part: [groups, B, P, d]
    tl.store(part + out, acc1, mask=mask)
    tl.store(part + out + HALF, acc2, mask=mask)


@triton.jit
def _tangent_kernel(
    part, cos, sin, dcos, dsin, n, inv_scale2, GROUPS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    """G = Σ_groups part; dcos = -sin·G/s², dsin = cos·G/s², over n = B·P·d elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    total = tl.zeros((BLOCK,), dtype=ACC)
    for g in range(GROUPS):
        total += tl.load(part + g * n + offs, mask=mask, other=0.0)
    c = tl.load(cos + offs, mask=mask, other=1.0).to(ACC)
    s = tl.load(sin + offs, mask=mask, other=0.0).to(ACC)
    scaled = total * inv_scale2
    tl.store(dcos + offs, -s * scaled, mask=mask)
    tl.store(dsin + offs, c * scaled, mask=mask)


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rotation_backward(gq, gk, q_out, k_out, cos, sin, dtypes, inv_scale2=1.0):
    """The same contract as :func:`clex.core.fused_rotation.rotation_backward_torch`, as two kernel launches."""
    gq, gk, q_out, k_out = (_last_dim_dense(t) for t in (gq, gk, q_out, k_out))
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, hq, length, dim = q_out.shape
    hk, half = k_out.shape[1], dim // 2
    acc = torch.float64 if cos.dtype == torch.float64 or q_out.dtype == torch.float64 else torch.float32
    blocks = triton.cdiv(length, BLOCK_P)
    groups = max(1, min(max(hq, hk), math.ceil(TARGET_PROGRAMS / (blocks * batch))))
    hq_per, hk_per = math.ceil(hq / groups), math.ceil(hk / groups)
    groups = max(math.ceil(hq / hq_per), math.ceil(hk / hk_per))
    dq = torch.empty_like(q_out, dtype=dtypes[0])  # q_out's strides (preserve_format)
    dk = torch.empty_like(k_out, dtype=dtypes[1])
    if dq.stride() != q_out.stride() or dk.stride() != k_out.stride():
        q_out, k_out = q_out.contiguous(), k_out.contiguous()
        dq, dk = torch.empty_like(q_out, dtype=dtypes[0]), torch.empty_like(k_out, dtype=dtypes[1])
    part = torch.empty((groups, batch, length, dim), dtype=acc, device=q_out.device)
    tl_acc = tl.float64 if acc == torch.float64 else tl.float32
    _backward_kernel[(blocks, batch, groups)](
        gq,
        q_out,
        dq,
        gk,
        k_out,
        dk,
        cos,
        sin,
        part,
        length,
        hq,
        hk,
        hq_per,
        hk_per,
        gq.stride(0),
        gq.stride(1),
        gq.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        gk.stride(0),
        gk.stride(1),
        gk.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        BLOCK=BLOCK_P,
        ACC=tl_acc,
    )
    dcos, dsin = torch.empty_like(cos), torch.empty_like(sin)
    n = cos.numel()
    _tangent_kernel[(triton.cdiv(n, 1024),)](
        part, cos, sin, dcos, dsin, n, inv_scale2, GROUPS=groups, BLOCK=1024, ACC=tl_acc
    )
    return dq, dk, dcos, dsin
