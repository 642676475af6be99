"""SmolLM2-135M on one GPU: fine-tune CLEX, PI and YaRN at the model's full 8k window with one budget, then
perplexity at 8k..64k and passkey at 16k..64k beside the untouched model (the CPU version is
experiments/smollm2-8k/run-cpu.sh). Every stage's wall time is recorded; results go to $OUT (or results/smollm2-gpu).

    python experiments/smollm2-8k/run.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf [--steps 100]
    # or in two steps, training then evaluation (same --work):
    python experiments/smollm2-8k/run.py --gguf ... --stages train --runs clex=clex clex-16x=clex:factor=16 pi=pi yarn=yarn
    python experiments/smollm2-8k/run.py --gguf ... --stages eval --runs ... --variants clex-logscale=clex:log_scale=true

--runs NAME=RECIPE[:KEY=VALUE,...]: train recipes/smollm2-RECIPE.yaml with these overrides, saved as NAME (a
NAME whose final model is already in --work is not trained again). --variants NAME=RUN:KEY=VALUE,...: evaluate
the trained RUN again with CLEX settings changed at load time (no training), e.g. log_scale.

Training: the recipes/smollm2-*.yaml files (LoRA + the CLEX ODE weights, PoSE positions) with rows of 8192
tokens (so CLEX's positions span 8192·t, t up to the recipe's factor 8 -> 64k), bfloat16 autocast.
Evaluation: held-out plays concatenated into one long document (the corpus's plays are ~45k SmolLM2 tokens
each); chunked protocol (= one full forward) at each length, `samples` windows per length.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--work", default="/tmp/clex-gpu")
    p.add_argument("--out", default=os.environ.get("OUT", "results/smollm2-gpu"))
    p.add_argument("--runs", nargs="+", default=["clex=clex", "pi=pi", "yarn=yarn"], help="NAME=RECIPE[:KEY=VALUE,...]")
    p.add_argument(
        "--variants", nargs="*", default=[], help="NAME=RUN:KEY=VALUE,...: a trained CLEX run, changed at load"
    )
    p.add_argument("--stages", default="train,eval", help="train, eval or both (comma-separated)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--ppl-lengths", default="8192,16384,32768,65536")
    p.add_argument("--passkey-lengths", default="16384,32768,65536")
    p.add_argument("--passkey-depths", default="0,0.5,1")
    p.add_argument("--passkey-trials", type=int, default=3, help="trials per (length, depth) cell")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", help="training autocast and evaluation dtype")
    a = p.parse_args()

    import torch

    from clex.data.corpus import split_plays
    from clex.data.smollm2 import convert
    from clex.eval.perplexity import run_ppl
    from clex.eval.plot import plot_freqs
    from clex.eval.retrieval import run_passkey
    from clex.train.config import TrainConfig
    from clex.train.loop import run as train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def timed(label, fn, *args, **kw):
        start = time.perf_counter()
        result = fn(*args, **kw)
        times[label] = round(time.perf_counter() - start, 1)
        print(f"== {label}: {times[label]} s", flush=True)
        (out / "timings.json").write_text(json.dumps(times, indent=1) + "\n")
        return result

    base = timed("convert", convert, a.gguf, work / "cache")
    held = split_plays()[1]
    doc = work / "heldout.txt"
    doc.write_text("\n\n".join(held.values()))

    stages = set(a.stages.split(","))
    finals = {"base": base}
    for run in a.runs:
        name, _, rest = run.partition("=")
        recipe, _, extra = rest.partition(":")
        final = work / name / "final"
        if (final / "config.json").is_file():
            finals[name] = final
            continue
        if "train" not in stages:
            raise SystemExit(f"--runs {run}: no trained model at {final}; run with --stages train first")
        cfg = TrainConfig.from_file(
            f"recipes/smollm2-{recipe}.yaml",
            [
                f"model={base}",
                f"out_dir={work / name}",
                f"seq_len={a.seq_len}",
                f"batch_size={a.batch}",
                f"steps={a.steps}",
                f"dtype={a.dtype}",
                "gradient_checkpointing=true",
                "save_every=0",
                "eval_every=0",
                "log_every=10",
                *filter(None, extra.split(",")),
            ],
        )
        finals[name] = timed(f"train {name}", train, cfg)
        text = (work / name / "log.jsonl").read_text()
        (out / f"log_{name}.jsonl").write_text(text)
        log = [json.loads(x) for x in text.splitlines() if x.strip()]
        print(f"   {name} loss by step:", [(r["step"], round(r["loss"], 3)) for r in log if "loss" in r])
    if "eval" not in stages:
        print(json.dumps(times))
        return

    specs = [f"{n}={p}" for n, p in finals.items()]
    for v in a.variants:  # NAME=RUN:KEY=VALUE,...
        name, _, rest = v.partition("=")
        run, _, params = rest.partition(":")
        specs.append(f"{name}={finals[run]}:clex:{params}")
    timed(
        "ppl",
        run_ppl,
        specs,
        lengths=a.ppl_lengths,
        protocol="chunked",
        documents=str(doc),
        samples=a.samples,
        device=device,
        dtype=a.dtype,
        out_dir=str(out),
        name="ppl",
        overwrite=True,  # this stage's own result, remade when the stage runs again
    )
    for name in finals:
        if name.startswith("clex"):
            timed(f"freqs {name}", plot_freqs, finals[name], ts=(1, 2, 4, 8, 16), out_dir=out, name=f"freqs_{name}")
            (out / f"freqs_{name}.json").unlink(missing_ok=True)
    depths = tuple(float(x) for x in a.passkey_depths.split(","))
    timed(
        "passkey",
        run_passkey,
        specs,
        lengths=a.passkey_lengths,
        depths=depths,
        samples=a.passkey_trials,
        device=device,
        dtype=a.dtype,
        out_dir=str(out),
        name="passkey",
        overwrite=True,
    )
    for f in ("ppl.md", "passkey.md"):
        print((out / f).read_text())
    print(json.dumps(times))


if __name__ == "__main__":
    main()
