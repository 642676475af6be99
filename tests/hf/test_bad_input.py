"""Bad input gets a clear ValueError naming the field, the value and what is allowed: never silence."""

import json
import math

import pytest
import torch
from conftest import tiny_model

import clex

DID_YOU_MEAN = r"has no field 'maxfactor' \(did you mean 'max_factor'\?\); valid fields: act, "


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clex_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clex")
    clex.apply_clex(tiny_model("llama"), max_factor=4).save_pretrained(path)
    return path


def test_apply_clex_refuses_unknown_keys_and_bad_arguments():
    with pytest.raises(ValueError, match=DID_YOU_MEAN):
        clex.apply_clex(tiny_model("llama"), {"maxfactor": 4})
    with pytest.raises(ValueError, match=DID_YOU_MEAN):
        clex.apply_clex(tiny_model("llama"), maxfactor=4)
    with pytest.raises(ValueError, match="exact_cache must be True or False, got 'yes'"):
        clex.apply_clex(tiny_model("llama"), exact_cache="yes")
    with pytest.raises(ValueError, match="config must be a CLEXConfig, a dict or None, got list"):
        clex.apply_clex(tiny_model("llama"), [("max_factor", 4)])


def test_load_model_refuses_unknown_keys_before_loading(plain_folder, clex_folder):
    for folder in (plain_folder, clex_folder):
        with pytest.raises(ValueError, match=DID_YOU_MEAN):
            clex.load_model(folder, clex={"maxfactor": 4})
        with pytest.raises(ValueError, match="load_model .*" + DID_YOU_MEAN):
            clex.load_model(folder, maxfactor=4)
    with pytest.raises(ValueError, match="load_model's clex must be a CLEXConfig, a dict or None, got int"):
        clex.load_model(plain_folder, clex=4)


def test_load_model_dtype_and_device_are_checked(plain_folder):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16 .*got 'foo'"):
        clex.load_model(plain_folder, dtype="foo")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16 .*got torch.int64"):
        clex.load_model(plain_folder, dtype=torch.int64)
    with pytest.raises(
        ValueError, match=r"load_model's device must be one of cpu, cuda, cuda:N \(N a GPU index\), mps, got 'foo'"
    ):
        clex.load_model(plain_folder, device="foo")
    assert next(clex.load_model(plain_folder, dtype="bfloat16").parameters()).dtype == torch.bfloat16


def edit_config(folder, edit):
    raw = json.loads((folder / "config.json").read_text())
    edit(raw)
    (folder / "config.json").write_text(json.dumps(raw))


def test_saved_rope_parameters_with_an_unknown_key_are_refused(tmp_path):
    clex.apply_clex(tiny_model("llama"), max_factor=4).save_pretrained(tmp_path)
    assert clex.get_clex_rotary(clex.load_model(tmp_path)).config.max_factor == 4  # rope_theta & co load
    edit_config(tmp_path, lambda raw: raw["rope_parameters"].update(maxfactor=8))
    with pytest.raises(
        ValueError, match=r"rope_parameters of type 'clex' has no field 'maxfactor' \(did you mean 'max_factor'\?\)"
    ):
        clex.load_model(tmp_path)


def test_the_authors_layout_maps_its_keys_and_refuses_the_rest(tmp_path):
    from test_checkpoint import write_official

    write_official(tiny_model("llama"), tmp_path)
    assert clex.get_clex_rotary(clex.load_model(tmp_path)).config.time_dt == 0.01  # type, factor: mapped
    edit_config(tmp_path, lambda raw: raw["rope_scaling"].update(maxfactor=8))
    with pytest.raises(
        ValueError, match=r"the authors' rope_scaling has no field 'maxfactor' \(did you mean 'max_factor'\?\)"
    ):
        clex.load_model(tmp_path)
    edit_config(tmp_path, lambda raw: raw["rope_scaling"].pop("maxfactor") and raw["rope_scaling"].update(factor=4))
    with pytest.raises(ValueError, match=r"rope_scaling.factor must be 1 \(CLEX reads max_factor, not factor\), got 4"):
        clex.load_model(tmp_path)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file: ") as e:
        clex.load_model(tmp_path)
    assert "\n" not in str(e.value)


def test_a_folder_without_config_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.* has no config.json"):
        clex.load_model(tmp_path)


def evil_pickle(file, marker):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    file.write_bytes(pickle.dumps({"model.embed_tokens.weight": Evil()}))


def plant(folder, marker):
    (folder / "clex_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    evil_pickle(folder / "pytorch_model.bin", marker)
    edit_config(folder, lambda raw: raw.update(auto_map={"AutoModelForCausalLM": "clex_model.CLEXForCausalLM"}))


@pytest.mark.parametrize("kind", ["plain", "clex"])
def test_load_model_runs_no_code_of_the_folder(tmp_path, kind):
    model = tiny_model("llama")
    if kind == "clex":
        clex.apply_clex(model, max_factor=4)
    model.save_pretrained(tmp_path)
    marker = tmp_path.parent / f"marker-{kind}"
    plant(tmp_path, marker)
    loaded = clex.load_model(tmp_path, max_factor=4)
    assert not marker.exists()
    assert isinstance(clex.get_clex_rotary(loaded), clex.CLEXRotaryEmbedding)


def test_a_pickle_only_folder_is_refused_without_running_it(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path.parent / "marker-bin"
    plant(tmp_path, marker)
    with pytest.raises(Exception):  # noqa: B017 (the message is not pinned yet)
        clex.load_model(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("t", [math.nan, math.inf, "2", True, 0.5, None])
def test_inv_freq_at_needs_a_finite_number_at_least_one(t):
    rotary = clex.CLEXRotaryEmbedding(clex.CLEXConfig(), torch.ones(4), original_length=16, rope_theta=1e4)
    with pytest.raises(ValueError, match=r"t must be a finite number >= 1, got "):
        rotary.inv_freq_at(t)


def test_rotary_frequencies_and_table_refuse_nan():
    rotary = clex.CLEXRotaryEmbedding(clex.CLEXConfig(), torch.ones(4), original_length=16, rope_theta=1e4)
    with pytest.raises(ValueError, match="t must be a finite number >= 1, got nan"):
        rotary.frequencies(torch.tensor([2.0, math.nan], dtype=torch.float64))
    with pytest.raises(ValueError, match="t must be a finite number >= 1, got nan"):
        rotary.table(top=math.nan)
    with pytest.raises(ValueError, match="rope_theta must be a finite number > 1, got nan"):
        clex.CLEXRotaryEmbedding(
            clex.CLEXConfig(prior_base=None), torch.ones(4), original_length=16, rope_theta=math.nan
        )
    with pytest.raises(ValueError, match="original_length must be an integer >= 1, got 0"):
        clex.CLEXRotaryEmbedding(clex.CLEXConfig(), torch.ones(4), original_length=0, rope_theta=1e4)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(times=[2.0, math.nan]), r"times must be finite, sorted and >= 1, got \[2.0, nan\]"),
        (dict(times=[2.0, math.inf]), r"times must be finite, sorted and >= 1"),
        (dict(times=[2.0], rtol=math.nan), r"rtol and atol must be finite numbers > 0, got nan and "),
        (dict(times=[2.0], time_dt=math.inf), r"time_dt and log_dt must be > 0 and finite"),
    ],
)
def test_the_solver_refuses_nan(kw, message):
    from clex.core.solve import fine_grid, solve_log_freqs

    up, down = torch.zeros(2, 4), torch.zeros(4, 2)
    kw = {"act": "tanh", "prior_base": 1e4, **kw}
    with pytest.raises(ValueError, match=message):
        solve_log_freqs(torch.ones(2), up, down, kw.pop("times"), **kw)
    with pytest.raises(ValueError, match=r"times must be finite, sorted and >= 1"):
        fine_grid([2.0, math.nan], 0.5)


def test_solve_log_freqs_defaults_are_clexconfigs():
    import inspect

    from clex.core.solve import solve_log_freqs

    params = inspect.signature(solve_log_freqs).parameters
    defaults = clex.CLEXConfig()
    for name in ("log_dt", "formulation", "rtol", "atol"):
        assert params[name].default == getattr(defaults, name), name
    assert params["method"].default is None  # CLEXConfig's for the residual formulation, rk4 for the reference
    up, down = torch.zeros(2, 4), torch.zeros(4, 2)
    x = solve_log_freqs(torch.ones(2), up, down, [2.0], act="tanh", prior_base=1e4)
    y = solve_log_freqs(torch.ones(2), up, down, [2.0], act="tanh", prior_base=1e4, method=defaults.method)
    assert torch.equal(x, y)


def test_apply_clex_on_something_else_than_a_model_says_so():
    for thing in (None, "runs/clex", 3):
        with pytest.raises(ValueError, match=r"apply_clex's model must be a transformers model .*got "):
            clex.apply_clex(thing)


def test_a_pickled_bin_folder_is_refused_naming_the_file_and_nothing_runs(tmp_path, capsys):
    """Only a pytorch_model.bin whose pickle would call a function: refused by torch's weights_only loader, in one
    line naming the file (torch's own message is a dozen lines naming none)."""
    import os

    from clex.cli import main

    model = tiny_model("llama", vocab_size=257)
    model.config.save_pretrained(tmp_path)

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'MARKER'}",))

    torch.save({"model.embed_tokens.weight": Planted()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin is not a weights file of plain tensors") as e:
        clex.load_model(tmp_path)
    assert "\n" not in str(e.value) and "posix.system" in str(e.value) and not (tmp_path / "MARKER").exists()
    from clex.data.tokenizer import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path)
    assert main(["eval", "ppl", "--models", str(tmp_path), "--lengths", "20", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("clex: error:")]
    assert len(lines) == 1 and "pytorch_model.bin" in lines[0] and not (tmp_path / "MARKER").exists()
    # a .bin of plain tensors still loads
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert clex.load_model(tmp_path) is not None


def test_the_warning_past_max_factor_says_what_past_max_does():
    import warnings

    for past_max, words in (("prior", "following the prior's shape"), ("ode", "integrating the ODE further")):
        model = clex.apply_clex(tiny_model("llama"), max_factor=2, past_max=past_max).eval()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model(torch.arange(60)[None])  # t = 60 / 16 > max_factor 2
        text = " ".join(str(w.message) for w in caught if "max_factor" in str(w.message))
        assert words in text and f"past_max='{past_max}'" in text, text
