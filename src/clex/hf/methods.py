"""Length-extension methods for fine-tuning, by name: CLEX and the baselines, all through one interface.

``METHODS[name](model, *, factor, clex=None, rope=None, pose=False) -> model`` prepares a plain-RoPE model
in place for a run that targets ``factor`` x its original length L0 (= ``max_position_embeddings``):

- ``clex``: :func:`clex.apply_clex`; the rotary module's training mode then draws t and extrapolated
  positions every forward (CLEXConfig.max_factor defaults to ``factor``; ``pose`` -> position_sampler "pose").
- ``pi`` / ``dynamic-ntk`` / ``yarn`` / ``longrope`` / ``llama3``: transformers' own rope types "linear",
  "dynamic", "yarn", "longrope", "llama3": we only write ``config.rope_parameters`` and rebuild the model's
  rotary module with its own class. Nothing of them is re-implemented here.
- ``ntk``: static NTK-aware scaling (bloc97). transformers 5 has no static "ntk" rope type (its "dynamic"
  changes the base with the current length, and leaves lengths <= L0 unscaled, i.e. all of short-sequence
  training). We use the identity NTK-aware scaling *is*: plain RoPE with the base
  rope_theta' = rope_theta * factor^(d/(d-2)), d the rotary dimension, i.e. rope type "default"
  (max_position_embeddings stays L0, so L0 can still be read from the saved config).
- ``none``: the model unchanged (naive fine-tuning).

``longrope`` needs per-dimension rescale factors that the LongRoPE paper finds by evolutionary search; we do no
search: the default long factors are the NTK-aware ones, factor^(2j/(d-2)) for pair j (one of the paper's
initial candidates), short factors 1 (plain RoPE up to L0). Pass searched ones in ``rope``
(``long_factor``/``short_factor`` lists of d/2 numbers). ``rope`` entries are merged into
``rope_parameters`` for every transformers type (e.g. ``beta_fast`` for yarn).

PoSE (positional skip-wise training) is a flag, not a method: for CLEX the rotary samples PoSE positions
itself; for every other method the trainer passes ``position_ids`` from :func:`pose_position_ids`, spanning
L0 * factor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.config import CLEXConfig
from ..core.policies import POSITION_SAMPLERS
from ..core.rotary import CLEXRotaryEmbedding
from .lookup import find_rotary, text_config
from .patch import apply_clex

#: method name -> the transformers rope type it writes (None: not a transformers rope type)
HF_ROPE_TYPES = {"pi": "linear", "dynamic-ntk": "dynamic", "yarn": "yarn", "longrope": "longrope", "llama3": "llama3"}


def original_length(model: nn.Module) -> int:
    """L0: the CLEX rotary's original length if applied, else original_max_position_embeddings, else
    max_position_embeddings."""
    _, rot = find_rotary(model)
    if isinstance(rot, CLEXRotaryEmbedding):
        return rot.original_length
    cfg = text_config(model)
    rope = getattr(cfg, "rope_parameters", None) or {}
    return int(rope.get("original_max_position_embeddings") or cfg.max_position_embeddings)


def rotary_dim(model: nn.Module) -> int:
    """d: the number of rotated channels of each head (2 x the number of frequencies)."""
    return 2 * find_rotary(model)[1].inv_freq.numel()


def _plain_rope(model: nn.Module, method: str) -> dict:
    """The model's rope_parameters; ValueError unless it is plain RoPE (scaling on scaling is not a baseline)."""
    _, rot = find_rotary(model)
    if isinstance(rot, CLEXRotaryEmbedding):
        raise ValueError(f"method {method!r} needs a plain-RoPE model, but this one has CLEX: load it without CLEX")
    rope = dict(getattr(text_config(model), "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"method {method!r} needs a plain-RoPE model (rope_type 'default'), got rope_type {rope['rope_type']!r}"
        )
    return rope


def _check_factor(factor: float) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ValueError(f"factor must be a number >= 1 (target length / original length), got {factor!r}")
    return float(factor)


def _rebuild_rotary(model: nn.Module, rope_parameters: dict, max_positions: int) -> nn.Module:
    """Write rope_parameters and max_position_embeddings to the config, then rebuild the model's rotary
    module with its own class, so that transformers computes the scaled frequencies."""
    cfg = text_config(model)
    cfg.rope_parameters = rope_parameters
    cfg.max_position_embeddings = int(max_positions)
    name, old = find_rotary(model)
    device = old.inv_freq.device
    new = type(old)(config=cfg).to(device)
    new.train(old.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _hf_rope(method: str) -> Callable:
    rope_type = HF_ROPE_TYPES[method]

    def prepare(model: nn.Module, *, factor: float, clex: dict | None = None, rope: dict | None = None, pose: bool = False):
        factor = _check_factor(factor)
        plain = _plain_rope(model, method)
        length = original_length(model)
        params = {**plain, "rope_type": rope_type, "factor": factor}
        if rope_type in ("linear", "dynamic"):  # L0 stays in max_position_embeddings (dynamic's reference length)
            return _rebuild_rotary(model, {**params, **(rope or {})}, length)
        params["original_max_position_embeddings"] = length
        if rope_type == "llama3":
            params.update(low_freq_factor=1.0, high_freq_factor=4.0)  # Llama-3.1's values
        if rope_type == "longrope":
            half = rotary_dim(model) // 2
            ntk = [factor ** (2 * j / (2 * half - 2)) for j in range(half)]
            params.update(short_factor=[1.0] * half, long_factor=ntk)
        return _rebuild_rotary(model, {**params, **(rope or {})}, round(length * factor))

    prepare.__doc__ = f"{method}: transformers' rope type {rope_type!r} with the given factor."
    return prepare


def _ntk(model: nn.Module, *, factor: float, clex: dict | None = None, rope: dict | None = None, pose: bool = False):
    """ntk: static NTK-aware scaling, rope type "default" with rope_theta * factor^(d/(d-2))."""
    factor = _check_factor(factor)
    plain = _plain_rope(model, "ntk")
    d = rotary_dim(model)
    base = float(plain.get("rope_theta", 10000.0))
    params = {**plain, "rope_type": "default", "rope_theta": base * factor ** (d / (d - 2)), **(rope or {})}
    return _rebuild_rotary(model, params, original_length(model))  # L0 stays: the base carries the scaling


def _clex(model: nn.Module, *, factor: float, clex: CLEXConfig | dict | None = None, rope: dict | None = None,
          pose: bool = False):
    """clex: apply CLEX; a model that has CLEX already keeps its ODE weights and takes the given training
    fields. ``clex``: the CLEXConfig to apply as it is (the trainer's, built by ``TrainConfig.clex_config()``),
    or a dict of fields (max_factor = factor unless given; ``pose`` sets position_sampler "pose")."""
    factor = _check_factor(factor)
    if isinstance(clex, CLEXConfig):
        if pose and clex.position_sampler != "pose":
            raise ValueError(f"pose=True needs the CLEXConfig's position_sampler 'pose', got {clex.position_sampler!r}")
        given = clex
        fields = {name: getattr(clex, name) for name in clex.__dataclass_fields__ if name != "extra"}
    else:
        given = None
        fields = {"max_factor": factor, **(clex or {})}
        if pose:
            fields["position_sampler"] = "pose"
    if rope:
        raise ValueError(f"rope parameters {sorted(rope)} do not apply to method 'clex'; set clex fields instead")
    _, rot = find_rotary(model)
    if isinstance(rot, CLEXRotaryEmbedding):
        if int(fields.get("param_factor", rot.config.param_factor)) != rot.config.param_factor:
            raise ValueError(
                f"this model has CLEX with param_factor={rot.config.param_factor}; it cannot change to "
                f"{fields['param_factor']} (the ODE weights have that shape)"
            )
        rot.config = rot.config.replace(**{k: v for k, v in fields.items() if k != "original_length"})
        return model
    return apply_clex(model, given if given is not None else CLEXConfig.from_dict(fields))


def _none(model: nn.Module, *, factor: float, clex: dict | None = None, rope: dict | None = None, pose: bool = False):
    """none: naive fine-tuning, the model's RoPE unchanged."""
    _check_factor(factor)
    if rope:
        raise ValueError(f"rope parameters {sorted(rope)} do not apply to method 'none'")
    return model


#: method name -> prepare(model, *, factor, clex, rope, pose) -> model
METHODS: dict[str, Callable] = {
    "clex": _clex,
    "pi": _hf_rope("pi"),
    "ntk": _ntk,
    "dynamic-ntk": _hf_rope("dynamic-ntk"),
    "yarn": _hf_rope("yarn"),
    "longrope": _hf_rope("longrope"),
    "llama3": _hf_rope("llama3"),
    "none": _none,
}


def prepare_model(
    model: nn.Module, method: str, *, factor: float, clex: CLEXConfig | dict | None = None, rope: dict | None = None,
    pose: bool = False,
) -> nn.Module:
    """Prepare ``model`` in place for fine-tuning with ``method`` (see :data:`METHODS`)."""  # fmt: skip
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    if (isinstance(clex, CLEXConfig) or clex) and method != "clex":
        raise ValueError(f"clex fields {sorted(clex.to_dict() if isinstance(clex, CLEXConfig) else clex)} apply to method 'clex' only, got method {method!r}")
    return METHODS[method](model, factor=factor, clex=clex, rope=rope, pose=pose)


def pose_position_ids(batch: int, seq_len: int, span: int, generator: torch.Generator) -> Tensor:
    """PoSE position ids for a batch: each row two contiguous chunks with a random skip, spanning up to
    ``span`` positions (:data:`clex.core.policies.POSITION_SAMPLERS` "pose").  -> [batch, seq_len] int64"""
    sampler = POSITION_SAMPLERS["pose"]
    return torch.stack([sampler(seq_len, max(span, seq_len), generator) for _ in range(batch)]).long()


ALIASES = {"pi": "linear", "ntk": "dynamic"}


def apply_rope_override(model: nn.Module, rope_type: str, params: dict) -> nn.Module:
    """Give a plain-RoPE model transformers' own scaling ``rope_type`` with ``params``, in place.

    Sets ``config.rope_parameters`` and rebuilds the rotary module with its own class, so the scaling is
    exactly transformers' (``ROPE_INIT_FUNCTIONS``), attention factor included.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        allowed = ", ".join([*ROPE_INIT_FUNCTIONS, *ALIASES, "clex"])
        raise ValueError(f"unknown RoPE method {rope_type!r}; allowed: {allowed}")
    factor = params.get("factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"RoPE method {rope_type!r}: factor must be a number >= 1, got {factor!r}")
    name, old = find_rotary(model)
    if isinstance(old, CLEXRotaryEmbedding):
        raise ValueError(f"RoPE method {rope_type!r} needs a plain-RoPE model, but this one already has CLEX")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    plain = dict(config.rope_parameters or {})
    if plain.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE method {rope_type!r} needs a plain-RoPE model, got rope_type {plain['rope_type']!r}")
    new_params = {**plain, "rope_type": rope_type, **params}
    if rope_type in ("yarn", "longrope"):
        new_params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    config.rope_parameters = new_params
    try:
        config.validate_rope()
        new = type(old)(config=config)
    except (KeyError, TypeError, ValueError) as e:
        config.rope_parameters = plain
        raise ValueError(f"RoPE method {rope_type!r} with parameters {params}: {e}") from None
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new.to(old.inv_freq.device))
    return model
