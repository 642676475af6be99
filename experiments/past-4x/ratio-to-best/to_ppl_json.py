"""Write evaluations of ``experiments/run.py eval`` (one ``eval_<model>.json`` per model, every document inside)
as ``clex eval ppl`` results (one JSON per document, every model inside), so that ``clex eval compare`` reads them.

    python experiments/past-4x/ratio-to-best/to_ppl_json.py --out-dir OUT NAME=EVAL_JSON [NAME=EVAL_JSON ...]
    # -> OUT/ppl-<doc>.json for each document the evaluations hold (plays, kjv)

Nothing is measured again: each length's perplexity (and its windows) is copied as it was measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORIGINAL_LENGTH = 8192  # SmolLM2-135M's window: every model of these evaluations was fine-tuned from it


def convert(models: dict[str, Path]) -> dict[str, dict]:
    """``{doc: payload}``: one ``clex eval ppl``-shaped payload per document, every model's results in it."""
    evals = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in models.items()}
    docs = sorted({doc for e in evals.values() for doc in e["docs"]})
    out = {}
    for doc in docs:
        lengths = sorted({int(n) for e in evals.values() for n in e["docs"].get(doc, {})})
        out[doc] = {
            "task": "perplexity",
            "config": {
                "lengths": lengths,
                "protocol": "chunked",
                "documents": doc,
                "samples": 2,
                "buckets": 8,
                "converted_from": {name: str(path) for name, path in models.items()},
            },
            "seed": None,
            "models": {
                name: {
                    "spec": {"source": str(models[name]), "evaluated_as": e.get("model")},
                    "original_length": ORIGINAL_LENGTH,
                    "results": {
                        n: {"length": int(n), "sequences": len(cell.get("ppl_windows", [])), **cell}
                        for n, cell in sorted(e["docs"].get(doc, {}).items(), key=lambda kv: int(kv[0]))
                    },
                }
                for name, e in evals.items()
            },
            "versions": {"measured_with": "see the README beside the source files"},
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="NAME=EVAL_JSON: a model's name in the output and its evaluation")
    p.add_argument("--out-dir", required=True, help="folder for ppl-<doc>.json")
    a = p.parse_args()
    models = {}
    for item in a.models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"models entry {item!r} must be NAME=EVAL_JSON")
        models[name] = Path(path)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for doc, payload in convert(models).items():
        (out / f"ppl-{doc}.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out / f'ppl-{doc}.json'} ({len(payload['models'])} models)")


if __name__ == "__main__":
    main()
