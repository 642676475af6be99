"""Checks of the arguments the pipelines share, each a ValueError of one line naming the field, the value and
what is allowed: counts, lists of lengths and of fractions, dtype and device names, the file stem of a result,
and sizes against the memory this machine has free (before anything is allocated). torch only.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal, get_args

import torch

#: dtype names the loaders and pipelines take ("as saved" is None).
DType = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(DType)


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


def check_dtype(dtype, *, where: str = "dtype") -> str | None:
    """The name of ``dtype`` (one of :data:`DTYPES`, given as a name or a torch.dtype), or None for None (as
    saved); else a ValueError naming the value and the allowed ones."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if isinstance(name, str) and name in DTYPES:
        return name
    raise ValueError(f"{where} must be one of {', '.join(DTYPES)} (or none: as saved), got {dtype!r}")


def check_device(device, *, where: str = "device") -> str:
    """``device`` (a name or a torch.device) as text if it is cpu, cuda, cuda:N or mps and available here, else a
    ValueError naming it."""
    text = str(device)
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise ValueError(f"{where} must be one of cpu, cuda, cuda:N (N a GPU index), mps, got {device!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{where} {device!r} is not available: torch finds no CUDA GPU here; use cpu")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"{where} {device!r} is not available: torch finds {torch.cuda.device_count()} CUDA GPU(s)"
            )
    if text == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{where} 'mps' is not available here (torch.backends.mps.is_available() is False)")
    return text


def check_name(name, field: str = "name") -> str:
    """``name`` if it is a plain file stem (results go to ``<out_dir>/<name>.json``): no folder part, not
    hidden, not empty; else a ValueError. Nothing may be written outside the output folder."""
    text = str(name) if isinstance(name, (str, Path)) else None
    if not text or text.strip() != text or text.startswith(".") or any(c in text for c in "/\\\x00:"):
        raise ValueError(
            f"{field} must be a plain file stem like 'ppl' (no '/', '\\', ':', no leading '.'; the files go into "
            f"the output folder), got {name!r}"
        )
    return text


# --- sizes against memory -----------------------------------------------------------------------------------

GiB = 2**30

#: Bytes one t of CLEX's frequency table takes while it is solved (rk4-fused, no gradients): ``ROW_BYTES +
#: PAIR_BYTES`` x (d/2). Measured (peak RSS over the solve, torch 2.13 CPU): 9.7 KB a row at d/2 = 8 and 15.4 KB
#: at d/2 = 32, from 80,000-row solves; most of it is the solver's per-step tensors, not the table itself.
ROW_BYTES, PAIR_BYTES = 8_200, 240


def solve_bytes(rows: int, pairs: int) -> int:
    """Memory a frequency table of ``rows`` values of t and ``pairs`` frequencies takes while it is solved."""
    return int(rows) * (ROW_BYTES + PAIR_BYTES * int(pairs))


def free_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes free for new tensors on ``device``: a CUDA GPU's free memory, else the host's available memory
    (Linux: MemAvailable of /proc/meminfo); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(field: str, value, need: int, *, device: str | torch.device = "cpu", hint: str = "") -> None:
    """A ValueError naming ``field`` and ``value`` when ``need`` bytes (a lower bound of what the work will
    allocate) exceed what ``device`` has free: a clear error before the allocation, instead of the kernel's
    out-of-memory kill minutes later."""
    free = free_memory(device)
    if free is None or need <= free:
        return
    where = "this GPU" if torch.device(device).type == "cuda" else "this machine"
    raise ValueError(
        f"{field}={value} needs at least {need / GiB:.1f} GiB, but {where} has {free / GiB:.1f} GiB free"
        + (f"; {hint}" if hint else "")
    )
