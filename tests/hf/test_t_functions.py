"""CLEX's learned functions of t: the learned attention temperature (mscale="learned") and the t-conditioned
adapters (adapter_rank > 0). Identities at initialisation, the training path against the inference path, the key
cache (exact with query/output adapters, refused with key/value ones unless t is fixed), export and reloading."""

import json
import math

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import clex
from clex.hf import generation
from clex.hf.export import export
from clex.hf.generation import fixed_t
from clex.hf.methods import prepare_model
from clex.hf.t_adapter import TAdapter, fixed_t_state_dict, writes_cache

L, N = 16, 64
FAR = {"prior": "yarn", "log_scale": True, "angle_cap": True, "past_max": "prior", "train_t": "integer-quadratic"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids(n, seed=None):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed or n))


def adapters(model):
    return [m for m in model.modules() if isinstance(m, TAdapter)]


def trained(layers=2, exact_cache=False, **options):
    """A CLEX model whose ODE, temperature and adapters hold non-zero (trained-looking) values."""
    model = clex.apply_clex(
        tiny_model("llama", num_hidden_layers=layers), max_factor=8, exact_cache=exact_cache, **options
    )
    gen = torch.Generator().manual_seed(5)
    rotary = clex.get_clex_rotary(model)
    with torch.no_grad():
        rotary.dynamics.ode_down_proj.normal_(0, 0.2, generator=gen)
        if rotary.temperature is not None:
            rotary.temperature.copy_(torch.tensor([0.4, -0.15]))
        for a in adapters(model):
            a.up.normal_(0, 0.3, generator=gen)
            a.gate_power.normal_(0, 0.4, generator=gen)
    model.generation_config.eos_token_id = None
    return model


def test_untrained_functions_of_t_leave_the_model_as_it_was():
    plain = clex.apply_clex(tiny_model("llama"), max_factor=8, **FAR)
    both = clex.apply_clex(tiny_model("llama"), max_factor=8, **FAR, mscale="learned", adapter_rank=4)
    assert len(adapters(both)) == 4  # q_proj and o_proj of two layers
    with torch.no_grad():
        for n in (12, 40, 200):  # below L, past L, past max_factor
            assert torch.equal(both(ids(n)).logits, plain(ids(n)).logits)


def test_the_temperature_is_one_at_t_1_held_past_max_factor_and_in_the_query_scale():
    rotary = clex.get_clex_rotary(trained(mscale="learned", log_scale=True))
    w1, w2 = 0.4, -0.15
    assert float(rotary.temperature_at(1.0)) == 1.0
    u = math.log(3) / math.log(8)
    assert float(rotary.temperature_at(3.0)) == pytest.approx(math.exp(w1 * u + w2 * u * u))
    assert float(rotary.temperature_at(20.0)) == pytest.approx(math.exp(w1 + w2))  # held at max_factor
    assert rotary.query_scale_for(48.0, 3.0) == pytest.approx(
        math.log(48) / math.log(L) * math.exp(w1 * u + w2 * u * u)
    )
    assert rotary.query_scale_for(48.0, 3.0, temperature=False) == pytest.approx(math.log(48) / math.log(L))


@pytest.mark.parametrize("targets", [["q_proj", "o_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]])
def test_a_training_forward_equals_the_inference_forward_at_its_t_with_gradients_to_every_function(targets):
    # training: sqrt(τ) on cos and sin; inference: τ in each attention's scaling. Same logits, at the same t and
    # positions (the rotary's draw pinned), and in training every learned function of t gets a gradient.
    model = trained(mscale="learned", adapter_rank=3, adapter_targets=targets, **FAR)
    rotary = clex.get_clex_rotary(model)
    x = ids(40)
    rotary.draw = lambda n: (2.5, torch.arange(n, dtype=torch.float32))  # t = 40 / 16
    model.train()
    got = model(x).logits
    got.float().pow(2).mean().backward()
    model.eval()
    with torch.no_grad(), fixed_t(model, 2.5, log_scale_length=40):
        want = model(x).logits
    assert (got - want).abs().max() <= 1e-5
    assert rotary.temperature.grad.abs().min() > 0
    for a in adapters(model):
        assert a.gate_power.grad.abs().sum() > 0 and a.up.grad.abs().sum() > 0 and a.down.grad.abs().sum() > 0


def test_at_t_1_the_adapters_add_nothing_and_their_gradients_are_finite():
    model = trained(adapter_rank=3, **FAR)
    rotary = clex.get_clex_rotary(model)
    x = ids(12)
    with torch.no_grad():
        with_adapters = model(x).logits
        for a in adapters(model):
            a.up.zero_()
        assert torch.equal(model(x).logits, with_adapters)  # length 12 <= L: t = 1, every gate 0
    rotary.draw = lambda n: (1.0, torch.arange(n, dtype=torch.float32))
    model.train()
    model(x).logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for a in adapters(model) for p in a.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "options", [{"mscale": "learned"}, {"adapter_rank": 3}, {"mscale": "learned", "adapter_rank": 3}]
)
def test_the_export_is_the_model_at_fixed_t_past_L(tmp_path, options):
    model = trained(**FAR, **options)
    export(model, tmp_path / "out", length=N)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        long = ids(40)
        with fixed_t(model, N / L, log_scale_length=N):
            want = model(long).logits
        assert (stock(long).logits - want).abs().max() <= 1e-5
        assert (stock(ids(30)).logits - model(ids(30)).logits).abs().max() > 1e-4  # the model's own t differs
    note = json.loads((tmp_path / "out" / "clex_export.json").read_text())
    assert ("adapters" in note["below_L"]) == ("adapter_rank" in options)
    assert not any("clex_adapter" in k or "temperature" in k for k in fixed_t_state_dict(model, 2.0))


def test_the_gguf_tensors_hold_the_adapters_merged_at_N(tmp_path):
    pytest.importorskip("gguf")
    from clex.hf.to_gguf import _gguf_tensors

    model = trained(adapter_rank=3, **FAR)
    tensors = _gguf_tensors(model, model.config, N / L)
    a = model.model.layers[1].self_attn.o_proj
    want = (a.weight.float() + a.clex_adapter.weight_at(N / L, 8)).detach().numpy()
    assert abs(tensors["blk.1.attn_output.weight"] - want).max() == 0


def test_save_and_load_keep_the_functions_of_t_and_refuse_a_folder_without_them(tmp_path):
    from safetensors.torch import load_file, save_file

    model = trained(mscale="learned", adapter_rank=3, **FAR)
    model.save_pretrained(tmp_path / "m")
    loaded = clex.load_model(tmp_path / "m").eval()
    with torch.no_grad():
        for n in (12, 40):
            assert torch.equal(loaded(ids(n)).logits, model(ids(n)).logits)
    file = tmp_path / "m" / "model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if "temperature" not in k}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="`model.rotary_emb.temperature` is missing"):
        clex.load_model(tmp_path / "m")


def test_one_layer_generation_with_query_and_output_adapters_stays_exact_when_t_changes():
    # keys and values do not depend on t: re-rotating the cached keys keeps a one-layer model equal to one full
    # forward at every step, as without adapters (test_generation.py)
    model = trained(layers=1, exact_cache=True, adapter_rank=3, mscale="learned", t_resolution=2)
    assert not writes_cache(clex.get_clex_rotary(model).config.adapter_targets)
    prompt = torch.tensor([[5, 9, 13, 7, 8, 21, 30, 11, 12, 40]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=40, return_dict_in_generate=True, output_logits=True)
        rows = out.sequences[0].tolist()
        full = torch.stack([model(torch.tensor([rows[: 10 + k]])).logits[0, -1] for k in range(40)])
    assert clex.get_clex_rotary(model)._clex_exact_cache.rerotations >= 3
    assert (torch.stack(out.logits)[:, 0] - full).abs().max() <= 1e-4


def test_key_and_value_adapters_refuse_a_change_of_t_and_generate_exactly_at_a_fixed_t():
    model = trained(layers=1, exact_cache=True, adapter_rank=3, adapter_targets=["k_proj", "v_proj"], t_resolution=2)
    prompt = torch.tensor([[5, 9, 13, 7, 8, 21, 30, 11, 12, 40]])
    with pytest.raises(ValueError, match="k_proj, v_proj, which write the key cache"):
        model.generate(prompt, max_new_tokens=20)
    out = generation.generate_fixed_t(
        model, prompt, max_new_tokens=30, return_dict_in_generate=True, output_logits=True
    )
    rows = out.sequences[0].tolist()
    with torch.no_grad(), fixed_t(model, generation.fixed_t_for(model, 10, 30)):
        full = torch.stack([model(torch.tensor([rows[: 10 + k]])).logits[0, -1] for k in range(30)])
    assert (torch.stack(out.logits)[:, 0] - full).abs().max() <= 1e-4


def test_bad_settings_are_refused_with_the_field_and_the_allowed_values():
    with pytest.raises(ValueError, match="CLEXConfig.adapter_rank must be an integer >= 0"):
        clex.CLEXConfig(adapter_rank=-1)
    with pytest.raises(ValueError, match="CLEXConfig.adapter_targets must be a non-empty list"):
        clex.CLEXConfig(adapter_targets="q_proj")
    with pytest.raises(ValueError, match="CLEXConfig.mscale must be one of 'none', 'yarn', 'learned'"):
        clex.CLEXConfig(mscale="warm")
    with pytest.raises(ValueError, match=r"adapter_targets names \['qq_proj'\], which this model has no linear"):
        clex.apply_clex(tiny_model("llama"), adapter_rank=2, adapter_targets=["qq_proj"])
    model = trained(adapter_rank=2)
    with pytest.raises(ValueError, match="cannot change to 4"):
        prepare_model(model, "clex", factor=8, clex={"adapter_rank": 4})
    with pytest.raises(ValueError, match="a learned temperature has its own weights"):
        prepare_model(model, "clex", factor=8, clex={"mscale": "learned"})


def test_a_learned_temperature_trains_with_the_full_gradient_whatever_the_rotation_backend():
    # the fused rotation's backward keeps only the angle's part of the cos/sin gradient: apply_clex's "auto" must
    # leave it off for mscale="learned" (with it on, the temperature's gradient was ~1e-12: rounding, not signal)
    grads = {}
    for fused in ("off", "auto"):
        model = clex.apply_clex(tiny_model("llama"), max_factor=8, mscale="learned", fused_rotation=fused, **FAR)
        rotary = clex.get_clex_rotary(model)
        with torch.no_grad():
            rotary.temperature.copy_(torch.tensor([0.4, -0.15]))
        rotary.draw = lambda n: (2.5, torch.arange(n, dtype=torch.float32))
        model.train()
        x = ids(40)
        model(x, labels=x).loss.backward()
        grads[fused] = rotary.temperature.grad
    assert grads["off"].abs().min() > 1e-6
    assert torch.allclose(grads["auto"], grads["off"], rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="fused_rotation='torch' cannot train mscale='learned'"):
        clex.apply_clex(tiny_model("llama"), mscale="learned", fused_rotation="torch")
