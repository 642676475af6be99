"""What every evaluation shares: model specs, loading, CLEX's fixed t, and the held-out documents.

A **model spec** names one model (or one RoPE method on a model) to evaluate, as a string::

    [NAME=]PATH[:METHOD[:KEY=VALUE[,KEY=VALUE...]]]

- ``PATH``: a local model folder: ours (saved with CLEX), the authors' released layout, or a plain
  transformers folder; read by :func:`clex.load_model`, tokenizer by ``AutoTokenizer`` from the same folder.
  ``smollm2`` (when no such folder exists) is the embedded SmolLM2-135M GGUF (:func:`clex.data.smollm2.load_smollm2`;
  ``smollm2:clex:...`` applies CLEX fresh, ``smollm2:yarn:factor=4`` a transformers scaling).
- ``METHOD``: a name of the one baseline registry :data:`clex.hf.methods.METHODS`, the same names and meanings
  as ``clex train``'s ``method``: ``pi``, ``ntk`` (*static* NTK-aware scaling), ``dynamic-ntk``, ``yarn``,
  ``longrope``, ``llama3``, ``none``; transformers' own rope type names are aliases (``linear`` = ``pi``,
  ``dynamic`` = ``dynamic-ntk``: an old spec ``PATH:dynamic:factor=4`` still means dynamic NTK). Each needs
  ``factor``; the other keys go into ``rope_parameters`` and must be keys that transformers' rope type takes.
  Or ``clex``: CLEXConfig fields (e.g. ``inference_t=integer``) for a CLEX folder, or CLEX applied fresh to a
  plain one (unknown fields are refused).
- ``KEY=VALUE``: values are read as JSON (``4`` -> int, ``4.0`` -> float, ``true``), else kept as text.
  ``yarn`` gets ``original_max_position_embeddings`` = the model's original length L unless given.
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
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.rotary_embedding import CLEXRotaryEmbedding
from ..hf.loading import DTYPES
from ..hf.lookup import find_rotary, text_config
from ..hf.methods import method_name, original_length_of, prepare_model


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(text: str, where: str) -> dict:
    """``KEY=VALUE,...`` -> dict, each value read as JSON where it parses (true, 8, 0.5), else kept as a string;
    ``where`` names the input in the error for an item without ``=``."""
    params = {}
    for item in filter(None, text.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{where}: parameters must be KEY=VALUE, got {item!r}")
        params[key.strip()] = _value(val.strip())
    return params


@dataclass
class ModelSpec:
    """One model to evaluate: a folder, an optional RoPE method with its parameters, a display name."""

    path: str
    method: str | None = None  # a name of clex.hf.methods.METHODS (aliases resolved)
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
        method = method_name(parts[0]) if parts and parts[0] else None
        params = parse_params(parts[1] if len(parts) > 1 else "", f"model spec {text!r}")
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
    original_length: int | None
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


def original_length_or_none(model: nn.Module) -> int | None:
    """L: :func:`clex.hf.methods.original_length_of` for a RoPE model; else the config's max positions, or None."""
    if rotary_of(model) is not None:
        return original_length_of(model)
    config = text_config(model) if getattr(model, "config", None) is not None else None
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
    """Build the model of one spec (a string or :class:`ModelSpec`) on ``device`` in eval mode.

    A baseline method goes through :func:`clex.hf.methods.prepare_model`, as in training.
    """
    from ..core.config import CLEXConfig
    from ..hf.loading import clex_config_of, load_model, read_config

    spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
    path = Path(spec.path)
    if spec.path == "smollm2" and not path.exists():
        from ..data.smollm2 import (
            load_smollm2,  # the embedded GGUF model, converted once to a cached folder
        )

        fresh = CLEXConfig.from_dict(spec.params) if spec.method == "clex" else None
        model, tokenizer = load_smollm2(dtype=dtype or "float32", device=device, clex=fresh)
    else:
        saved, _ = clex_config_of(read_config(path))  # FileNotFoundError for a missing folder
        if spec.method == "clex" and saved is None:  # a corrupt weights file: load_model's ValueError names it
            model = load_model(path, dtype=dtype, device=device, clex=CLEXConfig.from_dict(spec.params))
        else:
            model = load_model(path, dtype=dtype, device=device, **(spec.params if spec.method == "clex" else {}))
        tokenizer = _load_tokenizer(path)
    if spec.method and spec.method != "clex":
        params = dict(spec.params)
        factor = params.pop("factor", 1 if spec.method == "none" else None)
        if factor is None:
            raise ValueError(
                f"model spec {spec.path}:{spec.method}: give factor=<target length / original length>, "
                f"e.g. {spec.path}:{spec.method}:factor=4"
            )
        prepare_model(model, spec.method, factor=factor, rope=params)
    model.eval()
    info = {"path": spec.path, "method": spec.method, "params": spec.params}
    return LoadedModel(spec.label, model, tokenizer, original_length_or_none(model), info)


def as_loaded(item, *, device: str = "cpu", dtype: str | None = None) -> LoadedModel:
    """A spec string, a ModelSpec, a LoadedModel, or a (name, model, tokenizer) triple -> LoadedModel."""
    if isinstance(item, LoadedModel):
        return item
    if isinstance(item, tuple):
        if len(item) != 3:
            raise ValueError(f"a built model must be a (name, model, tokenizer) triple, got {len(item)} items")
        name, model, tokenizer = item
        return LoadedModel(str(name), model, tokenizer, original_length_or_none(model), {"path": None, "built": True})
    return load_spec(item, device=device, dtype=dtype)


def _is_triple(item) -> bool:
    return isinstance(item, tuple) and len(item) == 3 and not isinstance(item[1], str)


def check_models(models) -> list:
    """The models argument as a non-empty list (one spec, one triple, or a sequence of them)."""
    if isinstance(models, (str, ModelSpec, LoadedModel)) or _is_triple(models):
        models = [models]
    models = list(models or [])
    if not models:
        raise ValueError("models: give at least one model spec (--models SPEC [SPEC ...], e.g. runs/clex), got none")
    return models


def each_model(models: list, *, seed: int, device: str, dtype: str | None) -> Iterator[LoadedModel]:
    """The models of :func:`check_models`, loaded one at a time (one in memory at a time), torch seeded with
    ``seed`` before each; a ValueError as soon as two labels repeat."""
    names: list[str] = []
    for item in tqdm(models, desc="models", disable=len(models) < 2):
        torch.manual_seed(seed)
        loaded = as_loaded(item, device=device, dtype=dtype)
        names.append(loaded.name)
        unique_names(names)
        yield loaded


def default_lengths(loaded: LoadedModel, factors: Sequence[int]) -> list[int]:
    """``factors`` x the model's training length L; a ValueError when L is unknown."""
    if not loaded.original_length:
        raise ValueError(f"{loaded.name} has no known training length; give lengths explicitly")
    return [loaded.original_length * k for k in factors]


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


def parse_ints(value, field: str) -> list[int]:
    """A non-empty list of integers >= 2 from a list or a comma-separated string ("128,256")."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        text = str(v).strip()
        if not text:
            continue
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"{field} must be integers >= 2 like '128,256', got {v!r} in {value!r}")
        try:
            out.append(int(float(text)) if isinstance(v, float) else int(text))
        except ValueError:
            raise ValueError(f"{field} must be integers >= 2 like '128,256', got {v!r} in {value!r}") from None
    if not out or min(out) < 2:
        raise ValueError(f"{field} must be integers >= 2 like '128,256', got {value!r}")
    return out


def parse_fractions(value, field: str) -> list[float]:
    """A non-empty list of finite numbers in [0, 1] from a list or a comma-separated string ("0,0.5,1")."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        try:
            x = float(str(v).strip()) if not isinstance(v, bool) else math.nan
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and 0 <= x <= 1):
            raise ValueError(f"{field} must be finite fractions in [0, 1] like '0,0.5,1', got {v!r} in {value!r}")
        out.append(x)
    if not out:
        raise ValueError(f"{field} must be finite fractions in [0, 1] like '0,0.5,1', got none")
    return out


def check_count(field: str, value, *, minimum: int = 1, allow_none: bool = False, none_means: str = "") -> None:
    """A ValueError naming ``field`` unless ``value`` is an integer >= ``minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (
            f" or None (= {none_means})" if allow_none and none_means else " or None" if allow_none else ""
        )
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


def check_dtype(dtype: str | None) -> str | None:
    """``dtype`` if it is None or one of :data:`DTYPES`, else a ValueError naming the value and the allowed ones."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or none: as saved), got {dtype!r}")
    return dtype


def check_device(device: str) -> str:
    """``device`` if it is cpu, cuda, cuda:N or mps and available here, else a ValueError naming it."""
    text = str(device)
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise ValueError(f"device must be one of cpu, cuda, cuda:N (N a GPU index), mps, got {device!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: torch finds no CUDA GPU here; use --device cpu")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not available: torch finds {torch.cuda.device_count()} CUDA GPU(s)")
    if text == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available here (torch.backends.mps.is_available() is False)")
    return text
