"""Save/load round trips, the authors' checkpoint layout, and what stock transformers does with ours."""

import json

import pytest
import torch
from conftest import tiny_model

import clex
from clex.hf.lookup import find_rotary


def ids(n, batch=2):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gpt_neox"])
def test_save_then_load_gives_bitwise_identical_logits(tmp_path, family):
    model = clex.apply_clex(tiny_model(family), max_factor=4, act="silu", inference_t="integer")
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.05)
        expected = model(ids(50)).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == "clex" and saved["max_factor"] == 4 and saved["act"] == "silu"
    loaded = clex.load_model(tmp_path).eval()
    assert clex.get_clex_rotary(loaded).config == clex.get_clex_rotary(model).config
    with torch.no_grad():
        assert torch.equal(loaded(ids(50)).logits, expected)


def test_stock_transformers_refuses_plain_rope_or_loads_through_clex(tmp_path):
    from transformers import AutoModelForCausalLM

    model = clex.apply_clex(tiny_model("llama"), max_factor=4)
    model.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="clex"):  # never silently plain RoPE
        AutoModelForCausalLM.from_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert isinstance(clex.get_clex_rotary(again), clex.CLEXRotaryEmbedding)
    with torch.no_grad():
        assert torch.equal(again(ids(40)).logits, model(ids(40)).logits)


def test_load_overrides_and_plain_folders(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    plain = clex.load_model(tmp_path)
    with pytest.raises(ValueError):
        clex.get_clex_rotary(plain)
    fresh = clex.load_model(tmp_path, max_factor=8)
    assert clex.get_clex_rotary(fresh).config.max_factor == 8


def test_missing_folder_and_missing_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nowhere"):
        clex.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        clex.load_model(tmp_path)


def write_official(model, path, *, act="silu", max_factor=4, param_factor=1, log_scale=True, seed=0):
    """A checkpoint in the layout of the authors' release: their config keys and state-dict names."""
    config = model.config.to_dict()
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = {
        "type": "clex",
        "max_factor": max_factor,
        "param_factor": param_factor,
        "act": act,
        "time_dt": 0.01,
        "factor": 1,
    }
    config["log_scale"] = log_scale
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_llama_clex.LlamaForCausalLM"}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    inner = 2 * find_rotary(model)[1].inv_freq.numel()
    g = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in model.state_dict().items() if "rotary" not in k}
    state["model.clex_layer.inv_freq"] = find_rotary(model)[1].inv_freq
    state["model.clex_layer.proj_func.ode_up_proj"] = torch.randn(inner // 2, param_factor * inner, generator=g) * 0.1
    state["model.clex_layer.proj_func.ode_down_proj"] = (
        torch.randn(param_factor * inner, inner // 2, generator=g) * 0.05
    )
    torch.save(state, path / "pytorch_model.bin")
    return state


@pytest.mark.parametrize("family", ["llama", "mixtral", "phi"])
def test_official_checkpoint_layout_loads_into_a_stock_model(tmp_path, family):
    base = tiny_model(family)
    state = write_official(base, tmp_path / "official", param_factor=2 if family == "mixtral" else 1)
    model = clex.load_model(tmp_path / "official").eval()
    rotary = clex.get_clex_rotary(model)
    assert type(model).__name__ == type(base).__name__
    c = rotary.config
    assert (c.max_factor, c.act, c.log_scale, c.inference_t, c.prior_base) == (4, "silu", True, "integer", 1e4)
    assert torch.equal(rotary.dynamics.ode_up_proj, state["model.clex_layer.proj_func.ode_up_proj"])
    assert torch.equal(rotary.dynamics.ode_down_proj, state["model.clex_layer.proj_func.ode_down_proj"])
    # the same as putting CLEX on the stock model by hand with their weights
    clex.apply_clex(base, c)
    with torch.no_grad():
        clex.get_clex_rotary(base).dynamics.ode_up_proj.copy_(state["model.clex_layer.proj_func.ode_up_proj"])
        clex.get_clex_rotary(base).dynamics.ode_down_proj.copy_(state["model.clex_layer.proj_func.ode_down_proj"])
        torch.testing.assert_close(model(ids(40)).logits, base(ids(40)).logits, rtol=0, atol=0)
        assert float(rotary.last_t[0]) == 3.0  # ceil(40/16): the reference's integer t


def test_official_weights_of_the_wrong_shape_are_named(tmp_path):
    base = tiny_model("llama")
    write_official(base, tmp_path, param_factor=2)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"]["param_factor"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`ode_up_proj` has shape \(8, 32\), expected \(8, 16\)"):
        clex.load_model(tmp_path)
