"""Perplexity: both protocols equal a full forward where they should, memory-safe loss, specs, outputs, errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import clex
from clex.data.tokenizer import byte_tokenizer
from clex.eval import perplexity as evaluate
from clex.eval.perplexity import nll_chunked, nll_sliding, run_ppl
from clex.eval.specs import ModelSpec, load_spec
from clex.hf.generation import fixed_clex_t
from clex.hf.methods import prepare_model

L = 16  # the tiny models' max_position_embeddings


def byte_model(use_clex=False, seed=0):
    model = tiny_model("llama", seed=seed, vocab_size=257)
    if use_clex:
        clex.apply_clex(model, max_factor=16)
        with torch.no_grad():  # a "trained" CLEX: θ(t) depends on t beyond the NTK prior
            clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(
                0, 0.2, generator=torch.Generator().manual_seed(1)
            )
    return model


def ids(n, seed=1):
    return torch.randint(0, 257, (n,), generator=torch.Generator().manual_seed(seed))


def full_nll(model, x):
    with torch.no_grad():
        logits = model(x[None]).logits[0]
    return F.cross_entropy(logits[:-1].float(), x[1:], reduction="none")


@pytest.mark.parametrize("use_clex", [False, True])
def test_sliding_and_chunked_equal_a_full_forward_when_the_window_covers_the_sequence(use_clex):
    model, x = byte_model(use_clex), ids(90)  # 90 tokens: t = 5.625 for CLEX, past L = 16
    ref = full_nll(model, x)
    torch.testing.assert_close(nll_sliding(model, x, block=7), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(nll_chunked(model, x, chunk=L, block=7), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(nll_chunked(model, x, chunk=7, block=1000), ref, rtol=0, atol=1e-5)


def test_chunked_clex_with_log_scale_equals_a_full_forward():
    model = clex.apply_clex(tiny_model("llama", vocab_size=257), max_factor=8, log_scale=True)
    x = ids(90)
    ref = full_nll(model, x)
    torch.testing.assert_close(nll_chunked(model, x, chunk=L), ref, rtol=0, atol=1e-5)
    assert "_apply_log_scale" not in vars(clex.get_clex_rotary(model))  # the pin is undone


def test_chunked_clex_is_exact_only_because_t_is_fixed(monkeypatch):
    model, x = byte_model(True), ids(90)
    ref = full_nll(model, x)
    import contextlib

    monkeypatch.setattr(evaluate, "fixed_clex_t", lambda model, n: contextlib.nullcontext())
    drifting = nll_chunked(model, x, chunk=L)  # t grows chunk by chunk; cached keys keep their old rotation
    assert (drifting - ref).abs().max() > 1e-3
    # without the fix the first chunk is scored at t = 1 (16 keys), not at the t of the 90-token sequence
    torch.testing.assert_close(drifting[: L - 1], full_nll(model, x[:L]), rtol=0, atol=1e-5)


def test_fixed_t_restores_the_policy_and_leaves_plain_models_alone():
    model = byte_model(True)
    rot = clex.get_clex_rotary(model)
    before = rot.config
    with fixed_clex_t(model, 40) as t:
        assert t == 2.5 and rot.config.inference_t == "fixed" and rot.config.fixed_t == 2.5
    assert rot.config is before
    with fixed_clex_t(byte_model(False), 40) as t:
        assert t is None


def test_sliding_scores_each_token_once_with_its_own_window():
    model, x = byte_model(), ids(70)
    got = nll_sliding(model, x, window=32, stride=10)
    torch.testing.assert_close(got[:31], full_nll(model, x[:32]), rtol=0, atol=1e-5)  # the first window
    torch.testing.assert_close(got[-8:], full_nll(model, x[-32:])[-8:], rtol=0, atol=1e-5)  # the last window
    assert (got[-8:] - full_nll(model, x)[-8:]).abs().max() > 1e-4  # a shorter context changes the loss


def test_the_loss_never_holds_full_sequence_logits():
    model, x = byte_model(True), ids(120)
    rows = []
    model.lm_head.register_forward_hook(lambda m, inp, out: rows.append(out.shape))
    model.forward = None  # the causal LM's own forward (full logits) must not be used
    nll_chunked(model, x, chunk=L, block=8)
    nll_sliding(model, x, window=64, stride=32, block=8)
    assert rows and all(s[-1] == 257 and s.numel() <= 8 * 257 for s in rows)


def test_yarn_spec_is_transformers_own_yarn(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "rope_theta": 10000.0}
    theirs = tiny_model("llama", seed=0, vocab_size=257, rope_parameters=rope)
    byte_model().save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    ours = load_spec(f"{tmp_path}:yarn:factor=4.0").model
    x = ids(60)
    with torch.no_grad():
        torch.testing.assert_close(ours(x[None]).logits, theirs(x[None]).logits)
    assert ours.model.rotary_emb.attention_scaling > 1  # YaRN's attention factor came with it
    with pytest.raises(ValueError, match="unknown method 'bogus'; methods: clex, pi, ntk, dynamic-ntk"):
        load_spec(f"{tmp_path}:bogus:factor=4")
    with pytest.raises(ValueError, match="plain-RoPE model, but this one has CLEX"):
        prepare_model(byte_model(True), "yarn", factor=4.0)
    with pytest.raises(ValueError, match="give factor="):
        load_spec(f"{tmp_path}:linear")
    with pytest.raises(ValueError, match=r"factor must be a number >= 1 \(target length / original length\), got 0.5"):
        load_spec(f"{tmp_path}:yarn:factor=0.5")


def test_every_baseline_spec_is_the_training_method(tmp_path):
    """One registry: PATH:METHOD:factor=4 builds exactly what prepare_model(METHOD, factor=4) builds for
    training; ntk is static NTK everywhere; linear and dynamic are aliases of pi and dynamic-ntk."""
    byte_model().save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    x = ids(60)
    for spec, method in [
        ("pi", "pi"),
        ("linear", "pi"),
        ("ntk", "ntk"),
        ("dynamic", "dynamic-ntk"),
        ("dynamic-ntk", "dynamic-ntk"),
        ("yarn", "yarn"),
        ("longrope", "longrope"),
        ("llama3", "llama3"),
    ]:
        loaded = load_spec(f"{tmp_path}:{spec}:factor=4")
        assert loaded.spec["method"] == method
        trained = prepare_model(byte_model(), method, factor=4)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x[None]).logits, trained(x[None]).logits, msg=spec)
    ntk = load_spec(f"{tmp_path}:ntk:factor=4").model.model.rotary_emb
    assert ntk.rope_type == "default" and ntk.inv_freq[-1] < byte_model().model.rotary_emb.inv_freq[-1]


def test_unknown_rope_keys_are_refused_with_the_valid_ones(tmp_path):
    byte_model().save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unknown rope parameter\(s\) \['beta_fats'\]; valid: .*beta_fast"):
        load_spec(f"{tmp_path}:yarn:factor=4,beta_fats=16")
    with pytest.raises(ValueError, match=r"\['maxfactor'\]; valid: factor, partial_rotary_factor, rope_theta"):
        load_spec(f"{tmp_path}:pi:factor=4,maxfactor=4")
    with pytest.raises(ValueError, match="maxfactor"):
        load_spec(f"{tmp_path}:clex:maxfactor=4")
    assert load_spec(f"{tmp_path}:yarn:factor=4,beta_fast=16").model.config.rope_parameters["beta_fast"] == 16


def test_model_spec_syntax():
    s = ModelSpec.parse("yarn4=runs/base:yarn:factor=4,beta_fast=32.0")
    assert (s.name, s.path, s.method, s.params) == ("yarn4", "runs/base", "yarn", {"factor": 4, "beta_fast": 32.0})
    s = ModelSpec.parse("runs/base:pi:factor=2")
    assert s.method == "pi" and s.label == "base:pi(factor=2)"
    assert ModelSpec.parse("runs/base:Dynamic:factor=2").method == "dynamic-ntk"
    with pytest.raises(ValueError, match="unknown method 'rerope'; methods: .*aliases: linear"):
        ModelSpec.parse("runs/base:rerope:factor=2")
    assert ModelSpec.parse("runs/clex").label == "clex" and ModelSpec.parse("runs/clex").method is None
    with pytest.raises(ValueError, match="KEY=VALUE"):
        ModelSpec.parse("runs/base:yarn:factor")
    with pytest.raises(ValueError, match="no model path"):
        ModelSpec.parse("name=:yarn")


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "base"
    byte_model().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_run_ppl_side_by_side_writes_json_markdown_png(folder, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("To be, or not to be, that is the question. " * 4)
    (docs / "b.md").write_text("Whether 'tis nobler in the mind to suffer the slings. " * 2)
    specs = [f"base={folder}", f"pi={folder}:pi:factor=4", f"{folder}:clex:max_factor=16", f"y={folder}:yarn:factor=4"]
    out = run_ppl(
        specs, lengths="32,150", protocol="chunked", documents=str(docs), out_dir=str(tmp_path / "o"), buckets=4
    )
    assert list(out["models"]) == ["base", "pi", "base:clex(max_factor=16)", "y"]
    r = out["models"]["base"]["results"]
    assert r[32]["sequences"] == 2 and r[150]["sequences"] == 1  # a.txt has 176 tokens, b.md 108
    assert len(r[150]["bucket_nll"]) == 4 and r[150]["ppl_min"] <= r[150]["ppl"] <= r[150]["ppl_max"]
    assert out["models"]["base:clex(max_factor=16)"]["original_length"] == L
    assert out["models"]["base"]["results"][150]["ppl"] != out["models"]["pi"]["results"][150]["ppl"]
    clex_r = out["models"]["base:clex(max_factor=16)"]["results"]
    assert clex_r[32]["ppl"] != r[32]["ppl"]  # past L, CLEX (here: its NTK prior) changes the model
    saved = json.loads((tmp_path / "o" / "ppl.json").read_text())
    assert saved["seed"] == 0 and saved["config"]["protocol"] == "chunked" and "transformers" in saved["versions"]
    table = (tmp_path / "o" / "ppl.md").read_text()
    assert "| base | 16 |" in table and "| y |" in table
    assert (tmp_path / "o" / "ppl.png").stat().st_size > 5000
    sliding = run_ppl(
        [f"base={folder}"],
        lengths=[150],
        protocol="sliding",
        documents=str(docs),
        out_dir=str(tmp_path / "s"),
        plot=False,
    )
    assert sliding["models"]["base"]["results"][150]["ppl"] == pytest.approx(r[150]["ppl"], rel=1e-5)


def test_a_built_model_triple_is_accepted(tmp_path):
    out = run_ppl(
        [("mine", byte_model(), byte_tokenizer())],
        lengths=[20],
        documents={"d": "abc " * 20},
        out_dir=str(tmp_path),
        plot=False,
    )
    x = torch.tensor(list(b"abc " * 5))
    assert out["models"]["mine"]["results"][20]["nll"] == pytest.approx(
        float(full_nll(byte_model(), x).mean()), rel=1e-5
    )


def test_bad_input_is_refused_clearly(folder, tmp_path):
    docs = {"short": "tiny text " * 5}
    with pytest.raises(ValueError, match=r"length 500 is longer than every document \(1 documents; the longest has 50"):
        run_ppl([f"{folder}"], lengths=[20, 500], documents=docs, out_dir=str(tmp_path), plot=False)
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nowhere"):
        run_ppl([str(tmp_path / "nowhere")], lengths=[20], documents=docs, out_dir=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty holds no .txt, .md or .jsonl files"):
        run_ppl([f"{folder}"], lengths=[20], documents=str(empty), out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="documents not found"):
        run_ppl([f"{folder}"], lengths=[20], documents=str(tmp_path / "missing.txt"), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="protocol must be one of sliding, chunked, got 'full'"):
        run_ppl([f"{folder}"], protocol="full")
    with pytest.raises(ValueError, match="at least one model"):
        run_ppl([], lengths=[20])
    with pytest.raises(ValueError, match="model names must be unique"):
        run_ppl([f"{folder}", f"{folder}"], lengths=[20], documents=docs, out_dir=str(tmp_path), plot=False)
    no_tok = tmp_path / "no_tok"
    byte_model().save_pretrained(no_tok)
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_spec(str(no_tok))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunk": 0}, r"chunk must be an integer >= 1 or None \(= L, the model's training length\), got 0"),
        ({"max_documents": 0}, r"max_documents must be an integer >= 1 or None, got 0"),
        ({"samples": 0}, r"samples must be an integer >= 1, got 0"),
        ({"window": 1}, r"window must be an integer >= 2 or None \(= the whole length\), got 1"),
        ({"lengths": [1, 20]}, r"lengths must be integers >= 2 like '128,256', got \[1, 20\]"),
        ({"lengths": [20.5]}, r"lengths must be integers >= 2 like '128,256', got 20.5"),
        ({"lengths": "20,x"}, r"lengths must be integers >= 2 like '128,256', got 'x'"),
        ({"dtype": "foo"}, r"dtype must be one of float32, bfloat16, float16 \(or none: as saved\), got 'foo'"),
        ({"device": "foo"}, r"device must be one of cpu, cuda, cuda:N \(N a GPU index\), mps, got 'foo'"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(kwargs, message, tmp_path):
    args = {"lengths": [20], "documents": {"d": "abc " * 20}, "out_dir": str(tmp_path), "plot": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        run_ppl([("mine", byte_model(), byte_tokenizer())], **args)


def test_no_models_says_models_is_required():
    for empty in ((), [], None):
        with pytest.raises(ValueError, match=r"models: give at least one model spec \(--models SPEC"):
            run_ppl(empty, lengths=[20])


def test_documents_are_read_by_the_training_reader_with_names(tmp_path):
    from clex.data.texts import load_texts
    from clex.eval.documents import load_documents

    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "gamma", "id": "g"}\n{"text": "delta"}\n')
    docs = load_documents(tmp_path)
    assert docs == {"a": "alpha", "sub/b": "beta", "sub/c:g": "gamma", "sub/c:2": "delta"}
    assert list(docs.values()) == load_texts(tmp_path)  # one set of rules for training and evaluation
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match=r"cannot read .*bin\.txt: it is binary"):
        load_documents(tmp_path)
    with pytest.raises(ValueError, match="not a string"):
        load_documents({"d": 3})


def test_chunk_none_is_the_training_length_and_recorded_as_none(tmp_path):
    docs = {"d": "abc " * 20}
    out = run_ppl(
        [("m", byte_model(), byte_tokenizer())], lengths=[40], documents=docs, out_dir=str(tmp_path), plot=False
    )
    given = run_ppl(
        [("m", byte_model(), byte_tokenizer())],
        lengths=[40],
        documents=docs,
        chunk=L,
        out_dir=str(tmp_path),
        name="given",
        plot=False,
    )
    assert out["config"]["chunk"] is None and given["config"]["chunk"] == L
    assert out["models"]["m"]["results"][40]["nll"] == given["models"]["m"]["results"][40]["nll"]


def test_the_context_ratio_compares_the_same_last_L_tokens_with_the_whole_window_and_with_L_before_them(tmp_path):
    """Content-controlled: only the context differs. Its value is recomputed here from two full forwards."""
    model = byte_model(use_clex=True)
    text = "".join(chr(97 + (i * 7) % 26) for i in range(400))
    out = run_ppl(
        [("clex", model, byte_tokenizer())],
        lengths=[32, 96],
        documents={"doc": text},
        out_dir=str(tmp_path),
        plot=False,
    )
    res = out["models"]["clex"]["results"]
    assert "context_ratio" not in res[32]  # 2 L: the short context is the whole window
    x = torch.tensor(byte_tokenizer()(text, add_special_tokens=False)["input_ids"][:96])
    with fixed_clex_t(model, 96):
        whole = full_nll(model, x)[-L:].mean()
    with fixed_clex_t(model, 2 * L):
        short = full_nll(model, x[-2 * L :])[-L:].mean()
    assert res[96]["context_ratio"] == pytest.approx(float(torch.exp(whole - short)), rel=1e-5)
    assert "context ratio" in (tmp_path / "ppl.md").read_text()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{p}::factor=4", r"gives parameters \['factor'\] but no METHOD to take them"),
        ("{p}:none:factor=4", r"method 'none' \(the model unchanged\) takes no parameters, got \['factor'\]"),
        ("{p}:yran:factor=4", r"unknown method 'yran'.*\(did you mean 'yarn'\?\)"),
    ],
)
def test_nothing_of_a_spec_is_dropped(tmp_path, spec, message):
    """A factor without a method, or given to `none`, was dropped and the row labelled as if scaled."""
    with pytest.raises(ValueError, match=message):
        run_ppl([spec.format(p=tmp_path)], lengths=[20], out_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # refused before any model was loaded or file written


def test_a_length_that_cannot_fit_in_memory_is_refused_before_the_forward(tmp_path):
    from clex.eval.retrieval import run_passkey

    model = byte_model(use_clex=True)
    with pytest.raises(ValueError, match=r"lengths=1000000000 needs at least .* GiB, but this machine has .* GiB free"):
        run_passkey([("m", model, byte_tokenizer())], lengths=[10**9], out_dir=str(tmp_path), plot=False)
