"""What every evaluation shares: model specs, loading, CLEX's fixed t, and the held-out documents.

A **model spec** names one model (or one RoPE method on a model) to evaluate, as a string::

    [NAME=]PATH[:METHOD[:KEY=VALUE[,KEY=VALUE...]]]

- ``PATH``: a local model folder: ours (saved with CLEX), the authors' released layout, or a plain
  transformers folder; read by :func:`clex.load_model`, tokenizer by ``AutoTokenizer`` from the same folder.
  ``smollm2`` (when no such folder exists) is the embedded SmolLM2-135M GGUF (:func:`clex.sources.smollm2.load_smollm2`;
  ``smollm2:clex:...`` applies CLEX fresh, ``smollm2:yarn:factor=4`` a transformers scaling).
- ``METHOD``: a RoPE scaling applied through transformers' own ``rope_parameters`` (the rotary module is
  rebuilt with its own class, nothing re-implemented): ``linear`` (alias ``pi``), ``dynamic`` (alias ``ntk``),
  ``yarn``, ``longrope``, ``llama3``, ... (the keys of ``ROPE_INIT_FUNCTIONS``); or ``clex``: CLEXConfig
  fields (e.g. ``inference_t=integer``) for a CLEX folder, or CLEX applied fresh to a plain one.
- ``KEY=VALUE``: values are read as JSON (``4`` -> int, ``4.0`` -> float, ``true``), else kept as text.
  ``yarn`` gets ``original_max_position_embeddings`` = the model's ``max_position_embeddings`` unless given.
- ``NAME``: the label in tables and plots; default: the folder name plus the method.

Examples: ``runs/clex``, ``base=runs/base``, ``yarn4=runs/base:yarn:factor=4``, ``runs/base:pi:factor=4``,
``runs/clex:clex:inference_t=integer``.

In Python, an already-built ``(name, model, tokenizer)`` triple is accepted wherever a spec is.

**CLEX and the key cache.** A CLEX model picks t from the number of keys, so the same key would be rotated
with different frequencies as a sequence grows. :func:`fixed_clex_t` pins t, for the duration of a ``with``
block, to the t of the final length, so a chunked forward or a generation uses the frequencies of ONE full
forward over the final length, and every cached key stays exact.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.rotary import CLEXRotaryEmbedding
from ..hf.lookup import find_rotary
from ..hf.methods import ALIASES, apply_rope_override, original_length


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass
class ModelSpec:
    """One model to evaluate: a folder, an optional RoPE method with its parameters, a display name."""

    path: str
    method: str | None = None  # a rope_type of transformers, or "clex"
    params: dict = field(default_factory=dict)
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``[NAME=]PATH[:METHOD[:KEY=VALUE,...]]`` -> ModelSpec (see the module docstring)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a model spec must be a non-empty string like 'name=path:yarn:factor=4', got {text!r}")
        name = None
        head, sep, rest = text.strip().partition(":")
        if "=" in head:
            name, _, head = head.partition("=")
        parts = rest.split(":", 1) if sep else []
        method = ALIASES.get(parts[0].lower(), parts[0].lower()) if parts and parts[0] else None
        params = {}
        for item in filter(None, (parts[1].split(",") if len(parts) > 1 else [])):
            key, eq, val = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"model spec {text!r}: parameters must be KEY=VALUE, got {item!r}")
            params[key.strip()] = _value(val.strip())
        if not head:
            raise ValueError(f"model spec {text!r} has no model path; expected [NAME=]PATH[:METHOD[:KEY=VALUE,...]]")
        return cls(path=head, method=method, params=params, name=name or None)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        base = Path(self.path).name or self.path
        if not self.method:
            return base
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{base}:{self.method}" + (f"({args})" if args else "")


@dataclass
class LoadedModel:
    """A model ready to evaluate: its label, the module, its tokenizer and its training length L."""

    name: str
    model: nn.Module
    tokenizer: Any
    train_length: int | None
    spec: dict


def rotary_of(model) -> nn.Module | None:
    """The model's single RoPE module, or None (no RoPE, or not a torch module, e.g. a test double)."""
    if not isinstance(model, nn.Module):
        return None
    try:
        return find_rotary(model)[1]
    except ValueError:
        return None


def model_device(model) -> torch.device:
    """Where the model's parameters live (cpu for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def train_length_of(model: nn.Module) -> int | None:
    """L: :func:`clex.hf.methods.original_length` for a RoPE model; else the config's max positions, or None."""
    if rotary_of(model) is not None:
        return original_length(model)
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = getattr(config, "max_position_embeddings", None)
    return int(length) if length else None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"model folder {path} has no tokenizer (tokenizer.json or tokenizer_config.json); "
            "save one there with tokenizer.save_pretrained"
        )
    return AutoTokenizer.from_pretrained(path)


def load_spec(spec: str | ModelSpec, *, device: str = "cpu", dtype: str | None = None) -> LoadedModel:
    """Build the model of one spec (a string or :class:`ModelSpec`) on ``device`` in eval mode."""
    from ..core.config import CLEXConfig
    from ..hf.loading import clex_config_of, load_model, read_config

    spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
    path = Path(spec.path)
    if spec.path == "smollm2" and not path.exists():
        from .smollm2 import (
            load_smollm2,  # the embedded GGUF model, converted once to a cached folder
        )

        fresh = CLEXConfig.from_dict(spec.params) if spec.method == "clex" else None
        model, tokenizer = load_smollm2(dtype=dtype or "float32", device=device, clex=fresh)
    else:
        saved, _ = clex_config_of(read_config(path))  # FileNotFoundError for a missing folder
        if spec.method == "clex" and saved is None:
            model = load_model(path, dtype=dtype, device=device, clex=CLEXConfig.from_dict(spec.params))
        else:
            model = load_model(path, dtype=dtype, device=device, **(spec.params if spec.method == "clex" else {}))
        tokenizer = _load_tokenizer(path)
    if spec.method and spec.method != "clex":
        apply_rope_override(model, spec.method, spec.params)
    model.eval()
    info = {"path": spec.path, "method": spec.method, "params": spec.params}
    return LoadedModel(spec.label, model, tokenizer, train_length_of(model), info)


def as_loaded(item, *, device: str = "cpu", dtype: str | None = None) -> LoadedModel:
    """A spec string, a ModelSpec, a LoadedModel, or a (name, model, tokenizer) triple -> LoadedModel."""
    if isinstance(item, LoadedModel):
        return item
    if isinstance(item, tuple):
        if len(item) != 3:
            raise ValueError(f"a built model must be a (name, model, tokenizer) triple, got {len(item)} items")
        name, model, tokenizer = item
        return LoadedModel(str(name), model, tokenizer, train_length_of(model), {"path": None, "built": True})
    return load_spec(item, device=device, dtype=dtype)


def check_models(models) -> list:
    """The models argument as a non-empty list, with unique labels checked later."""
    if isinstance(models, (str, ModelSpec, LoadedModel, tuple)):
        models = [models]
    models = list(models or [])
    if not models:
        raise ValueError("models must name at least one model spec (e.g. 'runs/clex'), got none")
    return models


def unique_names(names: list[str]) -> None:
    """A clear error when two models would share a label (their results would overwrite each other)."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"model names must be unique, got {dupes} more than once; name them with NAME=PATH")


@contextlib.contextmanager
def fixed_clex_t(model: nn.Module, length: int) -> Iterator[float | None]:
    """Within the block, a CLEX model uses the t of ``length`` keys for every forward (yields that t).

    t is what the model's own policy gives a sequence of ``length`` keys, so a chunked forward (or a
    generation) that ends at ``length`` uses the same frequencies as one full forward over ``length``
    tokens, and the key cache stays exact. With ``log_scale`` the query scale is pinned to ``length`` too
    (a full forward's). Models without CLEX are left alone (yields None).
    """
    rot = rotary_of(model)
    if not isinstance(rot, CLEXRotaryEmbedding):
        yield None
        return
    from ..hf.generation import fixed_t

    t = float(rot.t_for_length(torch.tensor([int(length)]))[0])
    with fixed_t(model, t, log_scale_length=int(length)):
        yield t


# --- documents ---------------------------------------------------------------------------------------------


def load_documents(documents: str | Path | dict | None = None) -> dict[str, str]:
    """{name: text}. None: the held-out plays of the embedded corpus; a dict is taken as is; a file: one
    document (.txt, .md) or one per line's "text" (.jsonl); a folder: each .txt / .md file in it."""
    if documents is None:
        from ..sources.corpus import split_plays

        docs = split_plays()[1]
        source = "the held-out plays of the embedded corpus"
    elif isinstance(documents, dict):
        docs, source = dict(documents), "the documents given"
    else:
        path = Path(documents)
        source = str(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".md") and p.is_file())
            docs = {p.stem: p.read_text(encoding="utf-8") for p in files}
        elif path.is_file() and path.suffix == ".jsonl":
            docs = {}
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ValueError(f"{path} line {i + 1}: expected a JSON object with a 'text' string")
                    docs[str(row.get("id", i))] = row["text"]
        elif path.is_file():
            docs = {path.stem: path.read_text(encoding="utf-8")}
        else:
            raise FileNotFoundError(f"documents not found: {path} (expected a .txt/.md/.jsonl file or a folder)")
    docs = {k: v for k, v in docs.items() if v.strip()}
    if not docs:
        raise ValueError(f"the corpus is empty: {source} holds no non-empty document (.txt, .md or .jsonl)")
    return docs


def tokenize_documents(tokenizer, docs: dict[str, str]) -> dict[str, list[int]]:
    """{name: token ids} without special tokens (a document is scored as plain continuing text)."""
    return {k: list(tokenizer(v, add_special_tokens=False)["input_ids"]) for k, v in docs.items()}


def parse_ints(value, field: str) -> list[int]:
    """A list of positive ints from a list or a comma-separated string ("128,256")."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"{field} must be positive integers like '128,256', got {value!r}") from None
    if not out or min(out) < 2:
        raise ValueError(f"{field} must be integers >= 2, got {value!r}")
    return out
