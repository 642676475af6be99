"""Export to stock transformers (rope type longrope): exact against CLEX at fixed t past L, plain up to L."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import clex
import clex.recipes
from clex.hf.export import export
from clex.hf.generation import fixed_t

L, N = 16, 64


def trained(model_overrides=None, **kw):
    model = clex.apply_clex(tiny_model("llama", **(model_overrides or {})), max_factor=8, exact_cache=False, **kw)
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    return model


def ids(n):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(n))


REC, FAR = (dict(clex.recipes.get(name).clex) for name in ("recommended", "far"))  # the recipes' CLEX fields


@pytest.mark.parametrize("options", [{}, REC, FAR], ids=["paper", "rec", "far"])
def test_the_export_is_clex_at_fixed_t_past_L_and_the_plain_model_up_to_L(tmp_path, options):
    model = trained(**options)
    export(model, tmp_path / "out", length=N)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert stock.config.rope_parameters["rope_type"] == "longrope"
    with torch.no_grad():
        long = ids(40)
        with fixed_t(model, N / L, log_scale_length=N):  # log_scale: pinned at N, as the export holds it
            want = model(long).logits
        assert (stock(long).logits - want).abs().max() <= 1e-5
        if not options:  # up to L: the plain model (CLEX's t = 1); with mscale the temperature stays (docstring)
            short = ids(12)
            assert (stock(short).logits - model(short).logits).abs().max() <= 1e-5
            assert (stock(long).logits - model(long).logits).abs().max() > 1e-4  # model's own t = 40/16 differs


def test_the_exported_folder_loads_where_clex_cannot_be_imported(tmp_path):
    export(trained(), tmp_path / "out", length=N)
    raw = (tmp_path / "out" / "config.json").read_text()
    assert "auto_map" not in raw and '"clex"' not in raw and not (tmp_path / "out" / "clex_model.py").exists()
    code = (
        "import sys; sys.modules['clex'] = None\n"  # importing clex now fails
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})\n"
        "print(m.config.rope_parameters['rope_type'], m.config.max_position_embeddings)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["longrope", str(N)]
    note = json.loads((tmp_path / "out" / "clex_export.json").read_text())
    assert note["t"] == N / L and note["below_L"] == "the plain model"


def test_bad_exports_are_refused_with_the_reason(tmp_path):
    model = trained()
    with pytest.raises(ValueError, match="length must be an integer >= L = 16"):
        export(model, tmp_path / "a", length=8)
    with pytest.raises(ValueError, match="format must be one of 'hf', 'gguf', got 'onnx'"):
        export(model, tmp_path / "a", length=N, format="onnx")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="is not empty"):
        export(model, tmp_path / "b", length=N)
    assert (tmp_path / "b" / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="no CLEX rotary module"):
        export(tiny_model("llama"), tmp_path / "c", length=N)


def test_clex_export_on_the_command_line(tmp_path):
    from clex.cli import main

    trained().save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "out"), "--length", str(N)]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.max_position_embeddings == N
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "out"), "--length", str(N)]) == 2  # not empty


def test_the_export_holds_the_theta_of_fixed_t_not_a_separate_solve(tmp_path):
    # head_dim 64: the ODE solved on another t grid (or alone at t) differs enough to show (1e-4 in logits)
    model = trained({"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1})
    export(model, tmp_path / "out", length=N)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad(), fixed_t(model, N / L):
        assert (stock(ids(N)).logits - model(ids(N)).logits).abs().max() <= 1e-5


def test_a_log_scale_export_holds_the_scale_of_N_and_says_so_below_L(tmp_path):
    import math

    export(trained(log_scale=True), tmp_path / "out", length=N)
    params = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
    assert params["attention_factor"] == pytest.approx(math.sqrt(math.log(N) / math.log(L)))  # q·k × log N / log L
    note = json.loads((tmp_path / "out" / "clex_export.json").read_text())
    assert note["below_L"] == "the plain model with the log scale of N"


def test_generate_fixed_t_pins_the_log_scale_to_the_final_length():
    from clex.hf.generation import generate_fixed_t

    model = trained(log_scale=True)
    out = generate_fixed_t(
        model, ids(20), max_new_tokens=N - 20, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    got = torch.stack(out.logits, dim=1)  # [1, N - 20, vocab]: each step's next-token logits
    with torch.no_grad(), fixed_t(model, N / L, log_scale_length=N):
        want = model(out.sequences[:, :-1]).logits[:, 19:]  # one forward over the whole generation, scale of N
    assert (got - want).abs().max() <= 1e-5
