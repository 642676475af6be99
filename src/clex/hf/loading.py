"""Loading CLEX models from local folders: ours, the authors' released layout, or plain transformers ones.

Saving needs nothing of ours: ``model.save_pretrained(dir)`` writes the ODE weights with the model's and a
``rope_parameters`` entry of type "clex". Stock transformers refuses that entry (it knows no "clex" rope
type); :func:`load_model` reads it, builds the plain-RoPE model, applies CLEX and loads the ODE weights.

The authors' checkpoints (DAMO-NLP-SG/CLEX) carry ``rope_scaling = {"type": "clex", "max_factor",
"param_factor", "act", "time_dt", "factor"}``, a top-level ``log_scale``, and the weights
``model.clex_layer.proj_func.ode_up_proj`` / ``ode_down_proj`` (and ``model.clex_layer.inv_freq``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from ..core.config import CLEXConfig
from .lookup import get_clex_rotary
from .patch import apply_clex, split_rope_parameters

#: Reference config keys -> ours (anything else in their rope_scaling is ignored, e.g. "factor": 1).
OFFICIAL_KEYS = ("max_factor", "param_factor", "act", "time_dt")
ODE_WEIGHTS = ("ode_up_proj", "ode_down_proj")


def read_config(path: str | Path) -> dict:
    """config.json of a model folder, with clear errors for a missing folder or file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a transformers model folder: it has no config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def clex_config_of(raw: dict) -> tuple[CLEXConfig | None, dict]:
    """(CLEXConfig or None, config dict with plain RoPE) for our layout, the official one, or neither."""
    raw = dict(raw)
    raw.pop("auto_map", None)
    rope = raw.get("rope_parameters") or {}
    if rope.get("rope_type") == "clex":  # ours
        clex, plain = split_rope_parameters(rope)
        raw["rope_parameters"] = plain
        return clex, raw
    official = raw.get("rope_scaling") or {}
    if official.get("type") == "clex" or official.get("rope_type") == "clex":
        fields = {k: official[k] for k in OFFICIAL_KEYS if k in official}
        clex = CLEXConfig(
            **fields, log_scale=bool(raw.pop("log_scale", False)), inference_t="integer",
            original_length=raw.get("max_position_embeddings"),
        )  # fmt: skip
        raw["rope_scaling"] = None
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0)}
        return clex, raw
    return None, raw


def _read_weights(path: Path, suffixes: tuple[str, ...]) -> dict:
    """Tensors whose names end with one of ``suffixes``, from every weight file in the folder."""
    from safetensors import safe_open

    found = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(suffixes):
                    found[key] = f.get_tensor(key)
    for file in sorted(path.glob("*.bin")):
        state = torch.load(file, map_location="cpu", weights_only=True)
        found.update({k: v for k, v in state.items() if k.endswith(suffixes)})
    return found


@contextlib.contextmanager
def _quiet_transformers():
    """The ODE weights are 'unexpected' to the plain model; we load them ourselves, so hush that report."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    clex: CLEXConfig | dict | None = None,
    **overrides,
) -> nn.Module:
    """Load a causal LM from a local folder, with CLEX when its config says so (or when ``clex`` is given).

    Folder kinds: saved by clex (``rope_parameters.rope_type == "clex"``), the authors' release layout
    (``rope_scaling.type == "clex"``), or a plain transformers folder (CLEX applied fresh if ``clex`` or
    ``overrides`` are given). ``overrides`` change fields of the loaded CLEXConfig (e.g. inference_t).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = read_config(path)
    saved, cleaned = clex_config_of(raw)
    model_type = cleaned.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path / 'config.json'} has no model_type; expected a transformers model folder")
    config = AutoConfig.for_model(model_type, **cleaned)
    kwargs = {"config": config}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    chosen = clex if clex is not None else saved
    if chosen is None and not overrides:
        return model.to(device) if device is not None else model
    if isinstance(chosen, dict):
        chosen = CLEXConfig.from_dict(chosen)
    apply_clex(model, (chosen or CLEXConfig()).replace(**overrides))
    if saved is not None:
        weights = _read_weights(path, ODE_WEIGHTS)
        dyn = get_clex_rotary(model).dynamics
        for name in ODE_WEIGHTS:
            hits = [v for k, v in weights.items() if k.endswith(name)]
            if len(hits) != 1:
                raise ValueError(f"{path}: expected one `{name}` tensor in the weights, found {len(hits)}")
            param = getattr(dyn, name)
            if hits[0].shape != param.shape:
                raise ValueError(
                    f"{path}: `{name}` has shape {tuple(hits[0].shape)}, expected {tuple(param.shape)} "
                    f"(rotary dim and param_factor of the config)"
                )
            with torch.no_grad():
                param.copy_(hits[0].to(param.dtype))
    return model.to(device) if device is not None else model
