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


def saved_model(tmp_path):
    from clex.data.tokenizer import byte_tokenizer

    folder = tmp_path / "m"
    clex.apply_clex(tiny_model("llama", vocab_size=257), max_factor=8).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside", "holding"])
def test_an_export_never_goes_into_or_over_its_model_even_with_overwrite(tmp_path, capsys, where):
    from clex.cli import main

    folder = saved_model(tmp_path)
    before = snapshot(folder)
    out = {"same": folder, "inside": folder / "export", "holding": tmp_path}[where]
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert main(["export", str(folder), str(out), "--length", str(N), *extra]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("clex: error:")]
        assert len(lines) == 1 and "the model folder" in lines[0] and "never into or over it" in lines[0], err
    assert snapshot(folder) == before  # the ODE weights, the tokenizer: all there
    assert clex.get_clex_rotary(clex.load_model(folder)).config.max_factor == 8


def test_overwrite_replaces_the_exports_own_files_and_keeps_the_users(tmp_path):
    from clex.cli import main

    folder = saved_model(tmp_path)
    out = tmp_path / "out"
    assert main(["export", str(folder), str(out), "--length", str(N)]) == 0
    (out / "README.md").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "ppl.json").write_text("{}")
    assert main(["export", str(folder), str(out), "--length", str(2 * N), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 2 * N
    assert (out / "README.md").read_text() == "my notes" and (out / "eval" / "ppl.json").read_text() == "{}"


def test_an_absurd_length_is_refused_before_any_allocation(tmp_path, capsys):
    """--length 1e9: the frequencies of t = length / L would need far more memory than exists; refused at once."""
    import time

    from clex.cli import main

    folder = saved_model(tmp_path)
    start = time.perf_counter()
    assert main(["export", str(folder), str(tmp_path / "out"), "--length", "1000000000"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clex: error:")]
    assert len(err) == 1 and "length=1000000000 needs at least" in err[0] and "GiB free" in err[0], err
    assert time.perf_counter() - start < 60 and not (tmp_path / "out").exists()


def test_tokenizer_pre_is_a_name_llama_cpp_knows_and_only_for_gguf(tmp_path, capsys):
    from clex.cli import main

    folder = saved_model(tmp_path)
    gguf = ["export", str(folder), str(tmp_path / "m.gguf"), "--length", str(N), "--format", "gguf"]
    with pytest.raises(SystemExit):
        main([*gguf, "--tokenizer-pre", "bogus"])  # refused by the flag's choices, before anything loads
    assert "'bogus' is not one of default, llama-bpe" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"tokenizer_pre 'bogus' is not a pre-tokenizer llama.cpp knows"):
        export(
            clex.load_model(folder),
            tmp_path / "m.gguf",
            length=N,
            format="gguf",
            tokenizer_from=folder,
            tokenizer_pre="bogus",
        )
    assert main(["export", str(folder), str(tmp_path / "hf"), "--length", str(N), "--tokenizer-pre", "smollm"]) == 2
    assert "--tokenizer-pre applies to --format gguf only" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "hf").exists()


def test_exported_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        export(trained(), tmp_path / "out", length=N)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o644}, modes
