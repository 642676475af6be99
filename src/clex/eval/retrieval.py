"""Retrieval at length: a passkey in filler text, and a needle in real text; accuracy by length x depth.

Each sample builds a prompt of exactly n tokens: an instruction, a haystack with a key sentence inserted at
depth d (0 = just after the instruction, 1 = just before the question; on the nearest sentence or line
boundary), and a question whose answer is a random number. The model decodes greedily; the sample is solved
when the first number it writes is the key. Samples depend on (seed, n, depth, sample) only, so every model
sees the same keys and haystacks.

- ``passkey`` (Landmark attention / YaRN): 5-digit key in repeated filler sentences.
- ``needle`` (needle in a haystack): "The magic number of <place> is <7 digits>." in real text (default: the
  held-out plays of the embedded corpus, from a random line of a random play).

A CLEX model decodes with t fixed to the t of the prompt plus the answer (:func:`clex.hf.generation.fixed_clex_t`),
so the key cache stays exact. A model for this harness needs only ``model(input_ids=, cache=, use_cache=True,
logits_to_keep=1) -> .logits [1, T, V], .cache`` (``past_key_values`` before transformers 5.24; see
:mod:`clex.hf.compat`), and its tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.checks import DType, check_count, check_device, check_dtype, parse_fractions, parse_ints
from ..hf.compat import cache_kwargs, output_cache
from ..hf.generation import fixed_clex_t
from .documents import load_documents
from .report import check_results, finish_run
from .specs import check_lengths_fit, check_models, default_lengths, each_model, model_device

TASKS = ("passkey", "needle")
#: the prompt wordings of :data:`TEMPLATES`
Template = Literal["standard", "compact"]
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. ")
#: Prompt wording by task and template: (instruction, key sentence, question). "standard" is the wording of
#: the passkey test of Landmark attention / YaRN; "compact" drops the instruction and shortens the rest, so
#: byte-level miniature models can be tested at a few hundred tokens.
TEMPLATES = {
    ("passkey", "standard"): (
        (
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n"
        ),
        "The pass key is {answer}. Remember it. {answer} is the pass key.\n",
        "\nWhat is the pass key? The pass key is",
    ),
    ("passkey", "compact"): ("", "The pass key is {answer}. ", "\nThe pass key is"),
    ("needle", "standard"): (
        "Somewhere in the text below is a magic number. Find it and remember it.\n\n",
        "The magic number of {place} is {answer}.\n",
        "\nWhat is the magic number of {place}? The magic number of {place} is",
    ),
    ("needle", "compact"): ("", "The magic number of {place} is {answer}.\n", "\nThe magic number of {place} is"),
}
PLACES = ("Lisbon", "Nairobi", "Oslo", "Quito", "Hanoi", "Perth", "Tunis", "Dakar", "Lima", "Riga")


@torch.no_grad()
def greedy_decode(model, ids: Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation of ids [n] (the key cache carried; logits kept for the last position only)."""
    dev = model_device(model)
    out = model(input_ids=ids[None].to(dev), use_cache=True, logits_to_keep=1)
    new: list[int] = []
    while True:
        new.append(int(out.logits[0, -1].argmax()))
        if len(new) == max_new_tokens:
            return new
        step = torch.tensor([[new[-1]]], device=dev)
        out = model(input_ids=step, use_cache=True, logits_to_keep=1, **cache_kwargs(output_cache(out)))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def assemble(
    intro: list[int], units: list[list[int]], key: list[int], question: list[int], n: int, depth: float
) -> list[int]:
    """intro + haystack (units, cycled, cut to fit) with ``key`` at the unit boundary nearest ``depth`` +
    question: exactly n tokens. A ValueError when n cannot hold intro, key and question."""
    room = n - len(intro) - len(key) - len(question)
    if room < 0:
        raise ValueError(f"length {n} is too short for this task: the prompt needs at least {n - room} tokens")
    hay, bounds, i = [], [0], 0
    while len(hay) < room:
        hay.extend(units[i % len(units)])
        bounds.append(min(len(hay), room))
        i += 1
    hay = hay[:room]
    cut = min(bounds, key=lambda b: abs(b - depth * room))
    return intro + hay[:cut] + key + hay[cut:] + question


class _Task:
    """One retrieval task for one tokenizer: makes the prompt and answer of sample (n, depth, k)."""

    def __init__(self, task: str, tokenizer, seed: int, documents=None, template: str = "standard"):
        if (task, template) not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(get_args(Template))}, got {template!r}")
        self.task, self.tok, self.seed = task, tokenizer, seed
        intro, self.key_text, self.question_text = TEMPLATES[task, template]
        self.intro = _ids(tokenizer, intro)
        if task == "passkey":
            self.filler = [_ids(tokenizer, s) for s in FILLER]
        else:
            docs = load_documents(documents)
            self.names = sorted(docs)
            self.lines = {}
            for name in self.names:  # every line with its newline, tokenised once
                lines = [ln + "\n" for ln in docs[name].splitlines() if ln.strip()]
                self.lines[name] = tokenizer(lines, add_special_tokens=False)["input_ids"]

    def trial(self, n: int, depth_index: int, depth: float, k: int) -> tuple[list[int], str]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + n * 7_919 + depth_index * 104_729 + k) % (2**62))
        if self.task == "passkey":
            answer, place = str(int(torch.randint(10_000, 100_000, (1,), generator=gen))), ""
            start = int(torch.randint(0, len(self.filler), (1,), generator=gen))
            units = self.filler[start:] + self.filler[:start]
        else:
            answer = str(int(torch.randint(1_000_000, 10_000_000, (1,), generator=gen)))
            place = PLACES[int(torch.randint(0, len(PLACES), (1,), generator=gen))]
            lines = self.lines[self.names[int(torch.randint(0, len(self.names), (1,), generator=gen))]]
            start = int(torch.randint(0, len(lines), (1,), generator=gen))
            units = lines[start:] + lines[:start]
        key = _ids(self.tok, self.key_text.format(answer=answer, place=place))
        question = _ids(self.tok, self.question_text.format(place=place))
        return assemble(self.intro, units, key, question, n, depth), answer

    def answer_tokens(self, answer: str) -> int:
        return len(_ids(self.tok, f" {answer}.")) + 1


def first_number(text: str) -> str | None:
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


def retrieval_accuracy(
    loaded,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    *,
    seed: int = 0,
    documents=None,
    template: str = "standard",
) -> dict:
    """{"grid": {n: {depth: accuracy}}, "mean": accuracy, "records": [per sample]} for one loaded model."""
    maker = _Task(task, loaded.tokenizer, seed, documents, template)
    grid, records = {}, []
    jobs = [(n, i, d, k) for n in lengths for i, d in enumerate(depths) for k in range(samples)]
    for n, i, d, k in tqdm(jobs, desc=f"{loaded.name} {task}", leave=False):
        ids, answer = maker.trial(n, i, d, k)
        new = maker.answer_tokens(answer)
        with fixed_clex_t(loaded.model, n + new):
            out = greedy_decode(loaded.model, torch.tensor(ids), new)
        text = loaded.tokenizer.decode(out, skip_special_tokens=True)
        ok = first_number(text) == answer
        grid.setdefault(n, {}).setdefault(d, []).append(ok)
        records.append({"length": n, "depth": d, "sample": k, "answer": answer, "output": text, "correct": ok})
    grid = {n: {d: sum(v) / len(v) for d, v in row.items()} for n, row in grid.items()}
    return {"grid": grid, "mean": sum(r["correct"] for r in records) / len(records), "records": records}


def _run(
    task: str,
    models,
    *,
    lengths,
    depths,
    samples,
    documents,
    template,
    seed,
    device,
    dtype,
    out_dir,
    name,
    plot,
    overwrite,
) -> dict:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    check_results(out_dir, name, overwrite=overwrite)
    check_count("samples", samples)
    if (task, template) not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(get_args(Template))}, got {template!r}")
    depths = parse_fractions(depths, "depths")
    device, dtype = check_device(device), check_dtype(dtype)
    specs = check_models(models)
    lengths = parse_ints(lengths, "lengths") if lengths is not None else None
    if task == "needle":
        load_documents(documents)  # a bad document source is refused before any model is loaded
    config = {
        "task": task,
        "lengths": lengths,
        "depths": depths,
        "samples": samples,
        "template": template,
        "device": device,
        "dtype": dtype,
        "documents": None if task == "passkey" else str(documents or "embedded held-out plays"),
    }
    out = {}
    for loaded in each_model(specs, seed=seed, device=device, dtype=dtype):  # one model in memory at a time
        if lengths is None:
            lengths = config["lengths"] = default_lengths(loaded, (1, 2, 4, 8))
        check_lengths_fit(loaded, lengths)
        res = retrieval_accuracy(
            loaded, task, lengths, depths, samples, seed=seed, documents=documents, template=template
        )
        out[loaded.name] = {"spec": loaded.spec, "original_length": loaded.original_length, **res}
        del loaded
    payload = {"task": task, "config": config, "seed": seed, "models": out}
    rows = [
        {"model": m, "length": n, **{f"depth {d:g}": a for d, a in row.items()}, "mean": sum(row.values()) / len(row)}
        for m, v in out.items()
        for n, row in v["grid"].items()
    ]
    return finish_run(
        out_dir,
        name,
        payload,
        rows,
        title=f"{task} retrieval accuracy ({samples} samples a cell)",
        notes="Cells: the fraction of samples whose first generated number is the key.",
        plot=_plot_retrieval if plot else None,
    )


def _plot_retrieval(payload: dict, png):
    from .plot import plot_retrieval

    return plot_retrieval(payload, png)


def run_passkey(
    models: Sequence[str | tuple] = (),
    *,
    lengths: Sequence[int] | str | None = None,
    depths: Sequence[float] | str = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 10,
    template: Template = "standard",
    seed: int = 0,
    device: str = "cpu",
    dtype: DType | None = None,
    out_dir: str = "runs/eval",
    name: str = "passkey",
    plot: bool = True,
    overwrite: bool = False,
) -> dict:
    """Passkey retrieval: accuracy by prompt length x depth of a 5-digit key in filler text (greedy).

    Writes <name>.json, <name>.md and the heatmap <name>.png in out_dir.

    Args:
        models: model specs [NAME=]PATH[:METHOD[:K=V,...]] (see clex.eval.specs), or (name, model, tokenizer) triples
        lengths: prompt lengths in tokens, integers >= 2 (default: 1, 2, 4, 8 x the first model's training length)
        depths: where the key sits, fractions of the haystack in [0, 1], e.g. 0,0.5,1
        samples: keys per (length, depth) cell, >= 1
        template: prompt wording: standard (YaRN's) or compact (~40 tokens, for byte-level miniature models)
        seed: seed of the keys and haystacks (the same for every model)
        device: cpu, cuda, cuda:N or mps
        dtype: float32, bfloat16 or float16 (default: as saved)
        out_dir: folder of the results (<name>.json, <name>.md, the heatmap <name>.png)
        name: file stem of the results (a plain name: nothing is written outside out_dir)
        plot: draw the heatmap <name>.png
        overwrite: replace an earlier result of the same out_dir and name (else refused); other files stay
    """
    return _run(
        "passkey",
        models,
        lengths=lengths,
        depths=depths,
        samples=samples,
        documents=None,
        template=template,
        seed=seed,
        device=device,
        dtype=dtype,
        out_dir=out_dir,
        name=name,
        plot=plot,
        overwrite=overwrite,
    )


def run_needle(
    models: Sequence[str | tuple] = (),
    *,
    lengths: Sequence[int] | str | None = None,
    depths: Sequence[float] | str = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 5,
    documents: str | None = None,
    template: Template = "standard",
    seed: int = 0,
    device: str = "cpu",
    dtype: DType | None = None,
    out_dir: str = "runs/eval",
    name: str = "needle",
    plot: bool = True,
    overwrite: bool = False,
) -> dict:
    """Needle in a haystack: accuracy by length x depth of a 'magic number' sentence hidden in real text.

    The haystack is real text from a random line; otherwise as ``clex eval passkey``. Writes JSON, Markdown,
    heatmap.

    Args:
        models: model specs [NAME=]PATH[:METHOD[:K=V,...]] (see clex.eval.specs), or (name, model, tokenizer) triples
        lengths: prompt lengths in tokens, integers >= 2 (default: 1, 2, 4, 8 x the first model's training length)
        depths: where the key sits, fractions of the haystack in [0, 1], e.g. 0,0.5,1
        samples: keys per (length, depth) cell, >= 1
        documents: the haystack's text: a .txt/.md/.jsonl file, a folder of them or a saved dataset (default: the held-out plays)
        template: prompt wording: standard (YaRN's) or compact (~40 tokens, for byte-level miniature models)
        seed: seed of the keys and haystacks (the same for every model)
        device: cpu, cuda, cuda:N or mps
        dtype: float32, bfloat16 or float16 (default: as saved)
        out_dir: folder of the results (<name>.json, <name>.md, the heatmap <name>.png)
        name: file stem of the results (a plain name: nothing is written outside out_dir)
        plot: draw the heatmap <name>.png
        overwrite: replace an earlier result of the same out_dir and name (else refused); other files stay
    """
    return _run(
        "needle",
        models,
        lengths=lengths,
        depths=depths,
        samples=samples,
        documents=documents,
        template=template,
        seed=seed,
        device=device,
        dtype=dtype,
        out_dir=out_dir,
        name=name,
        plot=plot,
        overwrite=overwrite,
    )
