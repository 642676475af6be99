"""Exporting a CLEX model for engines that know nothing of CLEX: stock transformers' ``longrope`` rope type.

At a fixed length factor t, CLEX is a set of RoPE frequencies θ(t). transformers' ``longrope`` holds one
per-pair factor list for positions up to ``original_max_position_embeddings`` (``short_factor``) and one past
it (``long_factor``), inv_freq_j = 1 / (factor_j · base^(2j/d)), and multiplies cos and sin by one
``attention_factor`` (transformers 5, ``_compute_longrope_parameters`` and ``longrope_frequency_update``:
the long factors are used when the forward's largest position id + 1 exceeds the original length, for the
whole forward; a prompt that crosses L is rotated with the long factors throughout). So an export for a
target length N (t = N/L) writes

    short_factor_j = 1,   long_factor_j = θ⁰_j / θ_j(N/L),   attention_factor = mscale(N/L) (1 without ``mscale``)

and the folder is plain RoPE up to L and CLEX at t = N/L past it — what :func:`clex.generate_fixed_t` gives a
generation that ends at N. ``mscale="yarn"`` scales q·k by mscale(t)², which ``attention_factor = mscale(t)``
on cos and sin reproduces past L; transformers has one attention factor for both regimes, so below L such an
export is the plain model with that temperature (said in the folder's ``clex_export.json``). vLLM reads
``short_mscale`` / ``long_mscale`` instead of ``attention_factor`` (both are written). ``log_scale`` scales q·k
by log(n)/log(L) for a forward over n > L keys; the export pins it at n = N, as it pins t (and as ``clex eval``
and :func:`clex.generate_fixed_t` do), so ``attention_factor`` also carries sqrt(log N / log L); a learned
temperature (``mscale="learned"``) enters the same way, as sqrt(τ(N/L)): ``attention_factor`` is the square
root of the rotary's ``query_scale_for(N, N/L)`` in every case. t-conditioned adapters (:mod:`clex.hf.t_adapter`)
are merged into their layers' weights at t = N/L (below L too: the folder says so).

``format="gguf"`` writes one LLaMA-family GGUF file instead (:mod:`clex.hf.to_gguf`): llama.cpp applies its
per-pair ``rope_freqs`` at every position, so that file is CLEX at t = N/L everywhere, below L too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, get_args

import torch

from ..core.checks import check_fits, solve_bytes
from ..core.io import atomic_write_bytes, atomic_write_text, follow_umask
from .generation import fixed_t
from .lookup import get_clex_rotary, text_config
from .t_adapter import fixed_t_state_dict
from .to_gguf import TokenizerPre, check_tokenizer_pre

Format = Literal["hf", "gguf"]
FORMATS: tuple[str, ...] = get_args(Format)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def longrope_parameters(model, length: int) -> dict:
    """The ``rope_parameters`` (type longrope) that hold a CLEX model's θ(length / L) past L (module docstring)."""
    check_length(model, length)
    rotary = get_clex_rotary(model)
    L = rotary.original_length
    t = length / L
    # The θ a forward inside fixed_t(model, t) uses: the ODE solved on fixed_t's own t grid (its table when t is
    # on the grid). A separate solve (inv_freq_at) or the continuous policy's finer grid gives θ that differ by up
    # to ~1e-3 relative (the solver's steps follow the requested times), enough for 1e-4 in logits at head_dim 64.
    with torch.no_grad(), fixed_t(model, t):
        theta = rotary.frequencies(torch.tensor([t], dtype=torch.float64))[0].double().cpu()
    theta0 = rotary.inv_freq.double().cpu()
    # q·k × the rotary's query scale at N keys and t (log scale, YaRN's or the learned temperature): its square
    # root on each of cos and sin
    saved_length, rotary.log_scale_length = rotary.log_scale_length, None
    try:
        factor = rotary.attention_scaling * math.sqrt(rotary.query_scale_for(float(length), t))
    finally:
        rotary.log_scale_length = saved_length
    plain = dict(getattr(text_config(model), "rope_parameters", None) or {})
    params = {k: v for k, v in plain.items() if k in ("rope_theta", "partial_rotary_factor")}
    return {
        **params,
        "rope_type": "longrope",
        "original_max_position_embeddings": L,
        "short_factor": [1.0] * theta.numel(),
        "long_factor": (theta0 / theta).tolist(),
        "attention_factor": factor,
        "short_mscale": factor,
        "long_mscale": factor,
    }


def export_files(folder: Path) -> list[Path]:
    """The files an hf export (or any ``save_pretrained`` with a tokenizer) writes that are in ``folder``: what
    ``overwrite`` replaces; every other file of the folder stays."""
    names = {"config.json", "generation_config.json", "clex_export.json", "clex_model.py", *_TOKENIZER_FILES}
    found = [folder / n for n in sorted(names) if (folder / n).is_file()]
    found += sorted(p for p in folder.glob("model*.safetensors*") if p.is_file())  # shards and their index
    return found


def _check_out(out: Path, source: str | Path | None, overwrite: bool, format: str) -> None:
    """``out`` may be written: not the source folder, not inside it and not holding it (a user's model is never
    written over, even with overwrite); an existing output only with ``overwrite``."""
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            relation = "is" if dst == src else "is inside" if src in dst.parents else "holds"
            raise ValueError(
                f"out {out} {relation} the model folder {source}: an export is written beside its model, never into "
                "or over it (even with --overwrite); pick an out outside the model folder"
            )
    if format == "gguf":
        if out.suffix != ".gguf":
            raise ValueError(f"out must be a file name ending in .gguf for format gguf, got {str(out)!r}")
        if out.is_dir():
            raise ValueError(f"out {out} is a folder; format gguf writes one file (a name ending in .gguf)")
        if out.exists() and not overwrite:
            raise ValueError(f"out {out} exists: pick a new file name, or overwrite=True (--overwrite) to replace it")
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file; format hf writes a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"out {out} is not empty: pick a new folder, or overwrite=True (--overwrite) to replace the export "
            "there (only the files an export writes are replaced)"
        )


def check_length(model, length: int) -> None:
    """``length`` an integer >= L whose frequencies can be solved in the memory free here: the export solves the
    ODE on fixed_t's grid, one row per integer t up to length / L (a clear error instead of the kernel's kill)."""
    rotary = get_clex_rotary(model)
    L = rotary.original_length
    if isinstance(length, bool) or not isinstance(length, int) or length < L:
        raise ValueError(f"length must be an integer >= L = {L} (the model's original length), got {length!r}")
    check_fits(
        "length",
        length,
        solve_bytes(math.ceil(length / L), rotary.inv_freq.numel()),
        hint=f"θ(length / L) is solved over every integer t up to length / L (L = {L}): give a smaller length",
    )


def export(
    model: torch.nn.Module,
    out: str | Path,
    *,
    length: int,
    format: Format = "hf",
    overwrite: bool = False,
    tokenizer_from: str | Path | None = None,
    tokenizer_pre: TokenizerPre | None = None,
    source: str | Path | None = None,
) -> Path:
    """Write a CLEX model at one target length for engines that know nothing of CLEX.

    ``format="hf"``: a folder that stock transformers (and vLLM) loads with no clex and no remote code, with
    CLEX's θ(length / L) past L and the model's own frequencies up to L (transformers' longrope rope type; see
    the module docstring). ``format="gguf"``: one ``.gguf`` file for llama.cpp with θ(length / L) at every
    position (:mod:`clex.hf.to_gguf`). Everything is checked before anything is written or removed.

    Args:
        model: a CLEX model (:func:`clex.apply_clex`, or loaded with :func:`clex.load_model`)
        out: the folder to write (hf: missing or empty, unless overwrite) or the .gguf file (gguf)
        length: the target length N, an integer >= L (the model's original length); t = N / L
        format: "hf" (longrope) or "gguf" (LLaMA-family GGUF with rope_freqs)
        overwrite: replace an earlier export at ``out``: only the files an export writes (config, weights,
            tokenizer, clex_export.json); other files of the folder stay
        tokenizer_from: a folder whose tokenizer files are copied (hf) or written into the GGUF (gguf: needed,
            a BPE tokenizer.json)
        tokenizer_pre: gguf only: llama.cpp's pre-tokenizer name (None: "default"); "smollm" for SmolLM2,
            "llama-bpe" for Llama 3
        source: the model's own folder, if any: ``out`` may not be it, inside it, or hold it

    Returns:
        ``out``, the folder or file written.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if tokenizer_pre is not None and format != "gguf":
        raise ValueError(
            f"tokenizer_pre={tokenizer_pre!r} applies to format gguf only (llama.cpp's pre-tokenizer); "
            f"format {format!r} copies the tokenizer files as they are: leave tokenizer_pre out"
        )
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    out = Path(out)
    _check_out(out, source, overwrite, format)
    check_length(model, length)
    if format == "gguf":
        check_tokenizer_pre(tokenizer_pre or "default")
        return _export_gguf(model, out, length=length, tokenizer_from=tokenizer_from, tokenizer_pre=tokenizer_pre)
    params = longrope_parameters(model, length)  # before anything at out is touched
    for file in export_files(out) if out.is_dir() else []:  # an earlier export (overwrite): its files only
        file.unlink()
    t = length / get_clex_rotary(model).original_length
    state = fixed_t_state_dict(model, t)  # t-conditioned adapters merged at t; the ODE weights stay behind
    type(model).save_pretrained(model, out, state_dict=state)  # the class's own: no CLEX config, no remote code
    file = out / "config.json"
    raw = json.loads(file.read_text())
    raw.pop("auto_map", None)
    raw["rope_parameters"] = params
    raw["max_position_embeddings"] = int(length)
    atomic_write_text(file, json.dumps(raw, indent=2, sort_keys=True) + "\n")
    if tokenizer_from is not None:
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                atomic_write_bytes(out / name, (Path(tokenizer_from) / name).read_bytes())
    c = get_clex_rotary(model).config
    note = {
        "exported_by": "clex",
        "length": int(length),
        "t": length / params["original_max_position_embeddings"],
        "clex": c.to_dict(),
        "below_L": "the plain model" + _below_L_scale(c),
    }
    atomic_write_text(out / "clex_export.json", json.dumps(note, indent=2) + "\n")
    follow_umask(out)  # the weights too (safetensors writes 0600): a served or shared export is readable
    return out


def _below_L_scale(c) -> str:
    """What the one attention factor (and the merged adapters) add below L (transformers' longrope has one for
    both regimes)."""
    temperature = {"yarn": ["YaRN's temperature"], "learned": ["the learned temperature of N"]}.get(c.mscale, [])
    parts = temperature + (["the log scale of N"] if c.log_scale else [])
    parts += ["the t-conditioned adapters at N"] if c.adapter_rank else []
    return f" with {' and '.join(parts)}" if parts else ""


def _export_gguf(model, out: Path, *, length: int, tokenizer_from, tokenizer_pre: str | None) -> Path:
    from .to_gguf import write_gguf

    params = longrope_parameters(model, length)
    L = params["original_max_position_embeddings"]
    note = {
        "exported_by": "clex",
        "length": int(length),
        "t": length / L,
        "clex": get_clex_rotary(model).config.to_dict(),
        "below_L": "CLEX at the same t (llama.cpp applies rope_freqs at every position)",
    }
    return write_gguf(
        model,
        out,
        length=length,
        params=params,
        note=note,
        tokenizer_from=tokenizer_from,
        tokenizer_pre=tokenizer_pre or "default",
    )


def run(
    model: str,
    out: str,
    *,
    length: int,
    format: Format = "hf",
    overwrite: bool = False,
    tokenizer_pre: TokenizerPre | None = None,
) -> int:
    """Export a CLEX model folder for stock transformers / vLLM (longrope) or llama.cpp (GGUF) at one target length.

    Args:
        model: a CLEX model folder (saved by clex, or the authors' layout)
        out: the folder to write (hf; must be empty or missing, unless --overwrite), or the .gguf file (gguf); never the model folder, inside it or holding it
        length: the target length N >= L: CLEX's θ(N/L) is used past L (hf: the plain model's frequencies up to L; gguf: θ(N/L) everywhere)
        format: hf (transformers' longrope rope type, also read by vLLM) or gguf (LLaMA-family GGUF with rope_freqs, for llama.cpp)
        overwrite: replace an earlier export at out (else refused): only the files an export writes; other files stay
        tokenizer_pre: gguf only: llama.cpp's pre-tokenizer name (tokenizer.ggml.pre): smollm for SmolLM2, llama-bpe for Llama 3 (default: default)
    """
    from .loading import load_model

    if isinstance(length, bool) or not isinstance(length, int):
        raise ValueError(f"length must be an integer, got {length!r}")
    if tokenizer_pre is not None and format != "gguf":  # before the model is loaded
        raise ValueError(f"--tokenizer-pre applies to --format gguf only, got --format {format} with {tokenizer_pre!r}")
    _check_out(Path(out), model, overwrite, format)  # before the model is loaded: nothing of it is at risk
    path = export(
        load_model(model),
        out,
        length=length,
        format=format,
        overwrite=overwrite,
        tokenizer_from=model,
        tokenizer_pre=tokenizer_pre,
        source=model,
    )
    where = "everywhere" if format == "gguf" else "past L"
    print(
        f"clex export: {path} ({'GGUF, rope_freqs' if format == 'gguf' else 'longrope'}, CLEX at t = {length}/L {where})"
    )
    return 0
