"""Loading CLEX models from local folders: ours, the authors' released layout, or plain transformers ones.

Saving needs nothing of ours: ``model.save_pretrained(dir)`` writes the ODE weights with the model's and a
``rope_parameters`` entry of type "clex". Stock transformers refuses that entry (it knows no "clex" rope
type); :func:`load_model` reads it, builds the plain-RoPE model, applies CLEX and loads the ODE weights.

The authors' checkpoints (DAMO-NLP-SG/CLEX) carry ``rope_scaling = {"type": "clex", "max_factor",
"param_factor", "act", "time_dt", "factor"}``, a top-level ``log_scale``, and the weights
``model.clex_layer.proj_func.ode_up_proj`` / ``ode_down_proj`` (and ``model.clex_layer.inv_freq``).

Nothing of a folder runs: every ``from_pretrained`` here passes ``trust_remote_code=False`` (so transformers never
asks) and ``use_kernels=False`` (no kernel code fetched from the hub), and a folder whose ``config.json`` or ``tokenizer_config.json`` carries an ``auto_map`` (a pointer at a
``.py`` file of custom code) is refused before anything is read (:func:`refuse_remote_code`), except the one
entry clex writes itself into saved CLEX folders (:data:`clex.hf.patch.OWN_AUTO_MAP`: ``clex_model.py``, which
only forwards stock transformers to clex, and which :func:`load_model` never runs: it reads those folders
itself). Weights are read by safetensors or by ``torch.load(weights_only=True)``: plain tensors, never code.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from ..core.checks import check_device, check_dtype
from ..core.config import CLEXConfig, check_keys
from .lookup import get_clex_rotary
from .patch import OWN_AUTO_MAP, apply_clex, split_rope_parameters
from .t_adapter import ADAPTER

#: Reference config keys that are CLEXConfig fields of the same name and meaning.
OFFICIAL_KEYS = ("max_factor", "param_factor", "act", "time_dt")
#: The other keys of the reference's rope_scaling: "type" / "rope_type" (must be "clex") and "factor" (1 in every
#: release, read by no CLEX code; any other value is refused rather than ignored). Any further key is refused.
OFFICIAL_FOREIGN_KEYS = ("type", "rope_type", "factor")
ODE_WEIGHTS = ("ode_up_proj", "ode_down_proj")
#: The files of a folder whose ``auto_map`` would make transformers import a .py file of the folder.
CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _read_json(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {_one_line(e)}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    return raw


#: auto_map entries of the authors' released CLEX folders that clex reads itself (their modeling file never runs)
MODEL_MAPS = ("AutoConfig", "AutoModel", "AutoModelForCausalLM")


def _is_authors_layout(raw: dict) -> bool:
    official = raw.get("rope_scaling") or {}
    return isinstance(official, dict) and "clex" in (official.get("type"), official.get("rope_type"))


def refuse_remote_code(path: str | Path) -> None:
    """A ValueError naming the file and the entry when the folder asks for custom code: an ``auto_map`` entry in
    one of :data:`CODE_MAPS`, except, in config.json, clex's own (:data:`clex.hf.patch.OWN_AUTO_MAP`) and the
    model entries of the authors' released CLEX layout (:data:`MODEL_MAPS`): :func:`load_model` builds those
    models itself. clex never runs code from a model folder, and says so rather than letting transformers ask
    on stdin."""
    path = Path(path)
    for name in CODE_MAPS:
        file = path / name
        if not file.is_file():
            continue
        raw = _read_json(file)
        auto_map = raw.get("auto_map")
        if not auto_map:
            continue
        entries = auto_map.items() if isinstance(auto_map, dict) else [("AutoTokenizer", auto_map)]  # legacy list
        for key, ref in entries:
            ours = OWN_AUTO_MAP.get(key) == ref or (_is_authors_layout(raw) and key in MODEL_MAPS)
            if name == "config.json" and ours:
                continue  # a CLEX folder (ours, the authors'): load_model builds its config and model itself
            refs = [r for r in (ref if isinstance(ref, (list, tuple)) else [ref]) if isinstance(r, str)]
            modules = ", ".join(sorted({r.split("--")[-1].rpartition(".")[0] + ".py" for r in refs})) or "a .py file"
            raise ValueError(
                f"{file}: auto_map entry {key!r}: {ref!r} asks to run custom code ({modules}); clex never runs code "
                "from a model folder: delete the auto_map entry to load the folder with transformers' own classes"
            )


def load_tokenizer(path: str | Path):
    """The tokenizer of a local model folder, by ``AutoTokenizer`` with ``trust_remote_code=False`` (nothing of
    the folder runs, nothing is fetched); a FileNotFoundError when the folder has none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"model folder {path} has no tokenizer (tokenizer.json or tokenizer_config.json); "
            "save one there with tokenizer.save_pretrained"
        )
    refuse_remote_code(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: its tokenizer cannot be loaded: {_one_line(e)}") from None


def read_config(path: str | Path) -> dict:
    """config.json of a model folder, with clear errors for a missing folder or file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a transformers model folder: it has no config.json")
    return _read_json(file)


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


def check_weight_files(path: Path) -> None:
    """Every weight file of the folder is readable: each safetensors file has a readable header and the size
    it declares; where no safetensors file exists, each ``*.bin`` holds plain tensors only (torch's
    ``weights_only`` loader; a pickle that would run code, or a damaged file, is named here in one line rather
    than deep inside transformers)."""
    from safetensors import safe_open

    tensors = sorted(path.glob("*.safetensors"))
    for file in tensors:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise ValueError(f"{file} is not a readable safetensors file: {_one_line(e)}") from e
    for file in [] if tensors else sorted(path.glob("*.bin")):
        try:
            try:
                torch.load(file, map_location="meta", weights_only=True, mmap=True)  # reads no tensor data
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                torch.load(file, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
        except Exception as e:  # UnpicklingError (a pickle with code), RuntimeError (damaged), ...
            # the why of torch's long message: its "WeightsUnpickler error: ..." or "... unsupported GLOBAL ..." line
            found = re.search(r"WeightsUnpickler error: ([^\n]+)|^([^\n]*unsupported GLOBAL[^\n]*)$", str(e), re.M)
            first = ((found.group(1) or found.group(2)) if found else _one_line(e)).split(". ")[0].strip()
            raise ValueError(
                f"{file} is not a weights file of plain tensors (torch's weights_only loader refuses it: {first}); "
                "clex never unpickles code: convert it to safetensors where it came from"
            ) from None


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
    **overrides: object,
) -> nn.Module:
    """Load a causal LM from a local folder, with CLEX when its config says so (or when ``clex`` is given).

    Folder kinds: saved by clex (``rope_parameters.rope_type == "clex"``), the authors' release layout
    (``rope_scaling.type == "clex"``), or a plain transformers folder (CLEX applied fresh if ``clex`` or
    ``overrides`` are given). Nothing of the folder runs (module docstring): a folder asking for custom code
    is refused, naming the file.

    Args:
        path: the local model folder (config.json and safetensors weights; nothing is fetched)
        dtype: "float32", "bfloat16" or "float16" (or the torch dtype); None: as saved
        device: where to put the model ("cpu", "cuda", "cuda:N", "mps"); None: the CPU
        attn_implementation: transformers' attention ("sdpa", "eager", ...); None: its default
        clex: a CLEXConfig (or dict) to apply instead of the saved one, or to a plain folder
        **overrides: CLEXConfig fields changed on the loaded config (e.g. ``inference_t="integer"``)

    Returns:
        The causal LM in eval mode, with CLEX when the folder (or ``clex``) says so.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    # Everything is checked before any weight is read. Nothing of the folder runs (module docstring): the
    # config object is built here, from_pretrained gets trust_remote_code=False, and weights are read by
    # safetensors or by torch.load(weights_only=True).
    dtype = check_dtype(dtype, where="load_model's dtype")
    device = None if device is None else torch.device(check_device(device, where="load_model's device"))
    if clex is not None and not isinstance(clex, (CLEXConfig, dict)):
        raise ValueError(f"load_model's clex must be a CLEXConfig, a dict or None, got {type(clex).__name__}")
    if isinstance(clex, dict):
        clex = CLEXConfig.from_dict(clex)
    check_keys(
        overrides, CLEXConfig.field_names(), where="load_model (keyword arguments past clex are CLEXConfig fields)"
    )
    path = Path(path)
    raw = read_config(path)
    refuse_remote_code(path)
    saved, cleaned = clex_config_of(raw)
    chosen = clex if clex is not None else saved
    if chosen is not None or overrides:
        chosen = (chosen or CLEXConfig()).replace(**overrides)
    model_type = cleaned.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path / 'config.json'} has no model_type; expected a transformers model folder")
    check_weight_files(path)
    config = AutoConfig.for_model(model_type, **cleaned)
    # use_kernels=False: transformers >= 5.25 would otherwise fetch hub kernels (code) where `kernels` is installed
    kwargs = {"config": config, "trust_remote_code": False, "local_files_only": True, "use_kernels": False}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
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
