"""The documents an evaluation reads: the held-out plays by default, or the user's texts, and their tokens."""

from __future__ import annotations

from pathlib import Path


def load_documents(documents: str | Path | dict | None = None) -> dict[str, str]:
    """{name: text}: None = the held-out plays of the embedded corpus; a dict is taken as is (names to texts);
    a path is read by :func:`clex.data.texts.read_documents`, the reader training uses (.txt/.md files,
    .jsonl lines, folders of them, saved datasets; errors name the file)."""
    if documents is None:
        from ..data.corpus import split_plays

        return split_plays()[1]
    if not isinstance(documents, dict):
        from ..data.texts import read_documents

        return read_documents(documents, what="documents")
    bad = [k for k, v in documents.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"documents: a dict must map names to text strings; not a string: {bad[:3]}")
    docs = {str(k): v for k, v in documents.items() if v.strip()}
    if not docs:
        raise ValueError("documents: the dict given holds no text: every document is empty")
    return docs


def tokenize_documents(tokenizer, docs: dict[str, str]) -> dict[str, list[int]]:
    """{name: token ids} without special tokens (a document is scored as plain continuing text)."""
    return {k: list(tokenizer(v, add_special_tokens=False)["input_ids"]) for k, v in docs.items()}
