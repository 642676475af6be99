"""Writing results: one JSON (payload + versions + time) and one Markdown table per run, shared by pipelines.

    paths = write_results("runs/eval", "ppl", payload, rows, title="Perplexity")
    # -> {"json": runs/eval/ppl.json, "markdown": runs/eval/ppl.md}

Every file is written atomically (:func:`clex.core.io.atomic_write_text`): a killed run leaves the old result
or the new one, never half a file. :func:`finish_run` is the tail every evaluation shares: write the JSON and
the table, draw the plot, and record the paths in the payload.

The rule of every command that writes results: :func:`check_results` runs before any work. The name must be a
plain file stem (nothing is written outside ``out_dir``), and an earlier result of the same ``out_dir`` and
``name`` (any of ``<name>.json``, ``.md``, ``.png``, ``.partial.json``) is refused unless ``overwrite`` (the
CLI's ``--overwrite``), which replaces those files and nothing else in the folder.

``rows`` are dicts with the same keys (the table's columns, in first-seen order unless ``columns`` is given).
Non-finite floats become ``null`` in JSON (strict JSON has no NaN/inf) and "inf"/"nan" in the table.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.checks import check_name
from ..core.io import atomic_write_text

#: the files of one result, by suffix: what check_results guards and overwrite replaces
RESULT_SUFFIXES = (".json", ".md", ".png", ".partial.json")


def versions() -> dict[str, str]:
    """Versions of what produced a result: python, torch, transformers, clex, the platform."""
    import torch
    import transformers

    from .._version import __version__

    return {
        "clex": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda or "none",
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a 0-d tensor or numpy scalar
        return _jsonable(value.item())
    return value


def format_cell(value: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals (one from 100, scientific past 1e6 or below 1e-3), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub Markdown table of ``rows`` (dicts); missing cells are '-'."""
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def result_files(out_dir: str | Path, name: str) -> list[Path]:
    """The files a result named ``name`` in ``out_dir`` consists of (:data:`RESULT_SUFFIXES`)."""
    return [Path(out_dir) / f"{name}{suffix}" for suffix in RESULT_SUFFIXES]


def check_results(out_dir: str | Path, name: str, *, overwrite: bool = False) -> Path:
    """Check where a result will go, before any work: ``name`` a plain file stem, ``out_dir`` not a file, and no
    earlier result of that name there unless ``overwrite`` (its files are replaced by :func:`finish_run` only
    when the new result is written: a failed run leaves the earlier one). Returns out_dir as a Path."""
    check_name(name, "name")
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file, not a folder; pick a folder for the results")
    found = [f for f in result_files(out, name) if f.exists()]
    if found and not overwrite:
        raise ValueError(
            f"{found[0]} exists (an earlier result named {name!r}); pass --overwrite (overwrite=True) to replace "
            "that result, or pick another --name or --out-dir"
        )
    for file in found:
        if file.is_dir():
            raise ValueError(f"{file} is a folder, not a result file; move it away or pick another --name")
    return out


def write_results(
    out_dir: str | Path,
    name: str,
    payload: dict,
    rows: Sequence[dict],
    *,
    columns: Sequence[str] | None = None,
    title: str | None = None,
    notes: str | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` (payload + versions + time) and ``<out_dir>/<name>.md`` (the table).

    The payload should carry its own ``config`` and ``seed``; ``versions`` and ``written_at`` are added
    when missing. Returns {"json": path, "markdown": path}.
    """
    check_name(name, "name")
    out = Path(out_dir)
    payload = {**payload}
    payload.setdefault("versions", versions())
    payload.setdefault("written_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    atomic_write_text(json_path, json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    parts = [f"# {title or name}\n", markdown_table(rows, columns)]
    if notes:
        parts.append(notes.strip() + "\n")
    v = payload["versions"]
    parts.append(
        f"_clex {v.get('clex')}, torch {v.get('torch')}, transformers {v.get('transformers')}; "
        f"seed {payload.get('seed', '-')}; full results in `{json_path.name}`._\n"
    )
    atomic_write_text(md_path, "\n".join(parts))
    return {"json": json_path, "markdown": md_path}


def finish_run(
    out_dir: str | Path,
    name: str,
    payload: dict,
    rows: Sequence[dict],
    *,
    title: str,
    notes: str,
    plot: Callable[[dict, Path], Path] | None = None,
) -> dict:
    """The tail of every evaluation: :func:`write_results`, then ``plot(payload, <out_dir>/<name>.png)`` if
    given; the result's other files (an earlier result's plot, the partial file) are removed; the written paths
    go into ``payload["paths"]`` (as strings). Returns the payload."""
    paths = write_results(out_dir, name, payload, rows, title=title, notes=notes)
    if plot is not None:
        paths["png"] = plot(payload, Path(out_dir) / f"{name}.png")
    written = {Path(p) for p in paths.values()}
    for file in result_files(out_dir, name):  # what is left of the result replaced (e.g. its plot), the partial file
        if file not in written and file.is_file():
            file.unlink()
    payload["paths"] = {k: str(v) for k, v in paths.items()}
    return payload
