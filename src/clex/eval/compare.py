"""One model for every length: each model's perplexity over the best model's, length by length.

    ratio(m, n) = ppl(m, n) / min over models m' of ppl(m', n)          (1.00 = the best model at length n)
    worst(m)    = max over lengths n of ratio(m, n)

A model that wins at one length and collapses at another has a large ``worst``; a model that is never far
behind whoever is best has ``worst`` close to 1: the claim CLEX makes. The inputs are the JSON files of
``clex eval ppl`` (:func:`clex.eval.perplexity.run_ppl`); a model that several files hold (the same name,
e.g. one file per seed), or the members of a ``--groups`` entry, count as one model: the mean of their
perplexities, with the range kept beside it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from .report import check_results, finish_run, result_files


def ppl_by_length(payload: dict, *, source: str = "the payload") -> dict[str, dict[int, float]]:
    """``{model: {length: ppl}}`` from a ``clex eval ppl`` payload; a ValueError naming ``source`` otherwise."""
    models = payload.get("models") if isinstance(payload, dict) else None
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{source} is not a result of `clex eval ppl`: it has no 'models' table")
    out: dict[str, dict[int, float]] = {}
    for name, entry in models.items():
        results = entry.get("results") if isinstance(entry, dict) else None
        if not isinstance(results, dict):
            raise ValueError(f"{source}: model {name!r} has no 'results' by length")
        row = {}
        for length, cell in results.items():
            if not str(length).isdigit() or not isinstance(cell, dict) or not isinstance(cell.get("ppl"), (int, float)):
                raise ValueError(f"{source}: model {name!r} has no perplexity at length {length!r}")
            row[int(length)] = float(cell["ppl"])
        out[name] = row
    return out


def ratio_to_best(table: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """``{model: {length: ppl / best ppl at that length}}`` over the lengths every model has."""
    if not table:
        raise ValueError("ratio_to_best needs at least one model")
    lengths = sorted(set.intersection(*(set(row) for row in table.values())))
    if not lengths:
        raise ValueError("ratio_to_best: the models share no length")
    best = {n: min(row[n] for row in table.values()) for n in lengths}
    return {name: {n: row[n] / best[n] for n in lengths} for name, row in table.items()}


def _merge(files: Sequence[str], groups: dict[str, list[str]]) -> dict[str, dict[int, list[float]]]:
    """Every file's models, grouped: ``{group or model: {length: [ppl of each member]}}``."""
    member_of = {m: g for g, members in groups.items() for m in members}
    merged: dict[str, dict[int, list[float]]] = {}
    seen: set[str] = set()
    for file in files:
        path = Path(file)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path} as JSON: {e}") from None
        for model, row in ppl_by_length(payload, source=str(path)).items():
            seen.add(model)
            for length, ppl in row.items():
                merged.setdefault(member_of.get(model, model), {}).setdefault(length, []).append(ppl)
    missing = sorted(set(member_of) - seen)
    if missing:
        raise ValueError(f"--groups names models that no result holds: {', '.join(missing)}")
    return merged


def run_compare(
    results: Sequence[str] = (),
    *,
    groups: Sequence[str] | None = None,
    out_dir: str = "runs/compare",
    name: str = "compare",
    plot: bool = True,
    overwrite: bool = False,
) -> dict:
    """Each model's perplexity over the best model's at each length, and its worst ratio (JSON + Markdown + PNG).

    Args:
        results: JSON files written by `clex eval ppl`; a model in several files is averaged (e.g. its seeds)
        groups: NAME=MODEL,MODEL,... : average these models as one (e.g. far=far-s0,far-s1,far-s2)
        out_dir: folder for <name>.json, <name>.md and <name>.png
        name: file stem of the outputs (a plain name: nothing is written outside out_dir)
        plot: draw the ratios against length
        overwrite: replace an earlier result of the same out_dir and name (never an input); other files stay
    """
    targets = {f.resolve() for f in result_files(out_dir, name)}
    clash = next((r for r in results or () if Path(r).resolve() in targets), None)
    if clash is not None:
        raise ValueError(
            f"out_dir/name: the comparison would overwrite its input {clash}; pick another out_dir or name"
        )
    check_results(out_dir, name, overwrite=overwrite)
    if not results:
        raise ValueError("results: give at least one JSON file of `clex eval ppl`")
    parsed: dict[str, list[str]] = {}
    for entry in groups or ():
        group, sep, members = str(entry).partition("=")
        if not sep or not group or not members:
            raise ValueError(f"groups entry {entry!r} must be NAME=MODEL,MODEL,...")
        parsed[group] = [m for m in members.split(",") if m]
    merged = _merge(results, parsed)
    mean = {m: {n: statistics.fmean(v) for n, v in row.items()} for m, row in merged.items()}
    ratios = ratio_to_best(mean)
    lengths = sorted(next(iter(ratios.values())))
    models = {
        m: {
            "members": len(next(iter(merged[m].values()))),
            "ppl": {n: mean[m][n] for n in lengths},
            "ppl_range": {n: [min(merged[m][n]), max(merged[m][n])] for n in lengths},
            "ratio": ratios[m],
            "worst": max(ratios[m].values()),
        }
        for m in merged
    }
    rows = [
        {"model": m, **{str(n): e["ratio"][n] for n in lengths}, "worst": e["worst"], "runs": e["members"]}
        for m, e in sorted(models.items(), key=lambda kv: kv[1]["worst"])
    ]
    payload = {
        "task": "compare",
        "config": {"results": [str(r) for r in results], "groups": parsed, "lengths": lengths},
        "seed": None,
        "models": models,
    }
    notes = (
        "Each cell: the model's perplexity over the lowest perplexity of any model at that length (1.000 = best); "
        "`worst`: the largest over lengths; `runs`: results averaged (seeds)."
    )
    return finish_run(
        out_dir,
        name,
        payload,
        rows,
        title="Ratio to the best model at each length",
        notes=notes,
        plot=_plot if plot else None,
    )


def _plot(payload: dict, out: Path) -> Path:
    from .plot import plot_ratios

    return plot_ratios(payload, out)


__all__ = ["ppl_by_length", "ratio_to_best", "run_compare"]
