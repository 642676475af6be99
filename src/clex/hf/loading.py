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

from ..core.config import CLEXConfig, check_keys
from .lookup import get_clex_rotary
from .patch import apply_clex, split_rope_parameters
from .t_adapter import ADAPTER

#: Reference config keys that are CLEXConfig fields of the same name and meaning.
OFFICIAL_KEYS = ("max_factor", "param_factor", "act", "time_dt")
#: The other keys of the reference's rope_scaling: "type" / "rope_type" (must be "clex") and "factor" (1 in every
#: release, read by no CLEX code; any other value is refused rather than ignored). Any further key is refused.
OFFICIAL_FOREIGN_KEYS = ("type", "rope_type", "factor")
ODE_WEIGHTS = ("ode_up_proj", "ode_down_proj")
#: dtype names load_model takes.
DTYPES = ("float32", "bfloat16", "float16")


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
        check_keys(official, (*OFFICIAL_KEYS, *OFFICIAL_FOREIGN_KEYS), where="the authors' rope_scaling")
        if official.get("factor", 1) != 1:
            raise ValueError(
                f"the authors' rope_scaling.factor must be 1 (CLEX reads max_factor, not factor), got "
                f"{official['factor']!r}"
            )
        fields = {k: official[k] for k in OFFICIAL_KEYS if k in official}
        clex = CLEXConfig(
            **fields,
            log_scale=bool(raw.pop("log_scale", False)),
            inference_t="integer",
            original_length=raw.get("max_position_embeddings"),
        )
        raw["rope_scaling"] = None
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0)}
        return clex, raw
    return None, raw


def _read_weights(path: Path, suffixes: tuple[str, ...]) -> dict:
    """Tensors whose names end with one of ``suffixes``, from every weight file in the folder."""
    from safetensors import safe_open

    found = {}
    tensors = sorted(path.glob("*.safetensors"))
    for file in tensors:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(suffixes):
                        found[key] = f.get_tensor(key)
        except Exception as e:  # SafetensorError, OSError: a corrupt or truncated file
            raise ValueError(f"{file} is not a readable safetensors file: {_one_line(e)}") from e
    for file in [] if tensors else sorted(path.glob("*.bin")):  # pickles: only where no safetensors exist
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)  # plain tensors only, never code
        except Exception as e:
            raise ValueError(f"{file} is not a readable weights file of plain tensors: {_one_line(e)}") from e
        found.update({k: v for k, v in state.items() if k.endswith(suffixes)})
    return found


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_weight_files(path: Path) -> None:
    """Every safetensors file of the folder has a readable header and the size it declares (a truncated or
    corrupt file is named here, not deep inside transformers)."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise ValueError(f"{file} is not a readable safetensors file: {_one_line(e)}") from e


def _check_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return getattr(torch, dtype)
    if isinstance(dtype, torch.dtype) and str(dtype).removeprefix("torch.") in DTYPES:
        return dtype
    raise ValueError(
        f"load_model's dtype must be one of {', '.join(DTYPES)} (a name or a torch.dtype), or None, got {dtype!r}"
    )


def _check_device(device):
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"load_model's device must be a torch device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}"
        ) from e
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if dev.type in available and not available[dev.type]():
        raise ValueError(f"load_model's device {device!r} is not available on this machine (try 'cpu')")
    return dev


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

    # Everything is checked before any weight is read. Nothing of the folder runs: the config object is
    # built here (its auto_map, and the clex_model.py beside it, are never used; no trust_remote_code), and
    # weights are read by safetensors or by torch.load(weights_only=True).
    dtype, device = _check_dtype(dtype), _check_device(device)
    if clex is not None and not isinstance(clex, (CLEXConfig, dict)):
        raise ValueError(f"load_model's clex must be a CLEXConfig, a dict or None, got {type(clex).__name__}")
    if isinstance(clex, dict):
        clex = CLEXConfig.from_dict(clex)
    check_keys(
        overrides, CLEXConfig.field_names(), where="load_model (keyword arguments past clex are CLEXConfig fields)"
    )
    path = Path(path)
    raw = read_config(path)
    saved, cleaned = clex_config_of(raw)
    chosen = clex if clex is not None else saved
    if chosen is not None or overrides:
        chosen = (chosen or CLEXConfig()).replace(**overrides)
    model_type = cleaned.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path / 'config.json'} has no model_type; expected a transformers model folder")
    _check_weight_files(path)
    config = AutoConfig.for_model(model_type, **cleaned)
    kwargs = {"config": config, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if chosen is None:
        return model.to(device) if device is not None else model
    apply_clex(model, chosen)
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
        _load_learned_functions_of_t(model, path, saved)
    return model.to(device) if device is not None else model


def _load_learned_functions_of_t(model: nn.Module, path: Path, saved: CLEXConfig) -> None:
    """The learned temperature and the t-conditioned adapters (:mod:`clex.hf.t_adapter`), by their exact state
    dict names. Those the saved config has must be in the weights; ones a load-time override adds start fresh."""
    from .lookup import find_rotary

    rotary_name, rotary = find_rotary(model)
    wanted = {}
    if saved.mscale == "learned" and rotary.temperature is not None:
        wanted[f"{rotary_name}.temperature"] = rotary.temperature
    if saved.adapter_rank and saved.adapter_rank == rotary.config.adapter_rank:
        wanted.update({k: p for k, p in model.named_parameters() if f".{ADAPTER}." in k})
    if not wanted:
        return
    found = _read_weights(path, tuple(wanted))
    for key, param in wanted.items():
        value = found.get(key)
        if value is None or value.shape != param.shape:
            what = "missing" if value is None else f"of shape {tuple(value.shape)}, expected {tuple(param.shape)}"
            raise ValueError(
                f"{path}: the weights' `{key}` is {what} (its config has mscale={saved.mscale!r}, "
                f"adapter_rank={saved.adapter_rank})"
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
