"""The run folder (out_dir) of `clex train`: what a run leaves there, and the rules that keep runs apart.

A fresh run into a folder that holds a run is refused unless overwrite=true (which removes the old run's files
first: nothing of it is mixed into the new one); resume=true needs a complete checkpoint; a resume with other
loss-curve fields warns; the log is cut back to the checkpoint a resume starts from.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from ..core.io import atomic_write_text
from .checkpoints import list_checkpoints
from .config import TrainConfig

#: The config fields that shape the loss curve: a resume with other values warns.
_CURVE_FIELDS = (
    "model",
    "method",
    "factor",
    "clex",
    "rope",
    "pose",
    "data",
    "seq_len",
    "held_out",
    "steps",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup_ratio",
    "schedule",
    "weight_decay",
    "train",
    "seed",
)


def trim_log(log_file: Path, step: int) -> None:
    """Drop records past ``step`` (written by a run killed after its last checkpoint). A half-written last
    line (a kill mid-write: it follows the checkpoint) is dropped too; any other bad line is an error."""
    if not log_file.is_file():
        return
    text = log_file.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    keep = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = record["step"]
            if isinstance(record_step, bool) or not isinstance(record_step, int):
                raise ValueError(f"step must be an integer, got {record_step!r}")
        except (ValueError, KeyError, TypeError) as e:
            if number == len(lines) and not text.endswith("\n"):
                warnings.warn(
                    f"{log_file} line {number} is half-written (the run was killed mid-write): dropped", stacklevel=3
                )
                continue
            raise ValueError(
                f"{log_file} line {number} is not a log record ({type(e).__name__}: {e}); "
                "each line must be a JSON object with an integer step"
            ) from None
        if record_step <= step:
            keep.append(line)
    atomic_write_text(log_file, "".join(line + "\n" for line in keep))


#: What a run leaves in out_dir: a fresh run into a folder that holds any of them is refused (or, with
#: overwrite=true, they are removed first: nothing of the old run is mixed into the new one).
_RUN_FILES = ("final", "log.jsonl", "config.yaml")


def previous_run(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    found = [out_dir / name for name in _RUN_FILES if (out_dir / name).exists()]
    found += sorted(
        p for p in out_dir.iterdir() if p.name.startswith(("checkpoint-", ".tmp-checkpoint-", ".tmp-old-checkpoint-"))
    )
    return found


def check_out_dir(config: TrainConfig, out_dir: Path) -> None:
    """Nothing lost, nothing silently replaced: a fresh run needs an empty out_dir (or overwrite=true); a
    resume needs a checkpoint."""
    if config.resume:
        if not list_checkpoints(out_dir):
            raise ValueError(
                f"resume=true but out_dir {out_dir} holds no complete checkpoint (checkpoint-*/trainer_state.json): "
                "drop --resume to start a fresh run, or point out_dir at the run to continue"
            )
        return
    previous = previous_run(out_dir)
    if previous and not config.overwrite:
        names = ", ".join(p.name for p in previous[:6]) + (", ..." if len(previous) > 6 else "")
        raise ValueError(
            f"out_dir {out_dir} already holds a run ({names}): set resume=true (--resume) to continue it, "
            "overwrite=true (--overwrite) to replace it, or pick a new out_dir"
        )


def remove_previous_run(out_dir: Path) -> None:
    for p in previous_run(out_dir):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def changed_fields(out_dir: Path, config: TrainConfig) -> list[str]:
    """The loss-curve fields whose value in ``out_dir/config.yaml`` (the run there) differs from ``config``'s;
    [] when out_dir holds no config.yaml. A ValueError naming the file when it cannot be read."""
    file = out_dir / "config.yaml"
    if not file.is_file():
        return []
    from .config import read_config_file

    old, new = read_config_file(file), config.to_dict()
    return [k for k in _CURVE_FIELDS if k in old and old[k] != new[k]]


def check_resume_config(out_dir: Path, config: TrainConfig) -> None:
    try:
        changed = changed_fields(out_dir, config)
    except ValueError as e:  # it names the file; the resume itself needs only the checkpoint
        warnings.warn(f"cannot compare the resumed run with its first config: {e}", stacklevel=3)
        return
    if changed:
        warnings.warn(
            f"resuming {out_dir} with changed fields {changed}: the loss curve will differ from the first run's",
            stacklevel=3,
        )
