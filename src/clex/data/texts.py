"""Training text: load documents, hold some out, tokenise and pack them into fixed-length rows.

Sources (:func:`read_documents` -> {name: text}, :func:`load_texts` -> the texts; one set of rules for
training and evaluation alike): nothing (the embedded corpus: the training plays of :mod:`clex.data.corpus`, whose
held-out plays are never touched), a .txt/.md file (one document), a folder of .txt/.md/.jsonl files, a
.jsonl file (one document per line, in ``text_field``), or a ``datasets`` dataset saved with
``save_to_disk`` (its "train" split if it is a DatasetDict).

Packing (:func:`pack`): each document is tokenised without special tokens and followed by EOS; the stream is
cut into rows of ``seq_len`` tokens, the remainder dropped. Rows are what the model sees, labels = inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
EMBEDDED = ("embedded", "corpus", "shakespeare")  # names that mean "the embedded corpus" in a config file


def _read_text(file: Path) -> str:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {file}: it is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e.strerror or e}") from None
    if "\x00" in text:
        raise ValueError(f"cannot read {file}: it is binary, not text (it holds NUL bytes)")
    return text


def _read_jsonl(file: Path, text_field: str, base: str) -> dict[str, str]:
    docs = {}
    for n, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{file}:{n} has no string field {text_field!r} (text_field); found: {keys}")
        name = f"{base}:{row.get('id', n)}"
        if name in docs:
            raise ValueError(f"{file}:{n}: document id {row.get('id', n)!r} occurs twice in the file")
        docs[name] = row[text_field]
    return docs


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_saved_dataset(folder: Path, text_field: str) -> dict[str, str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{folder} is a saved `datasets` dataset; reading it needs: pip install datasets") from None
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{folder} is a DatasetDict without a 'train' split; splits: {', '.join(ds)}")
        ds = ds["train"]
    if text_field not in ds.column_names:
        raise ValueError(f"{folder} has no column {text_field!r} (text_field); columns: {', '.join(ds.column_names)}")
    return {f"{folder.name}:{i}": t for i, t in enumerate(ds[text_field]) if isinstance(t, str)}


def _read_file(file: Path, text_field: str, base: str) -> dict[str, str]:
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return {base: _read_text(file)}
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(file, text_field, base)
    raise ValueError(f"{file}: unsupported file type {suffix or '(none)'!r}; allowed: .txt, .md, .jsonl, a folder")


def read_documents(source: str | Path, *, text_field: str = "text", what: str = "data source") -> dict[str, str]:
    """{name: text} of every non-empty document in ``source`` (a path), by the rules of the module docstring.

    Names: a .txt/.md file's path without its suffix (relative to the folder read, e.g. ``plays/hamlet``);
    a .jsonl line's ``<file>:<id>`` (its "id" field, else its line number); a saved dataset's ``<folder>:<row>``.
    Raises FileNotFoundError for a missing path (``what`` names it: "data source", "documents"), ValueError
    naming the file for a binary or non-UTF-8 file, bad JSON, a missing text field, a file type we do not read,
    or a source without any non-empty document.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found: {path} (expected a .txt/.md/.jsonl file, a folder or a saved dataset)"
        )
    if path.is_dir():
        if _is_saved_dataset(path):
            docs = _read_saved_dataset(path, text_field)
        else:
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
            )
            if not files:
                raise ValueError(f"{path} holds no .txt, .md or .jsonl files (nor a dataset saved with save_to_disk)")
            docs = {}
            for f in files:
                docs.update(_read_file(f, text_field, f.relative_to(path).with_suffix("").as_posix()))
    else:
        docs = _read_file(path, text_field, path.stem)
    docs = {k: v for k, v in docs.items() if v.strip()}
    if not docs:
        raise ValueError(f"{path} holds no text: every document is empty")
    return docs


def load_texts(source: str | Path | None = None, *, text_field: str = "text") -> list[str]:
    """Documents (non-empty strings) from ``source``; None = the embedded corpus's training plays.

    The texts of :func:`read_documents` (same rules, same errors, each naming the file).
    """
    if source is None or (isinstance(source, str) and source.lower() in EMBEDDED):
        from .corpus import split_plays

        return list(split_plays()[0].values())
    return list(read_documents(source, text_field=text_field).values())


def split_documents(texts: list[str], held_out: float = 0.05, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: a seeded random ``held_out`` fraction of the documents (at least one
    when held_out > 0). With a single document, its last ``held_out`` fraction of characters is held out."""
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out must be a fraction in [0, 1), got {held_out!r}")
    if held_out == 0 or not texts:
        return list(texts), []
    if len(texts) == 1:
        cut = int(len(texts[0]) * (1 - held_out))
        return [texts[0][:cut]], [texts[0][cut:]]
    n = min(len(texts) - 1, max(1, round(held_out * len(texts))))
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:n])
    return [t for i, t in enumerate(texts) if i not in chosen], [t for i, t in enumerate(texts) if i in chosen]
