"""Export to a LLaMA GGUF with rope_freqs: read back (gguf.GGUFReader and transformers' own GGUF loader), the
model built from the file gives CLEX's logits at fixed t = N/L at every length; what GGUF cannot hold is refused."""

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import clex
import clex.recipes
from clex.hf.export import export
from clex.hf.generation import fixed_t
from clex.hf.to_gguf import interleave_rotary_rows

L, N, VOCAB = 16, 64, 300


def trained(family="llama", model_overrides=None, **kw):
    model = tiny_model(family, vocab_size=VOCAB, **(model_overrides or {}))
    model = clex.apply_clex(model, max_factor=8, exact_cache=False, **kw)
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    return model


def ids(n):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))


def field(reader, key):
    return reader.fields[key].contents()


def model_from_gguf(file):
    """A stock transformers model from the file: transformers' GGUF loader for the weights (it undoes the Q/K
    permutation itself), then rope_freqs and the attention factor as llama.cpp applies them: at every position
    (longrope with short_factor = long_factor = rope_freqs)."""
    reader = gguf.GGUFReader(file)
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data.astype(np.float64).tolist()
    config = loaded.config
    config.rope_parameters = {
        "rope_type": "longrope",
        "rope_theta": field(reader, "llama.rope.freq_base"),
        "original_max_position_embeddings": field(reader, "llama.rope.scaling.original_context_length"),
        "short_factor": freqs,
        "long_factor": freqs,
        "attention_factor": field(reader, "llama.rope.scaling.attn_factor"),
    }
    stock = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stock.load_state_dict(loaded.state_dict())
    return stock


WIDE = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}  # head_dim 64


@pytest.mark.parametrize(
    "overrides, options",
    [
        ({}, {}),
        (WIDE, {}),
        ({}, dict(clex.recipes.get("recommended").clex)),
        ({}, dict(clex.recipes.get("far").clex)),
    ],
)
def test_the_gguf_is_clex_at_fixed_t_at_every_length(tmp_path, overrides, options):
    model = trained(model_overrides=overrides, **options)
    tiny_tokenizer(tmp_path)
    file = export(model, tmp_path / "m.gguf", length=N, format="gguf", tokenizer_from=tmp_path)
    stock = model_from_gguf(file)
    with torch.no_grad(), fixed_t(model, N / L, log_scale_length=N):  # log_scale: pinned at N, as the file holds it
        for n in (12, 40, N):  # below L too: llama.cpp's rope_freqs have no switch at L
            assert (stock(ids(n)).logits - model(ids(n)).logits).abs().max() <= 1e-5


def test_the_file_holds_what_llama_cpp_reads(tmp_path):
    model = trained(mscale="yarn")
    tok = tiny_tokenizer(tmp_path)
    file = export(model, tmp_path / "m.gguf", length=N, format="gguf", tokenizer_from=tmp_path, tokenizer_pre="smollm")
    reader = gguf.GGUFReader(file)
    rotary = clex.get_clex_rotary(model)
    theta = rotary.inv_freq_at(N / L).detach().double()
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.allclose(freqs.data, (rotary.inv_freq.double() / theta).numpy(), rtol=1e-6)
    assert field(reader, "llama.rope.scaling.attn_factor") == pytest.approx(clex.core.equations.yarn_mscale(N / L))
    assert field(reader, "general.architecture") == "llama" and field(reader, "llama.context_length") == N
    assert field(reader, "llama.rope.scaling.type") == "none"
    assert field(reader, "tokenizer.ggml.pre") == "smollm" and field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(VOCAB)))
    assert field(reader, "tokenizer.ggml.bos_token_id") == 0 and field(reader, "tokenizer.ggml.eos_token_id") == 1
    assert len(field(reader, "tokenizer.ggml.merges")) == len(
        json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    )
    assert json.loads(field(reader, "clex.export"))["t"] == N / L
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert not any(".dynamics" in t.name for t in reader.tensors)


def test_interleaving_pairs_the_two_halves_of_each_head():
    w = torch.arange(8.0).repeat_interleave(2).reshape(8, 2)  # 2 heads of d = 4, rows 0..7
    assert interleave_rotary_rows(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_what_gguf_cannot_hold_is_refused(tmp_path):
    tiny_tokenizer(tmp_path / "tok")
    kw = dict(length=N, format="gguf", tokenizer_from=tmp_path / "tok")
    with pytest.raises(
        ValueError, match="format gguf maps the model families 'llama', 'mistral', got model_type 'qwen2'"
    ):
        export(trained("qwen2"), tmp_path / "a.gguf", **kw)
    with pytest.raises(ValueError, match="format gguf maps the model families .* got model_type 'phi3'"):
        export(trained("phi3"), tmp_path / "a.gguf", **kw)  # partial rotary: refused with its family
    with pytest.raises(ValueError, match="got model_type 'gpt_neox'"):
        export(trained("gpt_neox"), tmp_path / "a.gguf", **kw)
    with pytest.raises(ValueError, match="attention_bias=True"):
        export(clex.apply_clex(tiny_model("llama", vocab_size=VOCAB, attention_bias=True)), tmp_path / "a.gguf", **kw)
    with pytest.raises(ValueError, match="length must be an integer >= L = 16"):
        export(trained(), tmp_path / "a.gguf", **{**kw, "length": 8})
    with pytest.raises(ValueError, match="ending in .gguf"):
        export(trained(), tmp_path / "a", **kw)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        export(trained(), tmp_path / "a.gguf", **{**kw, "tokenizer_from": None})
    with pytest.raises(ValueError, match="has none"):
        export(trained(), tmp_path / "a.gguf", **{**kw, "tokenizer_from": tmp_path})
    (tmp_path / "b.gguf").write_text("keep")
    with pytest.raises(ValueError, match="exists"):
        export(trained(), tmp_path / "b.gguf", **kw)
    assert (tmp_path / "b.gguf").read_text() == "keep"
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "a.gguf").exists()


def test_clex_export_gguf_on_the_command_line(tmp_path):
    from clex.cli import main

    trained().save_pretrained(tmp_path / "m")
    tiny_tokenizer(tmp_path / "m")
    args = ["export", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--length", str(N), "--format", "gguf"]
    assert main(args) == 0
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "llama.context_length") == N
    assert main(args) == 2  # exists
    assert main([*args, "--overwrite"]) == 0
