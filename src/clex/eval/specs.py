"""Model specs: the models an evaluation compares, named as strings, parsed, loaded one at a time, and checked.

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

The documents every evaluation reads are in :mod:`clex.eval.documents`; the t pin that keeps a CLEX model's
key cache exact (:func:`clex.hf.generation.fixed_clex_t`) is transformers glue, beside generation; the checks of
generic arguments (lengths, counts, dtype, device) are :mod:`clex.core.checks`.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.checks import check_fits, solve_bytes
from ..core.rotary_embedding import CLEXRotaryEmbedding
from ..hf.lookup import find_rotary, text_config
from ..hf.methods import ALIASES, METHODS, method_name, original_length_of, prepare_model

#: the spec grammar, quoted in every error about a spec's shape
GRAMMAR = "[NAME=]PATH[:METHOD[:KEY=VALUE,...]]"


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


def _method(name: str, text: str) -> str:
    """The registry name of a spec's METHOD; an unknown one is refused with the closest name and the valid ones."""
    try:
        return method_name(name)
    except ValueError as e:
        close = difflib.get_close_matches(str(name).strip().lower(), [*METHODS, *ALIASES], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"model spec {text!r}: {e}{hint}") from None


@dataclass
class ModelSpec:
    """One model to evaluate: a folder, an optional RoPE method with its parameters, a display name."""

    path: str
    method: str | None = None  # a name of clex.hf.methods.METHODS (aliases resolved)
    params: dict = field(default_factory=dict)
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``[NAME=]PATH[:METHOD[:KEY=VALUE,...]]`` -> ModelSpec (see the module docstring). Parameters without
        a method, or given to ``none`` (the model unchanged), are refused: nothing of a spec is dropped."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a model spec must be a non-empty string like 'name=path:yarn:factor=4', got {text!r}")
        name = None
        head, sep, rest = text.strip().partition(":")
        if "=" in head:
            name, _, head = head.partition("=")
        parts = rest.split(":", 1) if sep else []
        method = _method(parts[0], text) if parts and parts[0].strip() else None
        params = parse_params(parts[1] if len(parts) > 1 else "", f"model spec {text!r}")
        if not head:
            raise ValueError(f"model spec {text!r} has no model path; expected {GRAMMAR}")
        if params and method is None:
            raise ValueError(
                f"model spec {text!r} gives parameters {sorted(params)} but no METHOD to take them; expected "
                f"{GRAMMAR}, e.g. {head}:yarn:factor=4; methods: {', '.join(METHODS)}"
            )
        if params and method == "none":
            raise ValueError(
                f"model spec {text!r}: method 'none' (the model unchanged) takes no parameters, got {sorted(params)}; "
                f"give a scaling method for a factor, e.g. {head}:pi:factor=4"
            )
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


def load_spec(spec: str | ModelSpec, *, device: str = "cpu", dtype: str | None = None) -> LoadedModel:
    """Build the model of one spec (a string or :class:`ModelSpec`) on ``device`` in eval mode.

    A baseline method goes through :func:`clex.hf.methods.prepare_model`, as in training. The folder is read
    by :func:`clex.load_model` and :func:`clex.hf.loading.load_tokenizer`: nothing in it runs.
    """
    from ..core.config import CLEXConfig
    from ..hf.loading import clex_config_of, load_model, load_tokenizer, read_config

    spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
    path = Path(spec.path)
    if spec.path == "smollm2" and not path.exists():
        from ..data.smollm2 import load_smollm2  # the embedded GGUF model, converted once to a cached folder

        fresh = CLEXConfig.from_dict(spec.params) if spec.method == "clex" else None
        model, tokenizer = load_smollm2(dtype=dtype or "float32", device=device, clex=fresh)
    else:
        saved, _ = clex_config_of(read_config(path))  # FileNotFoundError for a missing folder
        if spec.method == "clex" and saved is None:  # a corrupt weights file: load_model's ValueError names it
            model = load_model(path, dtype=dtype, device=device, clex=CLEXConfig.from_dict(spec.params))
        else:
            model = load_model(path, dtype=dtype, device=device, **(spec.params if spec.method == "clex" else {}))
        tokenizer = load_tokenizer(path)
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
    """The models argument as a non-empty list (one spec, one triple, or a sequence of them); spec strings are
    parsed here, so that a malformed one is refused before any model is loaded."""
    if isinstance(models, (str, ModelSpec, LoadedModel)) or _is_triple(models):
        models = [models]
    models = list(models or [])
    if not models:
        raise ValueError("models: give at least one model spec (--models SPEC [SPEC ...], e.g. runs/clex), got none")
    return [ModelSpec.parse(m) if isinstance(m, str) else m for m in models]


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


def memory_for_length(loaded: LoadedModel, length: int) -> int:
    """A lower bound of the bytes one sequence of ``length`` tokens takes in ``loaded``'s model: its key/value
    cache and two hidden states, plus, for CLEX, the frequency table solved for the t of that length (the t
    pin's table: one row per integer t up to length / L). The attention's own scratch space is not counted."""
    model = loaded.model
    config = text_config(model) if isinstance(model, nn.Module) and getattr(model, "config", None) else None
    need = 0
    if config is not None:
        heads = getattr(config, "num_attention_heads", 1) or 1
        hidden = getattr(config, "hidden_size", 0) or 0
        head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden else 0)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layers = getattr(config, "num_hidden_layers", 0) or 0
        param = next(model.parameters(), None)
        size = param.element_size() if param is not None else 4
        need += length * size * (2 * layers * kv_heads * head_dim + 2 * hidden)
    rotary = rotary_of(model)
    if isinstance(rotary, CLEXRotaryEmbedding):
        need += solve_bytes(math.ceil(length / rotary.original_length), rotary.inv_freq.numel())
    return need


def check_lengths_fit(loaded: LoadedModel, lengths: Sequence[int], *, field: str = "lengths") -> None:
    """Refuse, before the first forward, a length that cannot fit in the memory free where the model lives
    (:func:`memory_for_length`, a lower bound: a length refused here could never run)."""
    longest = max(lengths)
    check_fits(
        field,
        longest,
        memory_for_length(loaded, longest),
        device=model_device(loaded.model),
        hint=f"{loaded.name} holds a key/value cache and, for CLEX, a frequency table per length: give shorter lengths",
    )
