"""Shared helpers of the benchmarks: interleaved median timing, tiny model configs, Markdown tables, JSON.

Timings on a shared machine are noisy: every benchmark runs its variants *interleaved* (one repetition of
each in turn, round after round) and reports medians, so that a slow spell hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

#: The tiny demo-sized LLaMA (byte vocabulary + 1, L = 128): a 2.4M-parameter model.
TINY = dict(
    vocab_size=257,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
)
#: SmolLM2-135M's shape (random init, no weights are loaded): 30 layers, head_dim 64, L = 8192.
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
#: a ~1.1B TinyLlama-like shape: 22 layers, 16 heads of 128 (4 key/value heads: GQA), L = 2048
TINYLLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rope_theta=10000.0,
)
#: LLaMA-2-7B's shape: 32 layers, 32 heads of 128, L = 4096 (benchmarks run fewer layers: the cost is per layer)
LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rope_theta=10000.0,
)


#: where models and inputs live; set from --device by use_device()
DEVICE = torch.device("cpu")


def use_device(name: str) -> torch.device:
    """Set the benchmark device (cpu, cuda, cuda:N); a clear error when CUDA is asked for and absent."""
    global DEVICE
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device here; use --device cpu")
    DEVICE = device
    return device


def llama(config: dict, seed: int = 0, **overrides):
    """A random LlamaForCausalLM of the given shape (float32, sdpa attention), from a fixed seed, built on
    DEVICE (a 7B-shaped layer is initialised on the GPU, not on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with DEVICE:
        return LlamaForCausalLM(LlamaConfig(**{**config, **overrides}, attn_implementation="sdpa"))


def autocast(dtype: str):
    """The forward's precision: ``float32`` (no autocast) or ``bfloat16`` (autocast on DEVICE, as clex train)."""
    import contextlib

    if dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    return contextlib.nullcontext() if dtype == "float32" else torch.autocast(DEVICE.type, dtype=torch.bfloat16)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin: ``warmup`` untimed rounds, then ``rounds``
    timed ones, each calling every function once (in a rotated order, so none is always first)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync()
            start = time.perf_counter()
            fns[n]()
            sync()  # on a GPU, time the work, not its launch
            if r >= warmup:
                times[n].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def summary(xs: list[float]) -> dict:
    """Median and spread (seconds) of a list of timings."""
    return {"median_s": median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs)}


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict:
    """Where the numbers come from."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
    }


def write_json(path: str | Path, payload: dict) -> Path:
    """Writes ``payload`` plus :func:`environment` as indented JSON; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser with the common ``--out`` (default results/bench/<name>.json)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=f"results/bench/{name}.json", help="JSON output (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="forward precision (bfloat16: autocast)"
    )
    return p
