"""Per-request scaling (no vLLM needed): each request's t, θ(t) and scales are clex's own at a fixed t, YaRN's
and dynamic NTK's at factor t; what cannot be served per request is refused by name."""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

import clex
from clex.hf.generation import fixed_t, fixed_t_for
from clex.serve.scaling import CLEXScaling, DynamicNTKScaling, YaRNScaling, scaling_for

FAR = dict(prior="yarn", log_scale=True, angle_cap=True, past_max="prior", train_t="integer-quadratic", max_factor=16)


@pytest.fixture(scope="module")
def clex_folder(tmp_path_factory):
    model = clex.apply_clex(tiny_model("llama"), exact_cache=False, **FAR)
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    folder = tmp_path_factory.mktemp("clex")
    model.save_pretrained(folder)
    return model, folder


def test_clex_requests_get_what_generate_fixed_t_pins(clex_folder):
    model, folder = clex_folder
    scaling = scaling_for(json.loads((folder / "config.json").read_text()))
    assert isinstance(scaling, CLEXScaling) and scaling.scales_queries and not scaling.scales_cos_sin
    rotary = clex.get_clex_rotary(model)
    assert torch.equal(scaling.inv_freq, rotary.inv_freq)  # θ⁰ bit for bit, from the config alone
    assert scaling.max_length == 16 * 16
    scaling.load_ode(load_file(str(folder / "model.safetensors")))
    for length in (5, 16, 17, 40, 123, 256):
        t = scaling.t_for(length)
        assert t == fixed_t_for(model, length, 0)
        with fixed_t(model, t, log_scale_length=length), torch.no_grad():
            model(torch.zeros(1, 3, dtype=torch.long))
        assert torch.equal(scaling.theta(t), rotary.last_inv_freq[0])
        assert scaling.query_scale(length, t) == rotary.query_scale
    assert scaling.theta(1.0).equal(rotary.inv_freq) and scaling.query_scale(16, 1.0) == 1.0


def test_clex_theta_needs_the_ode_weights(clex_folder):
    _, folder = clex_folder
    scaling = scaling_for(json.loads((folder / "config.json").read_text()))
    with pytest.raises(RuntimeError, match="ODE weights were not loaded"):
        scaling.theta(2.0)
    with pytest.raises(ValueError, match="expected one `ode_up_proj` tensor"):
        scaling.load_ode({})


def test_cache_keys_name_t_and_the_query_scale(clex_folder):
    _, folder = clex_folder
    scaling = scaling_for(json.loads((folder / "config.json").read_text()))
    assert scaling.cache_key(3) == scaling.cache_key(16)  # both t = 1, no log scale below L
    assert scaling.cache_key(33) != scaling.cache_key(34)  # same t = 2.125, different log-scale length
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"].update(log_scale=False, t_resolution=4)  # t on a grid of L/4 = 4 tokens
    plain = scaling_for(raw)
    assert plain.cache_key(33) == plain.cache_key(36) != plain.cache_key(37)


def yarn_config(factor=4.0, **more):
    from transformers import LlamaConfig

    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    return LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_parameters={**params, **more}
    )


@pytest.mark.parametrize("more", [{}, {"beta_fast": 16, "beta_slow": 2}, {"mscale": 0.8, "mscale_all_dim": 0.5}])
def test_yarn_at_factor_t_is_transformers_yarn_and_plain_rope_at_t_1(more):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = scaling_for(yarn_config(**more).to_dict())
    assert isinstance(scaling, YaRNScaling) and scaling.max_length == 64 and scaling.original_length == 16
    for length in (1, 16, 17, 30, 64):
        t = scaling.t_for(length)
        assert t == max(1.0, -(-length * 16 // 16) / 16)
        if t > 1:
            want, attention = ROPE_INIT_FUNCTIONS["yarn"](yarn_config(factor=t, **more), "cpu")
            assert torch.allclose(scaling.theta(t), want, rtol=0, atol=0)
            assert scaling.cos_sin_scale(t) == pytest.approx(attention, rel=1e-15)
    plain = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4)).inv_freq
    assert torch.equal(scaling.theta(1.0), plain) and scaling.cos_sin_scale(1.0) == 1.0


def test_dynamic_ntk_at_t_is_transformers_dynamic_at_t_times_L():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    )
    scaling = scaling_for(config.to_dict())
    assert isinstance(scaling, DynamicNTKScaling)
    for t in (1.0, 1.5, 2.0, 4.0):
        want, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=int(t * 16))
        assert torch.equal(scaling.theta(t), want)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rope_type": "default"}, "rope_type 'default' cannot be served per request.*nothing to scale"),
        ({"rope_type": "linear", "factor": 2.0}, "rope_type 'linear' cannot be served per request"),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "rope_type 'llama3'",
        ),
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.2},
            "attention_factor=1.2 is one fixed temperature",
        ),
        ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 16}, "factor must be a number >= 1"),
    ],
)
def test_what_cannot_be_served_per_request_is_refused_by_name(params, message):
    raw = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64, "rope_parameters": params}
    with pytest.raises(ValueError, match=message):
        scaling_for(raw)


def test_a_learned_temperature_is_served_in_each_lengths_query_scale(tmp_path):
    model = clex.apply_clex(tiny_model("llama"), exact_cache=False, **{**FAR, "mscale": "learned"})
    rotary = clex.get_clex_rotary(model)
    with torch.no_grad():
        rotary.temperature.copy_(torch.tensor([0.3, -0.1]))
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    untrained = scaling_for(raw)  # τ = 1 until the weights are in
    scaling = scaling_for(raw)
    scaling.load_ode(load_file(str(tmp_path / "model.safetensors")))
    for length in (40, 123, 256):  # past L = 16: t > 1
        t = scaling.t_for(length)
        with fixed_t(model, t, log_scale_length=length), torch.no_grad():
            model(torch.zeros(1, 3, dtype=torch.long))
        assert scaling.query_scale(length, t) == rotary.query_scale
        assert scaling.query_scale(length, t) != untrained.query_scale(length, t)  # τ(t) != 1 past t = 1
    assert scaling.cache_key(40) != scaling.cache_key(41)  # t and the query scale in the prefix-cache key


def test_a_folder_and_its_config_must_agree_on_a_learned_temperature(clex_folder, tmp_path):
    _, folder = clex_folder  # mscale "none"
    scaling = scaling_for(json.loads((folder / "config.json").read_text()))
    weights = {**load_file(str(folder / "model.safetensors")), "model.rotary_emb.temperature": torch.zeros(2)}
    with pytest.raises(ValueError, match="holds a learned temperature, but its config says mscale != 'learned'"):
        scaling.load_ode(weights)


def test_t_conditioned_adapters_are_refused_in_one_line(tmp_path):
    clex.apply_clex(tiny_model("llama"), exact_cache=False, adapter_rank=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"t-conditioned adapters \(adapter_rank=2\) cannot be served per request"):
        scaling_for(json.loads((tmp_path / "config.json").read_text()))
