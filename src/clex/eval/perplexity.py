"""Perplexity against length, in the two protocols users know, memory-safe at any length.

For each length n, each document (at least n tokens long) gives ``samples`` sequences of n tokens (the
first n, or evenly spaced windows); the n-1 tokens after the first are scored. The protocols differ only
in what each scored token sees:

- ``sliding`` (YaRN / LongLoRA): windows of ``window`` tokens (default: n, i.e. one full forward, the
  "truncation" protocol), each a fresh forward from position 0, moved by ``stride``; a window scores only
  the tokens no earlier window scored, so every token is scored once, with up to ``window`` - 1 tokens of
  context. The last window ends at token n (so every window has exactly ``window`` tokens).
- ``chunked`` (the CLEX reference): the n tokens are fed in non-overlapping chunks of ``chunk`` tokens
  (default: the model's training length L) with the key cache carried forward, so every token sees all
  earlier ones. A CLEX model's t would otherwise grow chunk by chunk and leave cached keys rotated with
  stale frequencies; here t is pinned to the t of the full length n (:func:`clex.hf.generation.fixed_clex_t`),
  so the chunked loss equals one full forward's, and the cache is exact (``log_scale``'s query scale is
  pinned to n as well). transformers' ``dynamic`` scaling recomputes its frequencies as the cache grows
  and keeps the stale keys: that is its known behaviour, measured as is.

Memory: the decoder's hidden states are taken (``model.get_decoder()``) and the output head + cross-entropy
are applied ``loss_block`` positions at a time, so the logits of a whole sequence never exist.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.checks import DType, check_count, check_device, check_dtype, parse_ints
from ..hf.compat import cache_kwargs, output_cache
from ..hf.generation import fixed_clex_t
from ..hf.lookup import text_config
from .documents import load_documents, tokenize_documents
from .report import check_results, finish_run
from .specs import LoadedModel, check_lengths_fit, check_models, default_lengths, each_model, model_device

Protocol = Literal["sliding", "chunked"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)


def _check_head(model: nn.Module) -> nn.Module:
    config = text_config(model)
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ValueError(
                f"{type(model).__name__} post-processes its logits ({key}); perplexity here supports plain heads"
            )
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); expected a causal LM")
    return head


def token_nll(model: nn.Module, hidden: Tensor, targets: Tensor, *, block: int = 1024) -> Tensor:
    """-log p(target) for each position, the head applied ``block`` positions at a time.

    hidden: [T, H] (the decoder's last hidden states), targets: [T] -> [T] float32. Peak extra memory is
    one [block, vocab] float32 logits block, whatever T is.
    """
    head = _check_head(model)
    out = torch.empty(targets.shape[0], dtype=torch.float32)
    for s in range(0, targets.shape[0], block):
        logits = head(hidden[s : s + block]).float()  # [b, V], float32 for the softmax
        out[s : s + logits.shape[0]] = F.cross_entropy(
            logits, targets[s : s + block].to(logits.device), reduction="none"
        ).cpu()
    return out


@torch.no_grad()
def nll_sliding(
    model: nn.Module, ids: Tensor, *, window: int | None = None, stride: int = 256, block: int = 1024
) -> Tensor:
    """Per-token NLL of ids [n] by sliding windows (see the module docstring).  -> [n-1] float32"""
    n = ids.shape[0]
    w = min(window or n, n)
    if w < 2 or stride < 1:
        raise ValueError(f"sliding needs window >= 2 and stride >= 1, got window={w}, stride={stride}")
    decoder, dev = model.get_decoder(), model_device(model)
    nll = torch.empty(n - 1)
    done, end = 1, w  # tokens [1, done) are scored; the current window is [end - w, end)
    while True:
        begin = end - w
        hidden = decoder(input_ids=ids[begin:end][None].to(dev), use_cache=False).last_hidden_state[0]  # [w, H]
        first = max(done, begin + 1)  # first token this window scores; position p is predicted by p - 1
        nll[first - 1 : end - 1] = token_nll(
            model, hidden[first - 1 - begin : end - 1 - begin], ids[first:end], block=block
        )
        done = end
        if end == n:
            return nll
        end = min(end + stride, n)


@torch.no_grad()
def nll_chunked(model: nn.Module, ids: Tensor, *, chunk: int, block: int = 1024) -> Tensor:
    """Per-token NLL of ids [n] fed in chunks with the key cache carried (CLEX t fixed).  -> [n-1] float32"""
    n = ids.shape[0]
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    decoder, dev = model.get_decoder(), model_device(model)
    nll = torch.empty(n - 1)
    cache = None
    with fixed_clex_t(model, n):
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            out = decoder(input_ids=ids[s:e][None].to(dev), use_cache=True, **cache_kwargs(cache))
            cache = output_cache(out)
            m = min(e, n - 1) - s  # positions s .. s+m-1 predict tokens s+1 .. s+m (the next chunk's first too)
            if m > 0:
                nll[s : s + m] = token_nll(model, out.last_hidden_state[0, :m], ids[s + 1 : s + 1 + m], block=block)
    return nll


def _windows(doc_len: int, n: int, samples: int) -> list[int]:
    """Start offsets of ``samples`` evenly spaced n-token windows in a document of doc_len tokens."""
    if samples == 1 or doc_len == n:
        return [0]
    return sorted({round(i * (doc_len - n) / (samples - 1)) for i in range(samples)})


def _stats(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"std": float(t.std()) if len(values) > 1 else 0.0, "min": float(t.min()), "max": float(t.max())}


def perplexity(
    loaded: LoadedModel,
    tokens: dict[str, list[int]],
    lengths: Sequence[int],
    *,
    protocol: str = "chunked",
    window: int | None = None,
    stride: int = 256,
    chunk: int | None = None,
    samples: int = 1,
    buckets: int = 8,
    loss_block: int = 1024,
    context_ratio: bool = True,
) -> dict[int, dict]:
    """{length: results} for one model over tokenised documents (see :func:`run_ppl` for the fields)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    longest = max(len(v) for v in tokens.values())
    for n in lengths:
        if n > longest:
            raise ValueError(
                f"length {n} is longer than every document ({len(tokens)} documents; the longest has {longest} "
                f"tokens with {loaded.name}'s tokenizer); allowed: lengths <= {longest}"
            )

    def score(ids):
        if protocol == "sliding":
            return nll_sliding(loaded.model, ids, window=window, stride=stride, block=loss_block)
        return nll_chunked(
            loaded.model,
            ids,
            chunk=chunk if chunk is not None else loaded.original_length or len(ids),
            block=loss_block,
        )

    results = {}
    for n in lengths:
        jobs = [(doc, off) for doc, ids in tokens.items() if len(ids) >= n for off in _windows(len(ids), n, samples)]
        nlls, per_doc, ratios = [], {}, []
        L = loaded.original_length
        for doc, off in tqdm(jobs, desc=f"{loaded.name} ppl@{n} ({protocol})", leave=False):
            ids = torch.tensor(tokens[doc][off : off + n])
            nll = score(ids)
            nlls.append(nll)
            per_doc[f"{doc}@{off}"] = math.exp(float(nll.mean()))
            if context_ratio and L and n > 2 * L:  # the last L tokens: whole window vs only the L before them
                ratios.append(math.exp(float(nll[-L:].mean()) - float(score(ids[-2 * L :])[-L:].mean())))
        allnll = torch.stack(nlls)  # [docs, n-1]
        edges = [round(i * n / buckets) for i in range(buckets + 1)]  # buckets over the target position 1..n-1
        bucket_nll = [
            float(allnll[:, max(a, 1) - 1 : b - 1].mean()) if b - 1 > max(a, 1) - 1 else None
            for a, b in itertools.pairwise(edges)
        ]
        mean_nll = float(allnll.mean())
        spread = _stats(list(per_doc.values()))
        results[n] = {
            "length": n,
            "sequences": len(jobs),
            "nll": mean_nll,
            "ppl": math.exp(mean_nll),
            "ppl_std": spread["std"],
            "ppl_min": spread["min"],
            "ppl_max": spread["max"],
            "bucket_edges": edges,
            "bucket_nll": bucket_nll,
            "per_sequence_ppl": per_doc,
        }
        if ratios:  # <= 1: the extra context did not hurt (content-controlled: the same tokens both times)
            results[n].update(context_ratio=sum(ratios) / len(ratios), context_ratio_windows=ratios)
    return results


def run_ppl(
    models: Sequence[str | tuple] = (),
    *,
    lengths: Sequence[int] | str | None = None,
    protocol: Protocol = "chunked",
    window: int | None = None,
    stride: int = 256,
    chunk: int | None = None,
    documents: str | None = None,
    samples: int = 1,
    max_documents: int | None = None,
    buckets: int = 8,
    loss_block: int = 1024,
    device: str = "cpu",
    dtype: DType | None = None,
    seed: int = 0,
    out_dir: str = "runs/eval",
    name: str = "ppl",
    plot: bool = True,
    context_ratio: bool = True,
    overwrite: bool = False,
) -> dict:
    """Perplexity against length for one or more models, side by side (JSON + Markdown + PNG).

    Per length: ppl = exp(mean token NLL), the spread of per-sequence ppl (std, min, max), bucket NLLs, and
    for lengths past 2 L the content-controlled context ratio: the last L tokens of each window scored with the
    whole window as context over the same tokens scored with only the L tokens before them (ppl ratio; <= 1:
    more context did not hurt).
    Bad values (chunk 0, max_documents 0, an unknown device or dtype, ...) are a ValueError naming the field.

    Args:
        models: model specs [NAME=]PATH[:METHOD[:K=V,...]] (see clex.eval.specs), or (name, model, tokenizer) triples
        lengths: token counts, e.g. 1024 2048 (default: 1, 2, 4, 8, 16 x the first model's training length L)
        protocol: chunked (key cache carried over chunks) or sliding (fresh windows moved by stride)
        window: sliding: tokens per window, >= 2 (default: the whole length)
        stride: sliding: tokens each window moves, >= 1
        chunk: chunked: tokens per chunk, >= 1 (default: L, the model's training length)
        documents: a .txt/.md/.jsonl file, a folder of them or a saved dataset (default: the held-out plays)
        samples: sequences per document and length (evenly spaced windows), >= 1
        max_documents: use only the first N documents, >= 1 (default: all)
        buckets: position buckets of the per-position loss, >= 1
        loss_block: positions per block of the output head and loss (memory), >= 1
        device: cpu, cuda, cuda:N or mps
        dtype: float32, bfloat16 or float16 (default: as saved)
        seed: seed of torch before each model
        out_dir: folder of the results (<name>.json, <name>.md, <name>.png)
        name: file stem of the results (a plain name: nothing is written outside out_dir)
        plot: draw <name>.png
        context_ratio: also score each window's last L tokens with only L tokens of context (lengths > 2 L)
        overwrite: replace an earlier result of the same out_dir and name (else refused); other files stay
    """
    check_results(out_dir, name, overwrite=overwrite)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    for field_name, value in (
        ("samples", samples),
        ("buckets", buckets),
        ("loss_block", loss_block),
        ("stride", stride),
        ("max_documents", max_documents),
    ):
        check_count(field_name, value, allow_none=field_name == "max_documents")
    check_count("chunk", chunk, allow_none=True, none_means="L, the model's training length")
    check_count("window", window, allow_none=True, minimum=2, none_means="the whole length")
    device, dtype = check_device(device), check_dtype(dtype)
    specs = check_models(models)
    if lengths is not None:
        lengths = parse_ints(lengths, "lengths")
    docs = load_documents(documents)
    if max_documents is not None:
        docs = dict(list(docs.items())[:max_documents])
    config = {
        "lengths": lengths,
        "protocol": protocol,
        "window": window,
        "stride": stride,
        "chunk": chunk,
        "documents": str(documents) if documents is not None else "embedded held-out plays",
        "document_names": list(docs),
        "samples": samples,
        "buckets": buckets,
        "loss_block": loss_block,
        "device": device,
        "dtype": dtype,
        "context_ratio": context_ratio,
    }
    models_out = {}
    for loaded in each_model(specs, seed=seed, device=device, dtype=dtype):  # one model in memory at a time
        if lengths is None:
            lengths = config["lengths"] = default_lengths(loaded, (1, 2, 4, 8, 16))
        check_lengths_fit(loaded, lengths if protocol == "chunked" or window is None else [min(window, max(lengths))])
        tokens = tokenize_documents(loaded.tokenizer, docs)
        res = perplexity(
            loaded,
            tokens,
            lengths,
            protocol=protocol,
            window=window,
            stride=stride,
            chunk=chunk,
            samples=samples,
            buckets=buckets,
            loss_block=loss_block,
            context_ratio=context_ratio,
        )
        models_out[loaded.name] = {"spec": loaded.spec, "original_length": loaded.original_length, "results": res}
        del loaded
    payload = {"task": "perplexity", "config": config, "seed": seed, "models": models_out}
    rows = [{"model": m, "L": v["original_length"], **_summary_cells(v["results"])} for m, v in models_out.items()]
    return finish_run(
        out_dir,
        name,
        payload,
        rows,
        title=f"Perplexity by length ({protocol})",
        notes="Cells: perplexity (exp of the mean token NLL) ± std of per-sequence perplexity. L: training length.",
        plot=_plot_ppl if plot else None,
    )


def _summary_cells(results: dict) -> dict:
    """Markdown cells of one model: ppl ± std per length; at the longest length the last/previous position
    bucket's perplexity (a far-end collapse shows as >> 1) and the context ratio where measured."""
    cells = {str(n): f"{r['ppl']:.3f} ± {r['ppl_std']:.2f}" for n, r in results.items()}
    n, last = max(results.items())
    b = [x for x in last["bucket_nll"] if x is not None]
    cells[f"last/prev bucket @{n}"] = f"{math.exp(b[-1] - b[-2]):.2f}" if len(b) > 1 else "–"
    ratio = next(
        (f"{r['context_ratio']:.3f} @{k}" for k, r in sorted(results.items(), reverse=True) if "context_ratio" in r),
        "–",
    )
    cells["context ratio"] = ratio
    return cells


def _plot_ppl(payload: dict, png: Path) -> Path:
    from .plot import plot_ppl

    return plot_ppl(payload, png)
