"""RULER's offline tasks in lm-eval: which run here, which cannot and why, and their samples.

:data:`TASKS` run offline (their haystacks are synthetic); :data:`SKIPPED` are lm-eval's other RULER tasks,
each with the reason it is left out. :func:`generate` makes a cell's samples with lm-eval's own generators
(``generate_samples`` of ``prepare_niah``, ``sys_vartrack_w_noise_random``, ``sys_word_pair_random``,
``sys_kwext``), called with the model's own tokenizer object (never the hub) for ``samples`` samples of exactly
this length, where lm-eval's ``custom_dataset`` functions always build 500 per length (about 20 s of
tokenising per task at 16k and 4x that at 64k, for samples we would not run). Samples depend on
(seed, task, n) only: Python's and NumPy's generators are seeded per cell.
"""

from __future__ import annotations

import random
import zlib
from typing import Literal

#: lm-eval's RULER task names, :data:`TASKS` then :data:`SKIPPED` (the CLI's choices for ``--tasks``, so that a
#: skipped one is refused by :func:`check_tasks` with its reason; a test keeps this equal to the two registries).
RulerTask = Literal[
    "niah_single_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "ruler_vt",
    "ruler_cwe",
    "ruler_fwe",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multiquery",
    "niah_multivalue",
    "ruler_qa_squad",
    "ruler_qa_hotpot",
]
#: The offline RULER tasks: lm-eval task name -> (generator, its settings as in lm-eval's ruler/*_utils.py).
TASKS = {
    "niah_single_1": ("niah", {"type_haystack": "repeat", "type_needle_k": "words", "type_needle_v": "numbers"}),
    "niah_multikey_2": ("niah", {"type_haystack": "needle", "type_needle_k": "words", "type_needle_v": "numbers"}),
    "niah_multikey_3": ("niah", {"type_haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids"}),
    "ruler_vt": ("vt", {}),
    "ruler_cwe": ("cwe", {}),
    "ruler_fwe": ("fwe", {}),
}
_ESSAY = (
    "its haystack is Paul Graham's essays, which lm-eval's get_haystack loads from the hub "
    "(datasets.load_dataset('baber/paul_graham_essays'), with no setting to give another text), and it splits "
    "sentences with NLTK's punkt_tab data, which nltk downloads at run time (no pip package of NLTK ships it)"
)
#: The other RULER tasks of lm-eval, left out, with why.
SKIPPED = {
    **{t: _ESSAY for t in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue")},
    "ruler_qa_squad": "its documents and questions are SQuAD v2, which lm-eval downloads from the hub",
    "ruler_qa_hotpot": "its documents and questions are HotpotQA, which lm-eval downloads from the hub",
}


def check_tasks(tasks) -> list[str]:
    items = [tasks] if isinstance(tasks, str) else list(tasks)  # "a,b", ["a", "b"] and ["a,b"] alike
    names = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not names:
        raise ValueError(f"tasks: give at least one of {', '.join(TASKS)}, got none")
    for name in names:
        if name in SKIPPED:
            raise ValueError(f"task {name!r} cannot run offline: {SKIPPED[name]}; offline tasks: {', '.join(TASKS)}")
        if name not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    return list(dict.fromkeys(names))


def generate(task: str, tokenizer, length: int, samples: int, seed: int) -> list[dict]:
    """``samples`` RULER samples of ``task`` at ``length`` tokens by lm-eval's own generator (module docstring).

    -> lm-eval's records (``input``, ``outputs`` = the expected strings, ``gen_prefix``, ``length``,
    ``max_length``). A ValueError naming the task and the length when the length cannot hold the task.
    """
    import numpy as np

    kind, settings = TASKS[task]
    _check_room(kind, task, tokenizer, length)
    cell_seed = zlib.crc32(f"{seed}:{task}:{length}".encode())
    random.seed(cell_seed)
    np.random.seed(cell_seed)
    try:
        if kind == "niah":
            from lm_eval.tasks.ruler import niah_utils, prepare_niah

            haystack = prepare_niah.get_haystack(type_haystack=settings["type_haystack"])
            out = prepare_niah.generate_samples(
                haystack,
                TOKENIZER=tokenizer,
                max_seq_length=length,
                template=niah_utils.TEMPLATE,
                num_samples=samples,
                **settings,
            )
        elif kind == "vt":
            from lm_eval.tasks.ruler import vt_utils

            def vt():
                icl = vt_utils.sys_vartrack_w_noise_random(
                    tokenizer=tokenizer, num_samples=1, max_seq_length=500, incremental=5
                )[0]
                return vt_utils.sys_vartrack_w_noise_random(
                    tokenizer=tokenizer, num_samples=samples, max_seq_length=length, icl_example=icl
                )

            out = _vt_reseeded(vt, cell_seed, task, length)
        elif kind == "cwe":
            from lm_eval.tasks.ruler import cwe_utils

            if isinstance(getattr(cwe_utils, "RNG", None), random.Random):
                cwe_utils.RNG.seed(cell_seed)
            out = cwe_utils.sys_word_pair_random(num_samples=samples, max_seq_length=length, tokenizer=tokenizer)
        else:
            from lm_eval.tasks.ruler import fwe_utils

            out = fwe_utils.sys_kwext(tokenizer=tokenizer, max_seq_length=length, num_samples=samples)
    except (ValueError, AssertionError, IndexError, ZeroDivisionError, RecursionError) as e:
        raise ValueError(
            f"lengths: {length} tokens is too short for {task} with this tokenizer "
            f"(lm-eval: {' '.join(str(e).split())[:200]}); give a longer length"
        ) from None
    out = [r for r in out if r.get("length", 0) <= length and r.get("outputs")]
    if not out:
        raise ValueError(
            f"lengths: {length} tokens is too short for {task} with this tokenizer "
            "(lm-eval made no sample that fits); give a longer length"
        )
    return out


#: attempts of a vt cell before it fails (see _vt_reseeded)
_VT_ATTEMPTS = 8


def _vt_reseeded(make, seed: int, task: str, length: int):
    """``make()`` of lm-eval's variable-tracking generator, reseeded until it works: lm-eval 0.4.13's
    ``generate_chains`` raises IndexError whenever its random variable names repeat (it appends more names,
    so the list no longer splits into chains; about 1 seed in 1,700 for its 3-letter few-shot names). Attempt
    k seeds Python's and NumPy's generators with (seed + k): deterministic, and each cell still depends on
    (seed, task, n) only. A RuntimeError naming the task and the length after _VT_ATTEMPTS attempts."""
    import numpy as np

    for attempt in range(_VT_ATTEMPTS):
        random.seed((seed + attempt) % 2**32)
        np.random.seed((seed + attempt) % 2**32)
        try:
            return make()
        except IndexError:
            continue
    raise RuntimeError(
        f"lm-eval's {task} generator failed {_VT_ATTEMPTS} times at {length} tokens (IndexError in its "
        "generate_chains, reseeded each time)"
    )


def _too_short(task: str, length: int, need: int, what: str) -> ValueError:
    return ValueError(
        f"lengths: {length} tokens is too short for {task} with this tokenizer: {what} takes "
        f"{need} tokens; give a length of at least {need + 1}"
    )


def _check_room(kind: str, task: str, tokenizer, length: int) -> None:
    """Refuse a length the generator cannot fill: lm-eval's vt, cwe and fwe generators would loop forever
    (they shrink the haystack in a ``while True`` until it fits); niah raises by itself. The smallest prompt
    each generator tries, measured with this tokenizer, must fit with the answer's ``tokens_to_generate``."""

    def size(text: str) -> int:
        return len(tokenizer(text).input_ids)

    state = random.getstate()
    try:
        if kind == "vt":
            from lm_eval.tasks.ruler import vt_utils

            icl, _ = _vt_reseeded(lambda: vt_utils.generate_input_output(5, 1, 4, is_icl=True), 0, task, length)
            if size(icl) + 30 > 500:  # its few-shot example: 500 tokens at most
                raise ValueError(
                    f"task {task} cannot run with this tokenizer: lm-eval builds its few-shot example "
                    f"within 500 tokens, and the smallest one takes {size(icl) + 30}"
                )
            text, _ = _vt_reseeded(lambda: vt_utils.generate_input_output(10, 1, 4), 0, task, length)
            need = size(text) + 2 * size(icl) + 30  # + the example (prompt and answer) + the answer
            if need > length:
                raise _too_short(task, length, need, "the smallest prompt (10 noise lines), its example and answer")
        elif kind == "cwe":
            from lm_eval.tasks.ruler import cwe_utils

            example, text, answer = cwe_utils.generate_input_output(10, length)  # as its search loop measures
            need = size(example + "\n" + text + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))) + 120
            if need > length:  # lm-eval would go on with 0 words: prompts with nothing to find
                raise _too_short(task, length, need, "the smallest prompt (10 words, with its example) and the answer")
        elif kind == "fwe":
            from lm_eval.tasks.ruler import fwe_utils

            need = size(fwe_utils.TEMPLATE.format(context="", query="")) + 50 + length // 6 // 4
            if need > length:
                raise _too_short(task, length, need, "the prompt without words, a few words and the answer")
    finally:
        random.setstate(state)
