"""Training checkpoints: written atomically, found again on resume, never unpickled.

A checkpoint is ``out_dir/checkpoint-<step>``: accelerate's ``save_state`` (model weights as safetensors,
the optimizer as a torch file read back with ``weights_only=True``) plus our own plain files:
``scheduler.json`` (the LR scheduler's numbers; its lambdas are rebuilt from the config),
``random_states_<rank>.json`` (each process's python / numpy / torch RNG states) and, last,
``trainer_state.json`` (step, data position, the CLEX rotary's draw counter, ...). Nothing is registered with
accelerate for checkpointing and accelerate's own RNG pickle is deleted right after it is written: a
checkpoint holds no pickle, and any ``*.pkl`` found in one (planted, or from an older version) is ignored
with a warning, hidden from accelerate so that it never loads it.

Everything is written to ``out_dir/.tmp-checkpoint-<step>`` first and renamed into place with ``os.replace``
only when complete, so a run killed at any moment leaves either the whole checkpoint or none (temp folders
are ignored and cleaned up by the next save). On resume, a checkpoint whose files are damaged (a truncated
safetensors or torch file, unparsable JSON) is skipped with a warning naming the file, for the previous one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from ..core.io import atomic_write_text, follow_umask

STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "random_states_{rank}.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STATE_KEYS = ("step", "data_position", "draws", "tokens")  # non-negative integers


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from (the message names the file)."""


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


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


# --- safe state: RNG and scheduler as JSON --------------------------------------------------------------


def rng_state() -> dict:
    """This process's python, numpy and torch (CPU, CUDA) RNG states, as plain JSON values."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict, file: Path) -> None:
    """Restore what :func:`rng_state` returned (read from ``file``, named in the error if it is malformed)."""
    import numpy as np

    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(name), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CheckpointError(
            f"{file} is not a valid RNG state ({type(e).__name__}: {e}); "
            "it must hold python, numpy and torch states as written by clex"
        ) from None


def _plain(value) -> bool:
    if isinstance(value, (bool, int, float)) or value is None:
        return True
    return isinstance(value, list) and all(isinstance(v, (bool, int, float)) for v in value)


def scheduler_state(scheduler) -> dict:
    """The LR scheduler's state without its lambdas (rebuilt from the config): numbers and lists of numbers."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas" and _plain(v)}


def set_scheduler_state(scheduler, state, file: Path) -> None:
    """Restore :func:`scheduler_state` into a scheduler rebuilt from the config."""
    current = scheduler_state(scheduler)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} must hold a mapping of scheduler fields, got {type(state).__name__}")
    unknown = sorted(set(state) - set(current))
    bad = sorted(
        k
        for k in state
        if k in current and (not _plain(state[k]) or isinstance(state[k], list) != isinstance(current[k], list))
    )
    if unknown or bad:
        raise CheckpointError(
            f"{file} has unknown or malformed scheduler fields {unknown + bad}; "
            f"allowed: {', '.join(sorted(current))} (numbers or lists of numbers)"
        )
    for k in ("base_lrs", "_last_lr"):
        if k in state and len(state[k]) != len(current[k]):
            raise CheckpointError(
                f"{file}: {k} has {len(state[k])} values but the optimizer has {len(current[k])} "
                "parameter groups (was the run's `train` or `clex_lr` changed?)"
            )
    scheduler.__dict__.update(state)


def _scheduler_from_step(scheduler, step: int) -> None:
    """An older checkpoint without scheduler.json: the LambdaLR state after ``step`` steps, from its lambdas."""
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    scheduler._last_lr = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


# --- save -------------------------------------------------------------------------------------------------


def save_checkpoint(accelerator, out_dir: str | Path, step: int, state: dict, *, keep: int = 0, scheduler=None) -> Path:
    """Save the accelerator's state, ``scheduler``'s state and ``state`` (JSON) as checkpoint-<step>,
    atomically; keep the newest ``keep`` checkpoints (0 = all). Every process must call it (each saves its
    own RNG state)."""
    out_dir = Path(out_dir)
    final = checkpoint_dir(out_dir, step)
    tmp = out_dir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        for stale in out_dir.glob(".tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # accelerate's pickle: ours is JSON
    _write_json(tmp / RNG_FILE.format(rank=rank), rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for pickle_file in tmp.glob("*.pkl"):  # nothing registered writes one; never leave one to be loaded
            pickle_file.unlink()
        if scheduler is not None:
            _write_json(tmp / SCHEDULER_FILE, scheduler_state(scheduler))
        _write_json(tmp / STATE_FILE, state)  # written last: its presence marks a complete checkpoint
        follow_umask(tmp)  # accelerate's safetensors and torch files are 0600: the user's umask decides
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


# --- check and load -------------------------------------------------------------------------------------


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None


def read_trainer_state(folder: str | Path) -> dict:
    """The trainer state of a checkpoint, checked: a mapping of non-negative integers (step, data_position, ...)."""
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: it has no {STATE_FILE}")
    state = _read_json(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} must hold a mapping of trainer fields, got {type(state).__name__}")
    for key in _STATE_KEYS:
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{file}: {key} must be an integer >= 0, got {value!r}")
    return {key: state.get(key, 0) for key in _STATE_KEYS} | {k: v for k, v in state.items() if k not in _STATE_KEYS}


def _check_safetensors(file: Path) -> None:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise CheckpointError(f"{file} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{file} has a damaged safetensors header ({e})") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{file} is truncated: its header needs {8 + n + end} bytes, the file has {size}")


def check_checkpoint(folder: str | Path) -> dict:
    """Check every file of a checkpoint folder that can be checked without loading it; -> trainer state.
    Raises :class:`CheckpointError` naming the first damaged file."""
    folder = Path(folder)
    state = read_trainer_state(folder)
    for file in sorted(folder.iterdir()):
        if not file.is_file():
            continue
        if file.suffix == ".json" and file.name != STATE_FILE:
            _read_json(file)
        elif file.suffix == ".safetensors":
            _check_safetensors(file)
        elif file.suffix in (".bin", ".pt") and not zipfile.is_zipfile(file):  # torch.save writes zip archives
            raise CheckpointError(f"{file} is truncated or not a torch file ({file.stat().st_size} bytes)")
    return state


def _staged(folder: Path) -> tuple[Path, list[str]]:
    """A temporary folder of links to ``folder``'s entries except its pickles; -> (folder, pickles left out)."""
    stage = Path(tempfile.mkdtemp(prefix="clex-resume-"))
    refused = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix == ".pkl":
            refused.append(entry.name)
        else:
            (stage / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return stage, refused


def load_checkpoint(accelerator, folder: str | Path, scheduler=None) -> dict:
    """Restore the accelerator's state (model, optimizer), this process's RNG states and ``scheduler``'s
    state from ``folder``; return its trainer state. Pickles in the folder are ignored (with a warning)."""
    folder = Path(folder)
    state = check_checkpoint(folder)
    stage, refused = _staged(folder)
    if refused:
        warnings.warn(
            f"{folder}: ignored {', '.join(refused)}: clex never unpickles checkpoint files (a pickle "
            "can run any code); its own state is in JSON and safetensors files",
            stacklevel=2,
        )
    try:
        accelerator.load_state(str(stage))
    except Exception as e:  # a damaged file the checks above could not see
        raise CheckpointError(f"{folder} could not be loaded ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    rng_file = folder / RNG_FILE.format(rank=accelerator.process_index)
    if rng_file.is_file():
        set_rng_state(_read_json(rng_file), rng_file)
    else:
        warnings.warn(f"{folder} has no {rng_file.name}: this process's random states were not restored", stacklevel=2)
    if scheduler is not None:
        file = folder / SCHEDULER_FILE
        if file.is_file():
            set_scheduler_state(scheduler, _read_json(file), file)
        else:
            warnings.warn(
                f"{folder} has no {SCHEDULER_FILE}: the LR schedule is rebuilt at step {state['step']}", stacklevel=2
            )
            _scheduler_from_step(scheduler, state["step"])
    return state


def resume_checkpoint(accelerator, out_dir: str | Path, scheduler=None) -> tuple[Path, dict]:
    """Load the newest usable checkpoint of ``out_dir`` (a damaged one is skipped with a warning naming the
    file, for the one before); -> (its folder, its trainer state). ValueError when there is none."""
    found = list_checkpoints(out_dir)
    if not found:
        raise ValueError(
            f"resume=true but {out_dir} holds no complete checkpoint (checkpoint-*/{STATE_FILE}): "
            "drop --resume to start a fresh run, or point out_dir at the run to continue"
        )
    problems = []
    for _, folder in reversed(found):
        try:
            return folder, load_checkpoint(accelerator, folder, scheduler)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"skipping checkpoint {folder.name}: {e}", stacklevel=2)
    raise ValueError(f"no usable checkpoint in {out_dir}: " + "; ".join(problems))
