"""apply_clex on every supported family: identity within L, gradients, log_scale, bad input."""

import pytest
import torch
from conftest import FAMILIES, tiny_model

import clex
from clex.hf.lookup import find_rotary


def ids(n, batch=2, seed=0):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_within_L_clex_is_the_unmodified_model_and_beyond_it_differs(family):
    model = tiny_model(family)
    x = ids(40)
    with torch.no_grad():
        plain_short, plain_long = model(x[:, :16]).logits, model(x).logits
    rotary_dim = 2 * find_rotary(model)[1].inv_freq.numel()
    clex.apply_clex(model, max_factor=4)
    assert isinstance(clex.get_clex_rotary(model), clex.CLEXRotaryEmbedding)
    assert clex.get_clex_rotary(model).dynamics.ode_up_proj.shape == (rotary_dim // 2, rotary_dim)
    with torch.no_grad():
        assert torch.equal(model(x[:, :16]).logits, plain_short)
        long = model(x).logits
    assert torch.isfinite(long).all() and (long - plain_long).abs().max() > 1e-4


def test_gradients_reach_the_ode_weights_through_a_model_loss():
    model = tiny_model("llama").train()
    clex.apply_clex(model, max_factor=4, train_t="uniform", seed=1)
    dyn = clex.get_clex_rotary(model).dynamics
    with torch.no_grad():
        dyn.ode_down_proj.normal_(0, 0.05)
    x = ids(16)
    model(x, labels=x).loss.backward()
    assert clex.get_clex_rotary(model).last_t[0] > 1
    assert dyn.ode_up_proj.grad.abs().sum() > 0 and dyn.ode_down_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_log_scale_acts_through_every_attention_backend(attn):
    x = ids(40)
    results = {}
    for impl in ("eager", attn):
        model = tiny_model("llama", attn_implementation=impl)
        clex.apply_clex(model, max_factor=4, log_scale=True)
        with torch.no_grad():
            results[impl] = (model(x[:, :16]).logits, model(x).logits)
    torch.testing.assert_close(results["eager"][1], results[attn][1], rtol=1e-5, atol=1e-5)
    base = tiny_model("llama", attn_implementation="eager")
    clex.apply_clex(base, max_factor=4)
    with torch.no_grad():
        assert torch.equal(base(x[:, :16]).logits, results["eager"][0])  # within L: no scaling
        assert (base(x).logits - results["eager"][1]).abs().max() > 1e-5  # past L: queries scaled
    attn0 = base.model.layers[0].self_attn
    assert attn0.scaling == attn0._clex_base_scaling  # log_scale off leaves scaling alone


def test_a_model_without_rope_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="no RoPE rotary module"):
        clex.apply_clex(model)


def test_a_model_with_rope_scaling_already_is_refused():
    model = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type is 'linear'; allowed: 'default'"):
        clex.apply_clex(model)


def test_applying_twice_is_refused():
    model = clex.apply_clex(tiny_model("llama"))
    with pytest.raises(ValueError, match="already has CLEX"):
        clex.apply_clex(model)


def test_the_clex_rotary_is_required_where_expected():
    with pytest.raises(ValueError, match="call clex.apply_clex"):
        clex.get_clex_rotary(tiny_model("llama"))


def test_transformers_validates_clex_rope_parameters_with_our_errors():
    """transformers looks up a validation function by rope_type; ours is registered: a good entry passes
    silently (no "Missing validation function" log), a bad field fails with its name and allowed values."""
    import transformers

    good = transformers.LlamaConfig(rope_parameters={"rope_type": "clex", "rope_theta": 1e4, "max_factor": 8})
    assert good.rope_parameters["max_factor"] == 8
    with pytest.raises(Exception, match="CLEXConfig.max_factor must be a number >= 1, got 0"):
        transformers.LlamaConfig(rope_parameters={"rope_type": "clex", "rope_theta": 1e4, "max_factor": 0})
