"""llama.cpp for real: the GGUF export of a tiny CLEX model, run by llama.cpp (llama-cpp-python), against CLEX.

    python experiments/serving/llama_cpp_check.py --out experiments/serving/results/llama_cpp.json     # in a python where llama_cpp imports

The tiny model of ``vllm_check.py`` (LLaMA, float32, head_dim 64, L = 32; with and without ``mscale="yarn"``)
is exported with ``clex.export(..., format="gguf", length=N)``; llama.cpp evaluates prompts past L and below L
in one batch each (``logits_all``; the KV cache in float32, and again in llama.cpp's default float16); every
position's logits are compared with the CLEX model's at fixed
t = N/L in transformers (llama.cpp applies rope_freqs at every position: clex/hf/to_gguf.py). Also llama.cpp's
tokenizer on a sentence against the tokenizer's own ids. Writes the differences and versions as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_check import LONG, SHORT, L, N, tiny_clex_model, tiny_tokenizer  # noqa: E402

SENTENCE = "To be, or not to be: that is the question."


def check(work: Path, name: str, kv_f32: bool, **clex_options) -> dict:
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    import clex
    from clex.hf.generation import fixed_t

    model = tiny_clex_model(**clex_options)
    tiny_tokenizer(work / "tok")
    file = clex.export(model, work / f"{name}.gguf", length=N, format="gguf", tokenizer_from=work / "tok")
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}  # default: F16 cache
    llm = llama_cpp.Llama(
        model_path=str(file), n_ctx=N, n_batch=N, n_ubatch=N, logits_all=True, n_threads=2, verbose=False, **kv
    )
    out = {
        "clex_options": clex_options,
        "kv_cache": "f32" if kv_f32 else "f16 (llama.cpp's default)",
        "gguf_bytes": file.stat().st_size,
    }
    for label, n in (("past_L", LONG), ("below_L", SHORT)):
        ids = torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        llm.reset()
        llm.eval(ids)
        got = np.asarray(llm.scores[:n], dtype=np.float64)  # [n, V] logits at every position
        with torch.no_grad(), fixed_t(model, N / L, log_scale_length=N):  # log_scale: the file holds the scale of N
            want = model(torch.tensor([ids])).logits[0].double().numpy()
        d = np.abs(got - want)

        def lp(x):
            return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

        out[label] = {
            "n": n,
            "logits_max_abs": float(d.max()),
            "logits_mean_abs": float(d.mean()),
            "logprob_max_abs": float(np.abs(lp(got) - lp(want)).max()),
            "logits_scale": float(np.abs(want).max()),
        }
    tok = AutoTokenizer.from_pretrained(work / "tok")
    out["tokenizer_equal"] = llm.tokenize(SENTENCE.encode(), add_bos=False, special=False) == tok(SENTENCE).input_ids
    llm.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    import importlib.metadata as md

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="clex-llama-cpp-"))
    runs = {"plain": {}, "mscale_yarn": {"mscale": "yarn"}}
    result = {"L": L, "N": N}
    for name, options in runs.items():
        result[name] = check(work, name, True, **options)
        result[f"{name}_kv_f16"] = check(work, f"{name}-f16", False, **options)
    result.update(
        versions={n: md.version(n) for n in ("llama-cpp-python", "gguf", "torch", "transformers")},
        python=platform.python_version(),
        wall_s=round(time.perf_counter() - start, 1),
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    worst = max(result[k][p]["logprob_max_abs"] for k in runs for p in ("past_L", "below_L"))
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
