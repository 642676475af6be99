"""Length-extension methods for fine-tuning, by name: CLEX and the baselines, all through one interface.

``METHODS[name](model, *, factor, clex=None, rope=None, pose=False) -> model`` prepares a plain-RoPE model
in place for a run that targets ``factor`` x its original length L (= ``max_position_embeddings``):

- ``clex``: :func:`clex.apply_clex`; the rotary module's training mode then draws t and extrapolated
  positions every forward (CLEXConfig.max_factor defaults to ``factor``; ``pose`` -> position_sampler "pose").
- ``pi`` / ``dynamic-ntk`` / ``yarn`` / ``longrope`` / ``llama3``: transformers' own rope types "linear",
  "dynamic", "yarn", "longrope", "llama3": we only write ``config.rope_parameters`` and rebuild the model's
  rotary module with its own class. Nothing of them is re-implemented here.
- ``ntk``: static NTK-aware scaling (bloc97). transformers 5 has no static "ntk" rope type (its "dynamic"
  changes the base with the current length, and leaves lengths <= L unscaled, i.e. all of short-sequence
  training). We use the identity NTK-aware scaling *is*: plain RoPE with the base
  rope_theta' = rope_theta * factor^(d/(d-2)), d the rotary dimension, i.e. rope type "default"
  (max_position_embeddings stays L, so L can still be read from the saved config).
- ``none``: the model unchanged (naive fine-tuning).

One name, one meaning, for training (``clex train``'s ``method``) and evaluation (the model spec
``PATH:METHOD:factor=4``) alike: ``ntk`` is always *static* NTK, ``dynamic-ntk`` transformers' dynamic one.
transformers' own rope type names are accepted as aliases (:data:`ALIASES`: ``linear`` = ``pi``,
``dynamic`` = ``dynamic-ntk``); :func:`method_name` resolves a name or lists the valid ones. Every baseline is
built by one function, :func:`_rebuild_rotary`, which checks the ``rope`` keys against the ones transformers'
rope type takes (an unknown key is refused, naming the valid ones) and validates the result.

``longrope`` needs per-dimension rescale factors that the LongRoPE paper finds by evolutionary search; we do no
search: the default long factors are the NTK-aware ones, factor^(2j/(d-2)) for pair j (one of the paper's
initial candidates), short factors 1 (plain RoPE up to L). Pass searched ones in ``rope``
(``long_factor``/``short_factor`` lists of d/2 numbers). ``rope`` entries are merged into
``rope_parameters`` for every transformers type (e.g. ``beta_fast`` for yarn).

PoSE (positional skip-wise training) is a flag, not a method: for CLEX the rotary samples PoSE positions
itself; for every other method the trainer passes ``position_ids`` from :func:`pose_position_ids`, spanning
L * factor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.config import CLEXConfig
from ..core.policies import POSITION_SAMPLERS
from ..core.rotary_embedding import CLEXRotaryEmbedding
from .lookup import find_rotary, text_config
from .patch import apply_clex

#: method name -> the transformers rope type it writes (None: not a transformers rope type)
HF_ROPE_TYPES = {"pi": "linear", "dynamic-ntk": "dynamic", "yarn": "yarn", "longrope": "longrope", "llama3": "llama3"}
#: other accepted names -> method name: transformers' rope type names ("dynamic" is dynamic NTK, as it always was)
ALIASES = {"linear": "pi", "dynamic": "dynamic-ntk"}


def original_length_of(model: nn.Module) -> int:
    """L, the original length: the CLEX rotary's original length if applied, else original_max_position_embeddings, else
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


class _KeysSeen(Exception):
    pass


def rope_keys(config, rope_type: str) -> set[str] | None:
    """The ``rope_parameters`` keys transformers' validator of ``rope_type`` takes (required and optional), or
    None when this transformers has no validator for it (then its own validation is all there is)."""
    validate = getattr(type(config), f"_validate_{rope_type}_rope_parameters", None)
    if validate is None:
        return None
    seen: set[str] = set()

    class Probe:  # stands in for the config: records the keys the validator checks, then stops it
        ignore_keys_at_rope_validation: set = set()

        @staticmethod
        def _check_received_keys(rope_type, received_keys, required_keys, optional_keys=None, ignore_keys=None):
            seen.update(required_keys, optional_keys or (), {"partial_rotary_factor"})
            raise _KeysSeen

    try:
        validate(Probe(), {"rope_type": rope_type, "factor": 2.0})
    except _KeysSeen:
        return seen
    except Exception:  # a validator of another shape: rely on transformers' validation
        return None
    return None


def _rebuild_rotary(
    model: nn.Module, method: str, rope_parameters: dict, max_positions: int, rope: dict | None
) -> nn.Module:
    """Write ``rope_parameters`` (updated with the caller's ``rope``, whose keys must be ones transformers' rope
    type takes) and max_position_embeddings to the config, then rebuild the model's rotary module with its own
    class, so that transformers computes the scaled frequencies. On any error the config is left unchanged."""
    cfg = text_config(model)
    rope_type = rope_parameters["rope_type"]
    valid = rope_keys(cfg, rope_type)
    unknown = sorted(set(rope or {}) - (valid or set()) - {"rope_type"}) if valid is not None else []
    if unknown:
        raise ValueError(
            f"method {method!r} (rope type {rope_type!r}): unknown rope parameter(s) {unknown}; "
            f"valid: {', '.join(sorted(valid - {'rope_type'}))}"
        )
    old_params, old_max = cfg.rope_parameters, cfg.max_position_embeddings
    cfg.rope_parameters = {**rope_parameters, **(rope or {})}
    cfg.max_position_embeddings = int(max_positions)
    name, old = find_rotary(model)
    try:
        cfg.validate_rope()
        new = type(old)(config=cfg).to(old.inv_freq.device)
    except (KeyError, TypeError, ValueError) as e:
        cfg.rope_parameters, cfg.max_position_embeddings = old_params, old_max
        raise ValueError(f"method {method!r} with rope parameters {rope or {}}: {e}") from None
    new.train(old.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _hf_rope(method: str) -> Callable:
    rope_type = HF_ROPE_TYPES[method]

    def prepare(
        model: nn.Module, *, factor: float, clex: dict | None = None, rope: dict | None = None, pose: bool = False
    ):
        factor = _check_factor(factor)
        plain = _plain_rope(model, method)
        length = original_length_of(model)
        params = {**plain, "rope_type": rope_type, "factor": factor}
        if rope_type in ("linear", "dynamic"):  # L stays in max_position_embeddings (dynamic's reference length)
            return _rebuild_rotary(model, method, params, length, rope)
        params["original_max_position_embeddings"] = length
        if rope_type == "llama3":
            params.update(low_freq_factor=1.0, high_freq_factor=4.0)  # Llama-3.1's values
        if rope_type == "longrope":
            half = rotary_dim(model) // 2
            ntk = [factor ** (2 * j / (2 * half - 2)) for j in range(half)]
            params.update(short_factor=[1.0] * half, long_factor=ntk)
        return _rebuild_rotary(model, method, params, round(length * factor), rope)

    prepare.__doc__ = f"{method}: transformers' rope type {rope_type!r} with the given factor."
    return prepare


def _ntk(model: nn.Module, *, factor: float, clex: dict | None = None, rope: dict | None = None, pose: bool = False):
    """ntk: static NTK-aware scaling (never the dynamic one: that is ``dynamic-ntk``), rope type "default" with
    rope_theta * factor^(d/(d-2))."""
    factor = _check_factor(factor)
    plain = _plain_rope(model, "ntk")
    d = rotary_dim(model)
    base = float(plain.get("rope_theta", 10000.0))
    params = {**plain, "rope_type": "default", "rope_theta": base * factor ** (d / (d - 2))}
    return _rebuild_rotary(
        model, "ntk", params, original_length_of(model), rope
    )  # L stays: the base carries the scaling


def _clex(
    model: nn.Module,
    *,
    factor: float,
    clex: CLEXConfig | dict | None = None,
    rope: dict | None = None,
    pose: bool = False,
):
    """clex: apply CLEX; a model that has CLEX already keeps its ODE weights and takes the given training
    fields. ``clex``: the CLEXConfig to apply as it is (the trainer's, built by ``TrainConfig.clex_config()``),
    or a dict of fields (max_factor = factor unless given; ``pose`` sets position_sampler "pose")."""
    factor = _check_factor(factor)
    if isinstance(clex, CLEXConfig):
        if pose and clex.position_sampler != "pose":
            raise ValueError(f"pose=True needs the CLEXConfig's position_sampler 'pose', got {clex.position_sampler!r}")
        given = clex
        fields = clex.to_dict()
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
        new = rot.config.replace(**{k: v for k, v in fields.items() if k != "original_length"})
        for name in ("adapter_rank", "adapter_targets", "adapter_scale"):
            if getattr(new, name) != getattr(rot.config, name):
                raise ValueError(
                    f"this model has CLEX with {name}={getattr(rot.config, name)!r}; it cannot change to "
                    f"{getattr(new, name)!r} (its t-conditioned adapters were built with it): apply CLEX afresh"
                )
        if (new.mscale == "learned") != (rot.config.mscale == "learned"):
            raise ValueError(
                f"this model has CLEX with mscale={rot.config.mscale!r}; it cannot change to {new.mscale!r} (a "
                "learned temperature has its own weights): apply CLEX afresh"
            )
        rot.config = new
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
    model: nn.Module,
    method: str,
    *,
    factor: float,
    clex: CLEXConfig | dict | None = None,
    rope: dict | None = None,
    pose: bool = False,
) -> nn.Module:
    """Prepare ``model`` in place for fine-tuning or evaluation with ``method`` (see :data:`METHODS`; aliases
    :data:`ALIASES`)."""
    method = method_name(method)
    if (isinstance(clex, CLEXConfig) or clex) and method != "clex":
        raise ValueError(
            f"clex fields {sorted(clex.to_dict() if isinstance(clex, CLEXConfig) else clex)} apply to method 'clex' only, got method {method!r}"
        )
    return METHODS[method](model, factor=factor, clex=clex, rope=rope, pose=pose)


def pose_position_ids(batch: int, seq_len: int, span: int, generator: torch.Generator) -> Tensor:
    """PoSE position ids for a batch: each row two contiguous chunks with a random skip, spanning up to
    ``span`` positions (:data:`clex.core.policies.POSITION_SAMPLERS` "pose").  -> [batch, seq_len] int64"""
    sampler = POSITION_SAMPLERS["pose"]
    return torch.stack([sampler(seq_len, max(span, seq_len), generator) for _ in range(batch)]).long()


def method_name(name: str) -> str:
    """The registry name of ``name`` (case-insensitive; :data:`ALIASES` resolved); a ValueError listing the valid
    names for an unknown one."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        aliases = ", ".join(f"{a} (= {m})" for a, m in ALIASES.items())
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}; aliases: {aliases}")
    return key
