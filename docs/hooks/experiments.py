"""mkdocs hook: the experiments/ tree is part of the site, so that a page's link to a result, a figure or an
experiment's README (written ``/experiments/...``, which GitHub resolves from the repository root too) is
checked by ``mkdocs build --strict`` and served beside the pages."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
SKIP = {".jsonl", ".log", ".txt", ".tsv"}  # training logs: linked from nowhere, kept out of the site


def on_files(files: Files, config) -> Files:
    for path in sorted((ROOT / "experiments").rglob("*")):
        if path.is_file() and path.suffix not in SKIP and "__pycache__" not in path.parts:
            rel = path.relative_to(ROOT).as_posix()
            files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
