"""Training rows: tokenise the documents of :mod:`clex.data.texts` and pack them into fixed-length rows.

Packing (:func:`pack`): each document is tokenised without special tokens and followed by EOS; the stream is
cut into rows of ``seq_len`` tokens, the remainder dropped. Rows are what the model sees, labels = inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..data.texts import load_texts, split_documents


def pack(texts: list[str], tokenizer, seq_len: int, *, name: str = "the texts") -> Tensor:
    """Tokenise ``texts``, join them with EOS (one after each document) and cut into rows.  -> [N, seq_len] int64

    ``name`` says where the texts came from, for the error when they make no full row.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: packing needs one to separate documents")
    ids: list[int] = []
    for doc in tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []:
        ids.extend(doc)
        ids.append(eos)
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(
            f"{name} give {len(ids)} tokens, fewer than one row of seq_len={seq_len}: "
            "give more or longer documents, or a smaller seq_len"
        )
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)  # [N, seq_len]


def prepare_data(
    source: str | Path | None,
    tokenizer,
    seq_len: int,
    *,
    held_out: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
) -> tuple[Tensor, Tensor | None]:
    """(training rows [N, seq_len], held-out rows [M, seq_len] or None when held_out = 0)."""
    texts = load_texts(source, text_field=text_field)
    train, held = split_documents(texts, held_out, seed=seed)
    where = "the embedded corpus" if source is None else str(source)
    rows = pack(train, tokenizer, seq_len, name=f"the training documents of {where}")
    eval_rows = (
        pack(held, tokenizer, seq_len, name=f"the held-out documents of {where} (held_out={held_out})")
        if held
        else None
    )
    return rows, eval_rows


def epoch_order(n_rows: int, epoch: int, seed: int) -> Tensor:
    """The row order of one epoch: a permutation that depends on (seed, epoch) only.  -> [n_rows]"""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def rows_at(rows: Tensor, start: int, count: int, seed: int) -> Tensor:
    """Rows ``start .. start+count-1`` of the endless stream of shuffled epochs.  -> [count, seq_len]

    The stream position ``start`` is all the trainer stores to resume the data exactly.
    """
    n = rows.shape[0]
    orders: dict[int, Tensor] = {}
    picks = []
    for k in range(start, start + count):
        epoch, i = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, epoch, seed)
        picks.append(int(orders[epoch][i]))
    return rows[picks]
