"""SmolLM2-135M on one GPU: fine-tune CLEX, PI and YaRN at the model's full 8k window with one budget, then
perplexity at 8k..64k and passkey at 16k..64k beside the untouched model (issue 8; the CPU version is
recipes/smollm2.sh). Every stage's wall time is recorded; results go to $OUT (or results/smollm2-gpu).

    python scripts/gpu_smollm2.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf [--steps 100] [--quick]

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
    p.add_argument("--methods", default="clex,pi,yarn")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--ppl-lengths", default="8192,16384,32768,65536")
    p.add_argument("--passkey-lengths", default="16384,32768,65536")
    p.add_argument("--passkey-trials", type=int, default=3)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", help="training autocast and evaluation dtype")
    a = p.parse_args()

    from clex.corpus import split_plays
    from clex.evaluate import run_ppl
    from clex.plot import plot_freqs
    from clex.retrieval import run_passkey
    from clex.smollm2 import convert
    from clex.train import run as train
    from clex.train_config import TrainConfig

    import torch

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

    finals = {"base": base}
    for m in filter(None, a.methods.split(",")):
        cfg = TrainConfig.from_file(f"recipes/smollm2-{m}.yaml", [
            f"model={base}", f"out_dir={work / m}", f"seq_len={a.seq_len}", f"batch_size={a.batch}",
            f"steps={a.steps}", f"dtype={a.dtype}", "gradient_checkpointing=true", "save_every=0",
            "eval_every=0", "log_every=10",
        ])  # fmt: skip
        finals[m] = timed(f"train {m}", train, cfg)
        log = [json.loads(x) for x in (work / m / "log.jsonl").read_text().splitlines() if x.strip()]
        print(f"   {m} loss by step:", [(r["step"], round(r["loss"], 3)) for r in log if "loss" in r])

    specs = [f"{n}={p}" for n, p in finals.items()]
    timed("ppl", run_ppl, specs, lengths=a.ppl_lengths, protocol="chunked", documents=str(doc), samples=a.samples,
          device=device, dtype=a.dtype, out_dir=str(out), name="ppl")  # fmt: skip
    if "clex" in finals:
        timed("freqs", plot_freqs, finals["clex"], ts=(1, 2, 4, 8, 16), out=out / "freqs.png")
        (out / "freqs.json").unlink(missing_ok=True)
    timed("passkey", run_passkey, specs, lengths=a.passkey_lengths, depths=(0.0, 0.5, 1.0), trials=a.passkey_trials,
          device=device, dtype=a.dtype, out_dir=str(out), name="passkey")  # fmt: skip
    for f in ("ppl.md", "passkey.md"):
        print((out / f).read_text())
    print(json.dumps(times))


if __name__ == "__main__":
    main()
