"""Training checkpoints: written atomically, found again on resume.

A checkpoint is ``out_dir/checkpoint-<step>``: accelerate's ``save_state`` (model, optimizer, every object
registered for checkpointing such as the LR scheduler, and each process's RNG states) plus
``trainer_state.json`` (step, data position, the CLEX rotary's draw counter, ...). Everything is written to
``out_dir/.tmp-checkpoint-<step>`` first and renamed into place with ``os.replace`` only when complete, so
a run killed at any moment leaves either the whole checkpoint or none (temp folders are ignored and
cleaned up by the next save).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step:06d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator, out_dir: str | Path, step: int, state: dict, *, keep: int = 0) -> Path:
    """Save the accelerator's state and ``state`` (JSON) as checkpoint-<step>, atomically; keep the newest
    ``keep`` checkpoints (0 = all). Every process must call it (each saves its own RNG state)."""
    out_dir = Path(out_dir)
    final = checkpoint_dir(out_dir, step)
    tmp = out_dir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        for stale in out_dir.glob(".tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w") as f:  # written last: its presence marks a complete checkpoint
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): move the old one aside first
            old = out_dir / f".tmp-old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(out_dir)
        if keep > 0:
            for _, old in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: str | Path) -> dict:
    """Restore the accelerator's state from ``folder`` and return its trainer state."""
    folder = Path(folder)
    file = folder / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint: it has no {STATE_FILE}")
    accelerator.load_state(str(folder))
    return json.loads(file.read_text())
