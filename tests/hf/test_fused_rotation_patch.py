"""CLEX's fused rotation in transformers' attention (clex.hf.fused_rotation): the same forward and gradients as
stock autograd while training, transformers' own function everywhere else, patched only where it is LLaMA's."""

import sys

import pytest
import torch
from conftest import tiny_model

import clex
from clex.hf.compat import set_activation_checkpointing
from clex.hf.fused_rotation import is_llama_rotation


def ids(n, batch=2, seed=0):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def trained_grads(family, fused_rotation, *, checkpointing=False, dtype=torch.float64):
    model = tiny_model(family).to(dtype).train()
    torch.manual_seed(1)
    clex.apply_clex(model, max_factor=4, seed=2, fused_rotation=fused_rotation)
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    if checkpointing:
        set_activation_checkpointing(model)
    x = ids(24)
    out = model(x, labels=x)
    out.loss.backward()
    assert clex.get_clex_rotary(model).last_t[0] > 1
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi"])  # GQA; head_dim given; partial rotary outside
def test_a_training_step_is_the_stock_one(family):
    logits, grads = trained_grads(family, "off")
    for kwargs in [dict(), dict(checkpointing=True)]:
        new_logits, new_grads = trained_grads(family, "torch", **kwargs)
        assert torch.equal(logits, new_logits)
        for name, g in grads.items():
            # the model in float64 to rounding; the ODE weights through CLEX's float32 solve, to its rounding
            tol = 1e-5 if "ode_" in name else 1e-11
            assert torch.allclose(new_grads[name], g, rtol=tol, atol=tol * g.abs().max().item()), name


def test_the_patch_is_where_the_rotation_is_llamas_and_the_stock_function_runs_elsewhere(monkeypatch):
    import clex.hf.fused_rotation as rotation
    from clex.core.fused_rotation import rotate

    calls = []
    monkeypatch.setattr(rotation, "fused_rotate", lambda *a: calls.append(a[-2:]) or rotate(*a[:4]))
    model = tiny_model("llama").train()
    clex.apply_clex(model, max_factor=4, fused_rotation="auto")
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    assert clex.get_clex_rotary(model).fused_rotation_modules == (module.__name__,)
    assert is_llama_rotation(module.apply_rotary_pos_emb.clex_stock) and not is_llama_rotation(
        module.apply_rotary_pos_emb
    )
    x = ids(20)
    model(x, labels=x).loss.backward()
    assert calls == [("auto", 1.0)] * 2  # both layers, tagged with the backend and attention_scaling
    with torch.no_grad():  # inference: nothing requires grad, transformers' own function
        model.eval()(x)
    assert len(calls) == 2
    model(x)  # an eval forward with gradients on: they flow to the ODE weights, through the fused rotation
    assert len(calls) == 4
    clex.get_clex_rotary(model).requires_grad_(False)  # frozen ODE weights: cos/sin need no gradient
    model.train()(x, labels=x).loss.backward()
    plain = tiny_model("llama").train()
    plain(x, labels=x).loss.backward()
    assert len(calls) == 4
    # Phi-3's and GPT-NeoX's rotations (partial rotary inside) are not LLaMA's: left alone, stock autograd there
    for family in ("phi3", "gpt_neox"):
        other = tiny_model(family).train()
        clex.apply_clex(other, max_factor=4)
        assert clex.get_clex_rotary(other).fused_rotation_modules == ()
        other(x, labels=x).loss.backward()
    # "off" tags nothing
    off = tiny_model("llama").train()
    clex.apply_clex(off, max_factor=4, fused_rotation="off")
    off(x, labels=x).loss.backward()
    assert len(calls) == 4


def test_a_bad_fused_rotation_is_refused():
    with pytest.raises(ValueError, match="fused_rotation must be one of 'off', 'torch', 'triton', 'auto'; got 'on'"):
        clex.apply_clex(tiny_model("llama"), fused_rotation="on")


def _hub_wrapper(func):
    """The shape of `kernels`' function wrapper: a module whose forward falls back to ``func`` in its closure."""

    class Func(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return func(*args, **kwargs)

    return Func()


def test_the_rotation_behind_a_kernels_hub_wrapper_is_recognised():
    """transformers >= 5.25 with `kernels` installed holds apply_rotary_pos_emb as such a module: the patch sees
    through it to LLaMA's rotation, and not through a wrapper of some other function."""
    from clex.hf.fused_rotation import _llama_rotation

    assert is_llama_rotation(_hub_wrapper(_llama_rotation))
    assert not is_llama_rotation(_hub_wrapper(lambda q, k, cos, sin, unsqueeze_dim=1: (q, k)))
    assert not is_llama_rotation(_hub_wrapper(torch.add))
