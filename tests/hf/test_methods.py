"""The method registry: each baseline is transformers' own rope type with the right parameters; CLEX and PoSE."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import clex
from clex.data.presets import build_model
from clex.hf.lookup import find_rotary
from clex.hf.methods import (
    HF_ROPE_TYPES,
    METHODS,
    original_length_of,
    pose_position_ids,
    prepare_model,
)

L = 32  # micro-llama


def micro(seed=0):
    return build_model("micro-llama", seed=seed)[0].eval()


def rotary(model):
    return find_rotary(model)[1]


def ids(n, seed=0):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


def test_registry_names_and_unknown_method():
    assert set(METHODS) == {"clex", "pi", "ntk", "dynamic-ntk", "yarn", "longrope", "llama3", "none"}
    with pytest.raises(ValueError, match="unknown method 'rerope'.*clex, pi, ntk"):
        prepare_model(micro(), "rerope", factor=4)
    with pytest.raises(ValueError, match="factor must be a number >= 1"):
        prepare_model(micro(), "pi", factor=0.5)


@pytest.mark.parametrize("method", sorted(HF_ROPE_TYPES))
def test_baselines_are_transformers_own_rotary(method, tmp_path):
    """The model's own rotary class with transformers' rope type; L still readable; saved and re-loaded by
    stock transformers to the same logits beyond L."""
    model = prepare_model(micro(), method, factor=4)
    rot = rotary(model)
    assert type(rot).__name__ == "LlamaRotaryEmbedding" and rot.rope_type == HF_ROPE_TYPES[method]
    assert model.config.rope_parameters["factor"] == 4 and original_length_of(model) == L
    x = ids(3 * L)
    with torch.no_grad():
        logits = model(x).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, logits)


def test_frequencies_of_each_baseline():
    plain = rotary(micro()).inv_freq
    d = 2 * plain.numel()
    torch.testing.assert_close(rotary(prepare_model(micro(), "pi", factor=4)).inv_freq, plain / 4)
    llama3 = rotary(prepare_model(micro(), "llama3", factor=4)).inv_freq
    assert llama3[0] == plain[0] and torch.isclose(llama3[-1], plain[-1] / 4)  # high freqs kept, low ones / factor
    yarn = rotary(prepare_model(micro(), "yarn", factor=4))
    assert yarn.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)  # YaRN's temperature
    longrope = prepare_model(micro(), "longrope", factor=4)
    assert longrope.config.rope_parameters["long_factor"][-1] == pytest.approx(4.0)
    assert len(longrope.config.rope_parameters["long_factor"]) == d // 2
    # static NTK = rope_theta * s^(d/(d-2)): exactly what an untrained CLEX gives at 2t-1 = s
    ntk = rotary(prepare_model(micro(), "ntk", factor=3)).inv_freq
    untrained = clex.get_clex_rotary(prepare_model(micro(), "clex", factor=4)).inv_freq_at(2.0)
    torch.testing.assert_close(ntk, untrained.detach(), rtol=1e-5, atol=0)


def test_dynamic_ntk_and_none_leave_short_sequences_alone():
    x = ids(L)
    with torch.no_grad():
        base = micro()(x).logits
        torch.testing.assert_close(prepare_model(micro(), "dynamic-ntk", factor=4)(x).logits, base)
        torch.testing.assert_close(prepare_model(micro(), "none", factor=4)(x).logits, base)
        long = ids(2 * L)
        assert not torch.allclose(prepare_model(micro(), "dynamic-ntk", factor=4)(long).logits, micro()(long).logits)


def test_clex_method_and_pose():
    model = prepare_model(micro(), "clex", factor=8, clex={"act": "silu", "seed": 5}, pose=True)
    cfg = clex.get_clex_rotary(model).config
    assert (cfg.max_factor, cfg.act, cfg.seed, cfg.position_sampler) == (8, "silu", 5, "pose")
    # a model that has CLEX keeps its ODE weights and takes new training fields
    dyn = clex.get_clex_rotary(model).dynamics
    again = prepare_model(model, "clex", factor=8, clex={"train_t": "uniform"})
    assert clex.get_clex_rotary(again).dynamics is dyn and clex.get_clex_rotary(again).config.train_t == "uniform"
    with pytest.raises(ValueError, match="param_factor"):
        prepare_model(model, "clex", factor=8, clex={"param_factor": 2})
    with pytest.raises(ValueError, match="plain-RoPE.*CLEX"):
        prepare_model(model, "yarn", factor=8)
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        prepare_model(prepare_model(micro(), "pi", factor=2), "yarn", factor=4)
    with pytest.raises(ValueError, match="clex fields"):
        prepare_model(micro(), "pi", factor=4, clex={"act": "silu"})


def test_pose_position_ids():
    pos = pose_position_ids(3, 16, 64, torch.Generator().manual_seed(0))
    assert pos.shape == (3, 16) and pos.dtype == torch.long
    assert (pos[:, 0] == 0).all() and (pos.diff(dim=1) >= 1).all() and (pos < 64).all()
    assert (pos.diff(dim=1) > 1).sum() >= 1  # at least one row skips
    assert torch.equal(pos, pose_position_ids(3, 16, 64, torch.Generator().manual_seed(0)))
    assert torch.equal(pose_position_ids(2, 16, 16, torch.Generator()), torch.arange(16).expand(2, -1))


def test_aliases_and_one_meaning_per_name():
    from clex.hf.methods import ALIASES, method_name

    assert ALIASES == {"linear": "pi", "dynamic": "dynamic-ntk"}
    assert [method_name(n) for n in ("PI", "linear", "dynamic", "ntk", "Dynamic-NTK")] == [
        "pi",
        "pi",
        "dynamic-ntk",
        "ntk",
        "dynamic-ntk",
    ]
    with pytest.raises(ValueError, match=r"unknown method 'rerope'; methods: clex, pi, ntk.*aliases: linear \(= pi\)"):
        method_name("rerope")
    x = ids(2 * L)
    with torch.no_grad():  # "dynamic" is dynamic NTK; "ntk" is static NTK, not the same model
        dynamic = prepare_model(micro(), "dynamic", factor=4)(x).logits
        torch.testing.assert_close(dynamic, prepare_model(micro(), "dynamic-ntk", factor=4)(x).logits)
        assert not torch.allclose(dynamic, prepare_model(micro(), "ntk", factor=4)(x).logits)
    assert rotary(prepare_model(micro(), "ntk", factor=4)).rope_type == "default"


def test_unknown_rope_keys_are_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"'yarn'.*unknown rope parameter\(s\) \['beta_fats'\]; valid: .*beta_fast"):
        prepare_model(micro(), "yarn", factor=4, rope={"beta_fats": 16})
    with pytest.raises(ValueError, match=r"'ntk'.*\['factor2'\]; valid: partial_rotary_factor, rope_theta"):
        prepare_model(micro(), "ntk", factor=4, rope={"factor2": 1})
    model = micro()
    with pytest.raises(ValueError, match=r"method 'yarn' with rope parameters \{'beta_fast': 'fast'\}"):
        prepare_model(model, "yarn", factor=4, rope={"beta_fast": "fast"})  # transformers fails; config restored
    assert model.config.rope_parameters.get("rope_type", "default") == "default"
    yarn = prepare_model(micro(), "yarn", factor=4, rope={"beta_fast": 16})
    assert yarn.config.rope_parameters["beta_fast"] == 16
