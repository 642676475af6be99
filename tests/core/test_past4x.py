"""The options beyond the paper (issue 17): the YaRN prior, the angle cap, holding the residual past
max_factor and YaRN's attention temperature. Each is checked against an exact identity."""

import math

import pytest
import torch
from conftest import tiny_model
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import clex
from clex.core.equations import angle_cap, prior_shift, yarn_ramp
from clex.hf.generation import fixed_t
from clex.hf.methods import prepare_model

L = 16


def trained_like(rotary, scale=0.3, seed=1):
    """ODE weights that move θ(t) well away from the prior, as training does."""
    with torch.no_grad():
        rotary.dynamics.ode_down_proj.normal_(0, scale, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0, 16.0])
def test_the_untrained_yarn_prior_is_transformers_yarn_at_factor_t(factor):
    model = tiny_model("llama", hidden_size=128, num_attention_heads=2, rope_theta=1e5)
    clex.apply_clex(model, prior="yarn", max_factor=16)
    ours = clex.get_clex_rotary(model).inv_freq_at(factor)
    hf = model.config
    hf.rope_parameters = {
        **hf.rope_parameters,
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": L,
    }
    theirs, _ = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)


def test_the_ramp_leaves_fast_pairs_alone_and_interpolates_pairs_that_never_turned():
    d, base, length = 64, 1e5, 8192
    log0 = -(torch.arange(0, d, 2).double() / d) * math.log(base)
    ramp = yarn_ramp(log0, length)
    turns = length * log0.exp() / (2 * math.pi)
    assert (ramp[turns > 32] == 0).all() and (ramp[turns < 1] == 1).all()
    assert prior_shift("yarn", 1.0, log0, length=length).abs().max() < 1e-15  # s(1) = 0: θ(1) = θ⁰


def test_a_yarn_clex_model_with_yarn_temperature_equals_transformers_yarn_model():
    """Untrained CLEX(prior=yarn, mscale=yarn) at fixed t = s gives the logits of transformers' own YaRN s."""
    ids = torch.randint(3, 97, (1, 3 * L), generator=torch.Generator().manual_seed(0))
    yarn = prepare_model(tiny_model("llama"), "yarn", factor=4)
    ours = clex.apply_clex(tiny_model("llama"), prior="yarn", mscale="yarn", max_factor=8, exact_cache=False)
    with torch.no_grad(), fixed_t(ours, 4.0):
        a = ours(ids).logits
    with torch.no_grad():
        b = yarn(ids).logits
    assert (a - b).abs().max() <= 2e-5
    assert (a - ours(ids).logits).abs().max() > 1e-3  # t = 3 without the pin: a different model


def test_the_angle_cap_keeps_never_turned_pairs_inside_their_pretraining_angles():
    model = tiny_model("llama", hidden_size=128, num_attention_heads=2, rope_theta=1e5)
    clex.apply_clex(model, angle_cap=True, max_factor=16)
    rotary = clex.get_clex_rotary(model)
    trained_like(rotary)
    free = clex.get_clex_rotary(
        clex.apply_clex(tiny_model("llama", hidden_size=128, num_attention_heads=2, rope_theta=1e5), max_factor=16)
    )
    free.dynamics.load_state_dict(rotary.dynamics.state_dict())
    log0 = rotary.inv_freq.log()
    never = L * rotary.inv_freq < 2 * math.pi
    assert never.any() and (~never).any()
    broke = False
    for t in (2.0, 5.5, 16.0, 24.0):
        capped, uncapped = rotary.inv_freq_at(t), free.inv_freq_at(t)
        assert (L * t * capped[never] <= L * rotary.inv_freq[never] * (1 + 1e-6)).all()  # the farthest angle
        assert torch.equal(capped[~never], uncapped[~never])  # pairs that turned: untouched
        assert torch.equal(capped, torch.minimum(uncapped, angle_cap(log0, t, L).exp()))
        broke |= bool((L * t * uncapped[never] > L * rotary.inv_freq[never] * 1.01).any())
    assert broke  # without the cap these weights do leave the range


def test_past_max_prior_keeps_the_residual_of_max_factor_and_follows_the_prior_beyond():
    model = clex.apply_clex(tiny_model("llama"), past_max="prior", max_factor=4)
    rotary = clex.get_clex_rotary(model)
    trained_like(rotary)
    ode = clex.get_clex_rotary(clex.apply_clex(tiny_model("llama"), max_factor=4))
    ode.dynamics.load_state_dict(rotary.dynamics.state_dict())
    log0 = rotary.inv_freq.log()
    for t in (1.5, 3.0, 4.0):
        assert torch.equal(rotary.inv_freq_at(t), ode.inv_freq_at(t))
    top = rotary.inv_freq_at(4.0).log()
    for t in (6.0, 16.0):
        want = top + prior_shift("ntk", t, log0) - prior_shift("ntk", 4.0, log0)
        assert torch.allclose(rotary.inv_freq_at(t).log(), want, atol=1e-6)
        assert not torch.allclose(ode.inv_freq_at(t), rotary.inv_freq_at(t))


def test_yarn_temperature_scales_attention_logits_by_the_square_of_the_mscale():
    model = clex.apply_clex(tiny_model("llama"), mscale="yarn", max_factor=8, t_resolution=0)
    attn = model.model.layers[0].self_attn
    base = attn._clex_base_scaling
    with torch.no_grad():
        model(torch.zeros(1, L, dtype=torch.long))
        assert attn.scaling == base  # t = 1: unchanged
        model(torch.zeros(1, 3 * L, dtype=torch.long))
        assert attn.scaling == pytest.approx(base * (0.1 * math.log(3.0) + 1) ** 2, rel=1e-12)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prior", "yarnn", "CLEXConfig.prior must be one of 'ntk', 'yarn', got 'yarnn'"),
        ("past_max", "hold", "CLEXConfig.past_max must be one of 'ode', 'prior', got 'hold'"),
        ("mscale", True, "CLEXConfig.mscale must be one of 'none', 'yarn', 'learned', got True"),
        ("angle_cap", "yes", "CLEXConfig.angle_cap must be True or False, got 'yes'"),
    ],
)
def test_bad_values_of_the_new_fields_name_the_field_and_the_allowed_values(field, value, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        clex.CLEXConfig(**{field: value})


def test_the_yarn_prior_needs_the_residual_formulation():
    with pytest.raises(ValueError, match="prior='yarn' needs formulation='residual'"):
        clex.CLEXConfig(prior="yarn", method="rk4", formulation="reference")


def test_a_model_saved_with_the_new_fields_loads_them_back(tmp_path):
    model = clex.apply_clex(tiny_model("llama"), prior="yarn", angle_cap=True, past_max="prior", mscale="yarn")
    trained_like(clex.get_clex_rotary(model))
    model.save_pretrained(tmp_path)
    back = clex.load_model(tmp_path)
    a, b = clex.get_clex_rotary(model), clex.get_clex_rotary(back)
    assert (b.config.prior, b.config.angle_cap, b.config.past_max, b.config.mscale) == ("yarn", True, "prior", "yarn")
    assert torch.equal(a.inv_freq_at(5.0), b.inv_freq_at(5.0))


def _power(p):
    return {k: k**p / sum(j**p for j in range(1, 5)) for k in range(1, 5)}


@pytest.mark.parametrize(
    "name, probs",
    [
        ("integer-linear", _power(1)),  # P(t) = t / Σj
        ("integer-quadratic", _power(2)),  # P(t) = t² / Σj²
        ("integer-mixed", {k: 0.5 / 4 + 0.5 * _power(2)[k] for k in range(1, 5)}),  # ½ uniform + ½ quadratic
    ],
)
def test_weighted_integer_t_draws_each_t_with_its_probability(name, probs):
    from collections import Counter

    from clex.core.policies import T_SAMPLERS, step_generator

    draws = Counter(T_SAMPLERS[name](step_generator(0, k), 4.0) for k in range(20000))
    assert set(draws) == {1.0, 2.0, 3.0, 4.0}
    for t, n in draws.items():
        assert abs(n / 20000 - probs[int(t)]) < 0.012


@pytest.mark.parametrize("name, power", [("integer-quadratic-even", 2), ("integer-cubic-even", 3)])
def test_even_t_sequences_give_every_t_its_share_of_every_prefix_whatever_the_seed(name, power):
    from collections import Counter

    from clex.core.policies import T_SAMPLERS, T_SEQUENCES, step_generator

    weights = {k: k**power for k in range(1, 17)}
    probs = {k: w / sum(weights.values()) for k, w in weights.items()}
    for seed in range(4):
        ts = [T_SEQUENCES[name](k, seed, 16.0) for k in range(400)]
        for n in (50, 200, 400):
            counts = Counter(ts[:n])
            assert all(abs(counts[float(k)] - n * p) < 2 for k, p in probs.items())
    iid = {
        seed: Counter(T_SAMPLERS["integer-quadratic"](step_generator(seed, k), 16.0) for k in range(200))
        for seed in range(4)
    }
    assert max(c[16.0] for c in iid.values()) - min(c[16.0] for c in iid.values()) > 2  # i.i.d. draws: seed luck


def test_an_even_sequence_drives_the_rotary_from_its_draw_counter():
    from clex.core.policies import T_SEQUENCES

    rotary = clex.CLEXRotaryEmbedding(
        clex.CLEXConfig(max_factor=16, train_t="integer-quadratic-even", seed=3),
        torch.ones(4),
        original_length=8,
        rope_theta=1e4,
    )
    rotary.draws = 17
    t, _ = rotary.draw(8)
    assert t == T_SEQUENCES["integer-quadratic-even"](17, 3, 16.0) and rotary.draws == 18
