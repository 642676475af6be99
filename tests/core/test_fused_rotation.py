"""The fused rotation (clex.core.fused_rotation): the stock forward bit for bit, and the stock gradients of q, k and
of whatever reaches cos/sin through an angle (θ, the ODE weights), in float64 to rounding; the Triton kernels
(under TRITON_INTERPRET=1, on the CPU) against the eager backward."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clex.core.equations import rope_angles
from clex.core.fused_rotation import fused_rotate, rotate
from clex.core.solve import solve_log_freqs


def inputs(dtype=torch.float64, batch=2, heads=4, kv_heads=2, length=23, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q, k as attention makes them: [B, P, H, d] projections viewed as [B, H, P, d] (not contiguous)
    q = torch.randn(batch, length, heads, dim, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, length, kv_heads, dim, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    theta = (torch.rand(dim // 2, generator=g, dtype=dtype) + 0.05).requires_grad_()
    positions = torch.arange(length, dtype=dtype).expand(batch, -1) * 1.7
    return q, k, theta, positions


def rotated(rotation, q, k, theta, positions, s=1.0, **kw):
    emb = rope_angles(positions, theta)  # [B, P, d], the angles in both halves
    return rotation(q, k, emb.cos() * s, emb.sin() * s, **kw)


def loss_and_grads(rotation, q, k, theta, positions, s=1.0, **kw):
    q_out, k_out = rotated(rotation, q, k, theta, positions, s, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (q_out * torch.randn(q_out.shape, generator=g, dtype=q_out.dtype)).sum() + (
        k_out * torch.randn(k_out.shape, generator=g, dtype=k_out.dtype)
    ).sum()
    return (q_out, k_out), torch.autograd.grad(loss, [q, k, theta])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_forward_is_the_stock_one_bit_for_bit(dtype):
    q, k, theta, positions = inputs(dtype)
    with torch.no_grad():
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                rotated(rotate, q, k, theta, positions), rotated(fused_rotate, q, k, theta, positions, backend="torch")
            )
        )
    mixed = (q.bfloat16(), k.bfloat16(), theta.float(), positions.float())  # autocast: bfloat16 q, float32 cos
    ref, new = rotated(rotate, *mixed), rotated(fused_rotate, *mixed, backend="torch")
    assert all(torch.equal(a, b) and a.dtype == b.dtype == torch.float32 for a, b in zip(ref, new))


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_gradients_of_q_k_and_the_frequencies_equal_the_stock_ones_in_float64(scale):
    q, k, theta, positions = inputs()
    ref_out, ref = loss_and_grads(rotate, q, k, theta, positions, scale)
    out, new = loss_and_grads(fused_rotate, q, k, theta, positions, scale, backend="torch", scale=scale)
    assert all(torch.equal(a, b) for a, b in zip(ref_out, out))
    for a, b in zip(ref, new):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * a.abs().max().item())


def test_gradcheck_through_the_angles():
    q, k, theta, positions = inputs(batch=1, heads=2, kv_heads=1, length=5, dim=8)

    def f(q, k, theta):
        return rotated(fused_rotate, q, k, theta, positions, 1.3, backend="torch", scale=1.3)

    assert torch.autograd.gradcheck(f, (q, k, theta))


def test_the_ode_weights_gradients_equal_the_stock_ones_in_float64():
    q, k, _, positions = inputs()
    g = torch.Generator().manual_seed(3)
    inv0 = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    w_up = (torch.randn(8, 16, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    w_down = (torch.randn(16, 8, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    grads = []
    for rotation, kw in [(rotate, {}), (fused_rotate, {"backend": "torch"})]:
        theta = torch.exp(solve_log_freqs(inv0, w_up, w_down, [1.0, 5.0], act="tanh", prior_base=10000.0)[1])
        q_out, k_out = rotated(rotation, q, k, theta, positions * 5, **kw)
        loss = (q_out.sin() * 3).sum() + (k_out**2).sum()
        grads.append(torch.autograd.grad(loss, [w_up, w_down, q, k]))
    for a, b in zip(*grads):
        assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-12, atol=1e-12 * a.abs().max().item())


def test_bad_shapes_and_backends_are_refused():
    q, k, theta, positions = inputs()
    emb = rope_angles(positions, theta)
    with pytest.raises(ValueError, match="fused_rotate needs q"):
        fused_rotate(q[0], k, emb.cos(), emb.sin())
    with pytest.raises(ValueError, match="backend must be one of torch, triton, auto; got 'cuda'"):
        fused_rotate(q, k, emb.cos(), emb.sin(), backend="cuda")


def test_the_triton_kernels_equal_the_eager_backward():
    """In a child process with TRITON_INTERPRET=1 (read when Triton is first imported): the kernels on the CPU."""
    pytest.importorskip("triton")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_fused_rotation; test_fused_rotation.check_triton()"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True
    )
    assert done.returncode == 0 and "triton ok" in done.stdout, done.stdout + done.stderr


def check_triton():
    for dtype in (torch.float64, torch.float32):
        for shape in [dict(), dict(batch=1, heads=3, kv_heads=3, length=40, dim=12)]:  # GQA; odd heads, d/2 = 6 padded
            q, k, theta, positions = inputs(dtype, **shape)
            _, ref = loss_and_grads(fused_rotate, q, k, theta, positions, 1.3, backend="torch", scale=1.3)
            _, new = loss_and_grads(fused_rotate, q, k, theta, positions, 1.3, backend="triton", scale=1.3)
            _, stock = loss_and_grads(rotate, q, k, theta, positions, 1.3)
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            for a, b, c in zip(ref, new, stock):
                assert torch.allclose(a, b, rtol=tol, atol=tol * a.abs().max().item()), (dtype, shape)
                assert torch.allclose(c, b, rtol=tol, atol=tol * c.abs().max().item()), (dtype, shape)
    print("triton ok")
