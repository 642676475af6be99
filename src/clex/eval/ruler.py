"""RULER (Hsieh et al., 2024) through lm-evaluation-harness, offline: score by task x length, per model.

For each model and each length n, the chosen RULER tasks of lm-eval (0.4.x, ``lm_eval.tasks.ruler``) run
through ``lm_eval.simple_evaluate`` on the model wrapped by :func:`clex.eval.harness.clex_lm` (a CLEX model
generates with t fixed to the t of its prompt + answer). lm-eval's own task configs (prompt, answer prefix,
greedy decoding, ``max_gen_toks``, the string-match metric) are used as they are; only the data set is ours:
the samples of :mod:`clex.eval.ruler_tasks` (lm-eval's own generators, the model's tokenizer, seeded per cell),
generated once per tokenizer and reused, so every model with the same tokenizer sees the same prompts.

A cell's score is the mean over its samples of RULER's string-match score (the fraction of the expected
strings found in the output); its standard error is the samples' standard deviation / sqrt(samples)
(0 when every sample scores alike: then ``samples`` alone says how sure the cell is). Runs made apart (one
process a model) merge into one table (:func:`merge_ruler`).

NLTK's ``punkt_tab`` (which ``prepare_niah`` tries to download when it is imported) is used only by the essay
haystack: a run points NLTK at an empty stand-in folder so that nothing is fetched, and a task that did need
it would fail loudly (LookupError).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from ..core.checks import DType, check_count, check_device, check_dtype, parse_ints
from ..core.io import atomic_write_text
from .harness import clex_lm, missing_lm_eval
from .report import check_results, finish_run, result_files
from .ruler_tasks import SKIPPED, TASKS, RulerTask, check_tasks, generate
from .specs import check_lengths_fit, check_models, each_model

#: room HFLM gets beyond n, so that it never cuts a prompt: lm-eval appends the answer prefix (up to ~100
#: tokens for a byte tokenizer) to RULER's prompt of n - max_gen_toks tokens
_SLACK = 256


def _lm_eval_version() -> str:
    try:
        import lm_eval
    except ImportError as e:
        raise missing_lm_eval("clex eval ruler", e) from None
    return lm_eval.__version__


@contextlib.contextmanager
def _offline(folder: Path):
    """No hub, no datasets download, and NLTK pointed at an empty stand-in for punkt_tab (module docstring)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import nltk

    stand_in = folder / "nltk_data"
    (stand_in / "tokenizers" / "punkt_tab").mkdir(parents=True, exist_ok=True)
    added = False
    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        nltk.data.path.insert(0, str(stand_in))
        added = True
    try:
        yield
    finally:
        if added:
            nltk.data.path.remove(str(stand_in))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def _dataset(records: list[dict], **_metadata):
    """lm-eval's custom_dataset: our records as the test split (lm-eval passes the task's metadata: unused)."""
    import datasets

    return {"test": datasets.Dataset.from_list(records, split=datasets.Split.TEST)}


def _score(record: dict, key: str) -> float:
    value = record.get(key)
    if value is None:
        raise RuntimeError(f"lm-eval's sample record has no metric {key!r}; keys: {sorted(record)[:12]}")
    return float(value)


def mean_and_stderr(scores: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error = sample std (n-1) / sqrt(n)); the error is None for a single score."""
    n = len(scores)
    mean = sum(scores) / n
    if n < 2:
        return mean, None
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, math.sqrt(var / n)


def _task_configs(manager, tasks: list[str], records: dict[str, list[dict]], length: int) -> list[dict]:
    """lm-eval's own config of each task (its YAML, includes resolved), our data set, one metric: str(length)."""
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.tasks.ruler import common_utils

    out = []
    for task in tasks:
        cfg = load_yaml(manager.task_index[task].yaml_path, resolve_func=True)
        for key in ("tag", "group"):
            cfg.pop(key, None)
        cfg["custom_dataset"] = partial(_dataset, records[task])
        cfg["metric_list"] = [
            {"metric": str(length), "aggregation": common_utils.aggregate_metrics, "higher_is_better": True}
        ]
        out.append(cfg)
    return out


def ruler_scores(
    lm, tokenizer, tasks: list[str], length: int, samples: int, *, seed: int, cache: dict, manager
) -> dict:
    """{task: {"score", "stderr", "samples", "records"}} of one lm-eval model at one length."""
    import lm_eval

    key = _fingerprint(tokenizer)
    records = {}
    for task in tasks:
        cell = (key, task, length, samples, seed)
        if cell not in cache:
            cache[cell] = generate(task, tokenizer, length, samples, seed)
        records[task] = cache[cell]
    result = lm_eval.simple_evaluate(
        model=lm,
        tasks=_task_configs(manager, tasks, records, length),
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    out = {}
    for task in tasks:
        logged = sorted(result["samples"][task], key=lambda r: r["doc_id"])
        scores = [_score(r, str(length)) for r in logged]
        mean, stderr = mean_and_stderr(scores)
        out[task] = {
            "score": mean,
            "stderr": stderr,
            "samples": len(scores),
            "records": [
                {
                    "index": r["doc"].get("index"),
                    "tokens": r["doc"].get("length"),
                    "answers": r["doc"]["outputs"],
                    "output": (r.get("filtered_resps") or r.get("resps") or [""])[0],
                    "score": s,
                }
                for r, s in zip(logged, scores)
            ],
        }
    return out


def _cell_text(score: float | None, stderr: float | None) -> str:
    if score is None:
        return "-"
    return f"{score:.2f}" + (f" ± {stderr:.2f}" if stderr is not None else "")


def run_ruler(
    models: Sequence[str | tuple] = (),
    *,
    lengths: Sequence[int] | str = (8192, 16384, 32768, 65536),
    tasks: Sequence[RulerTask] | str = tuple(TASKS),
    samples: int = 10,
    batch_size: int = 1,
    seed: int = 0,
    device: str = "cpu",
    dtype: DType | None = None,
    out_dir: str = "runs/eval",
    name: str = "ruler",
    plot: bool = True,
    overwrite: bool = False,
) -> dict:
    """RULER's offline tasks through lm-evaluation-harness: score by task x length, with standard errors.

    Needs lm-eval (pip install -e '.[ruler]'); runs with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1, the data made
    locally by lm-eval's RULER generators with each model's own tokenizer. Writes <name>.json, <name>.md and
    the heatmap <name>.png (task x length, one panel per model) in out_dir. The essay-haystack and QA tasks
    need downloads and are skipped (the JSON says why).

    Args:
        models: model specs [NAME=]PATH[:METHOD[:K=V,...]] (see clex.eval.specs), or (name, model, tokenizer) triples
        lengths: prompt lengths in tokens (the RULER sequence length, prompt + answer), e.g. 8192 16384 or 8192,16384
        tasks: offline RULER tasks of lm-eval: niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe (default: all six; the others need downloads and are refused with the reason)
        samples: samples per (task, length) cell, >= 1 (standard error ~ 0.5 / sqrt(samples) at worst)
        batch_size: prompts generated together (lm-eval's batch_size; left-padded)
        seed: seed of the samples (the same for every model with the same tokenizer)
        device: cpu, cuda, cuda:N or mps
        dtype: float32, bfloat16 or float16 (default: as saved)
        out_dir: folder of the results (<name>.json, <name>.md, the heatmap <name>.png; <name>.partial.json while it runs)
        name: file stem of the results (a plain name: nothing is written outside out_dir)
        plot: draw the heatmap <name>.png
        overwrite: replace an earlier result of the same out_dir and name (else refused); other files stay
    """
    check_results(out_dir, name, overwrite=overwrite)  # before anything is written: the partial file too
    version = _lm_eval_version()
    tasks = check_tasks(tasks)
    lengths = parse_ints(lengths, "lengths")
    check_count("samples", samples)
    check_count("batch_size", batch_size)
    device, dtype = check_device(device), check_dtype(dtype)
    specs = check_models(models)
    config = {
        "lengths": lengths,
        "tasks": tasks,
        "samples": samples,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "lm_eval": version,
        "metric": "RULER string match (lm-eval), mean over samples",
    }
    out, cache = {}, {}
    progress = result_files(out_dir, name)[-1]  # <name>.partial.json, removed when the result is written
    with tempfile.TemporaryDirectory(prefix="clex-ruler-") as tmp, _offline(Path(tmp)):
        import lm_eval.tasks
        from lm_eval.tasks import TaskManager

        # lm-eval's RULER folder only: indexing all of lm-eval's tasks would take ~15 s
        manager = TaskManager(include_defaults=False, include_path=str(Path(lm_eval.tasks.__file__).parent / "ruler"))
        for loaded in each_model(specs, seed=seed, device=device, dtype=dtype):  # one model in memory at a time
            check_lengths_fit(loaded, [n + _SLACK for n in lengths])
            results: dict[str, dict] = {task: {} for task in tasks}
            for n in lengths:
                lm = clex_lm(loaded.model, loaded.tokenizer, max_length=n + _SLACK, batch_size=batch_size)
                for task, cell in ruler_scores(
                    lm, loaded.tokenizer, tasks, n, samples, seed=seed, cache=cache, manager=manager
                ).items():
                    results[task][n] = cell
                del lm
                # what is done so far survives a time limit or a crash: <name>.partial.json, removed at the end
                done = {**out, loaded.name: {"spec": loaded.spec, "results": results}}
                progress.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(
                    progress,
                    json.dumps({"task": "ruler", "config": config, "seed": seed, "models": done}, default=str) + "\n",
                )
            means = {}
            for n in lengths:
                cells = [results[t][n] for t in tasks]
                errors = [c["stderr"] for c in cells]
                means[n] = {
                    "score": sum(c["score"] for c in cells) / len(cells),
                    "stderr": None if None in errors else math.sqrt(sum(e * e for e in errors)) / len(cells),
                }
            out[loaded.name] = {
                "spec": loaded.spec,
                "original_length": loaded.original_length,
                "results": results,
                "mean": means,
            }
            del loaded
    payload = {"task": "ruler", "config": config, "seed": seed, "models": out, "skipped": SKIPPED}
    return _write(payload, out_dir, name, plot)  # finish_run removes the partial file


def _write(payload: dict, out_dir, name: str, plot: bool) -> dict:
    """<name>.json, .md (a row per model and length) and the heatmap .png of a RULER payload."""
    config = payload["config"]
    rows = [
        {
            "model": m,
            "length": n,
            **{t: _cell_text(v["results"][t][n]["score"], v["results"][t][n]["stderr"]) for t in config["tasks"]},
            "mean": _cell_text(v["mean"][n]["score"], v["mean"][n]["stderr"]),
        }
        for m, v in payload["models"].items()
        for n in config["lengths"]
    ]
    notes = (
        f"Cells: mean RULER string-match score ± its standard error over {config['samples']} samples (lm-eval "
        f"{config['lm_eval']}); mean: over the tasks. Skipped (they need downloads): {'; '.join(SKIPPED)}. "
        "Why, task by task: the JSON's `skipped`."
    )
    return finish_run(
        out_dir,
        name,
        payload,
        rows,
        title=f"RULER through lm-eval ({config['samples']} samples a cell)",
        notes=notes,
        plot=_plot_ruler if plot else None,
    )


#: what must agree between RULER results for them to share one table
_SAME = ("lengths", "tasks", "samples", "lm_eval", "metric", "dtype")


def _cells(where: str, cells, lengths: list[int]) -> dict[int, dict]:
    """``{length: cell}`` of one task (or the mean) of one model, its keys integers, one cell per length."""
    if not isinstance(cells, dict):
        raise ValueError(f"{where} must be a mapping of lengths to cells, got {type(cells).__name__}")
    out = {}
    for key, cell in cells.items():
        if not str(key).isdigit():
            raise ValueError(f"{where} has the length key {key!r}; lengths must be integers")
        if not isinstance(cell, dict) or not isinstance(cell.get("score"), (int, float, type(None))):
            raise ValueError(f"{where} at length {key}: a cell must be a mapping with a numeric 'score'")
        out[int(key)] = cell
    missing = [n for n in lengths if n not in out]
    if missing:
        raise ValueError(f"{where} has no cell at length(s) {missing} of its config's lengths {lengths}")
    return out


def read_ruler(path: str | Path) -> dict:
    """A ``clex eval ruler`` result, checked: every field the merge reads is there, lengths as integers. A
    ValueError of one line naming the file and the field otherwise."""
    where = f"results: {path}"
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"results: cannot read {path} as the JSON of `clex eval ruler` ({' '.join(str(e).split())[:200]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("task") != "ruler" or not isinstance(payload.get("models"), dict):
        raise ValueError(f"{where} is not the JSON of `clex eval ruler` (no task 'ruler' with models)")
    config = payload.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{where} has no 'config' mapping (the run's lengths, tasks, samples)")
    lengths, tasks = config.get("lengths"), config.get("tasks")
    if (
        not isinstance(lengths, list)
        or not lengths
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths)
    ):
        raise ValueError(f"{where}: config.lengths must be a list of integers, got {lengths!r}")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{where}: config.tasks must be a list of task names, got {tasks!r}")
    models = {}
    for model, entry in payload["models"].items():
        here = f"{where}: model {model!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("results"), dict):
            raise ValueError(f"{here} has no 'results' mapping of tasks")
        if "mean" not in entry:
            raise ValueError(f"{here} has no 'mean' (the score over tasks by length)")
        missing = [t for t in tasks if t not in entry["results"]]
        if missing:
            raise ValueError(f"{here} has no results for task(s) {missing} of its config's tasks")
        models[model] = {
            **entry,
            "mean": _cells(f"{here} mean", entry["mean"], lengths),
            "results": {t: _cells(f"{here} task {t!r}", entry["results"][t], lengths) for t in tasks},
        }
    return {**payload, "models": models}


def merge_ruler(
    results: Sequence[str] = (),
    out_dir: str = "runs/eval",
    name: str = "ruler",
    plot: bool = True,
    overwrite: bool = False,
) -> dict:
    """Merge RULER results of separate runs (e.g. one process a model on one GPU) into one table.
    The runs must agree on lengths, tasks, samples, lm-eval version, dtype and seed; each model name may appear
    once; an input is never overwritten (out_dir/<name>.json must not be one of them).

    Args:
        results: the <name>.json files of `clex eval ruler` runs
        out_dir: folder of the merged results (<name>.json, <name>.md, the heatmap <name>.png)
        name: file stem of the merged results (a plain name: nothing is written outside out_dir)
        plot: draw the heatmap <name>.png
        overwrite: replace an earlier result of the same out_dir and name (never an input); other files stay
    """
    if isinstance(results, str):
        results = [results]
    if not results:
        raise ValueError("results: give at least one ruler.json of `clex eval ruler`, got none")
    targets = {f.resolve() for f in result_files(out_dir, name)}
    clash = next((p for p in results if Path(p).resolve() in targets), None)
    if clash is not None:
        raise ValueError(
            f"out_dir/name: the merged table would overwrite its input {clash}; pick another out_dir or name"
        )
    check_results(out_dir, name, overwrite=overwrite)
    merged = None
    for path in results:
        payload = read_ruler(path)
        if merged is None:
            merged = {**payload, "models": {}, "config": dict(payload["config"]), "merged_from": []}
        for key in _SAME:
            if payload["config"].get(key) != merged["config"].get(key):
                raise ValueError(
                    f"results: {path} has {key}={payload['config'].get(key)!r}, the first file "
                    f"{merged['config'].get(key)!r}: only runs with the same {', '.join(_SAME)} merge"
                )
        if payload.get("seed") != merged.get("seed"):
            raise ValueError(f"results: {path} has seed={payload.get('seed')!r}, the first file {merged.get('seed')!r}")
        for model, entry in payload["models"].items():
            if model in merged["models"]:
                raise ValueError(f"results: model {model!r} appears twice (again in {path}); rename one run")
            merged["models"][model] = entry
        merged["merged_from"].append(str(path))
    merged.pop("paths", None)
    return _write(merged, out_dir, name, plot)


def _plot_ruler(payload: dict, png):
    from .plot import plot_ruler

    return plot_ruler(payload, png)
