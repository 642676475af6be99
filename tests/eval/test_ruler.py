"""RULER through lm-eval, offline: an oracle that reads the needle scores 1, a random tiny model 0; the `clex`
model type of lm-eval builds models by the same specs as `clex eval`; bad input is refused clearly."""

import json
import re

import pytest
import torch
from conftest import tiny_model

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra [ruler]")

import clex  # noqa: E402
from clex.cli import main  # noqa: E402
from clex.data.tokenizer import byte_tokenizer  # noqa: E402
from clex.eval.ruler import SKIPPED, TASKS, run_ruler  # noqa: E402

V = 257


class Oracle(type(tiny_model("llama", vocab_size=V))):
    """A tiny LLaMA whose generate() answers from the prompt: it finds the queried key's value in the text."""

    tok = byte_tokenizer()

    def generate(self, input_ids, max_length, attention_mask=None, **kwargs):
        rows = []
        for ids in input_ids:
            text = self.tok.decode(ids, skip_special_tokens=True)
            key = re.findall(r"special magic \w+ for (\S+) mentioned in the provided text", text)[-1]
            value = re.search(rf"for {re.escape(key)} is: (\S+)\.", text).group(1)
            rows.append(self.tok(" " + value, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        width = max(map(len, rows))
        new = torch.tensor([r + [self.tok.eos_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


def _folder(path, model):
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def test_an_oracle_scores_one_and_a_random_model_zero_through_lm_eval(tmp_path):
    oracle = Oracle(tiny_model("llama", vocab_size=V).config).eval()
    folder = _folder(tmp_path / "tiny", tiny_model("llama", vocab_size=V))
    out = run_ruler(
        [("oracle", oracle, byte_tokenizer()), f"random={folder}"],
        lengths="600",
        tasks="niah_single_1",
        samples=2,
        batch_size=2,
        out_dir=str(tmp_path / "eval"),
    )
    cell = out["models"]["oracle"]["results"]["niah_single_1"][600]
    assert (cell["score"], cell["stderr"], cell["samples"]) == (1.0, 0.0, 2)
    assert all(r["output"].strip() in r["answers"] for r in cell["records"])
    assert out["models"]["random"]["results"]["niah_single_1"][600]["score"] == 0.0
    saved = json.loads((tmp_path / "eval" / "ruler.json").read_text())
    assert saved["models"]["oracle"]["mean"]["600"] == {"score": 1.0, "stderr": 0.0}
    assert saved["config"]["tasks"] == ["niah_single_1"] and saved["seed"] == 0
    assert set(saved["skipped"]) == set(SKIPPED) and "essays" in saved["skipped"]["niah_single_2"]
    # the same prompts for both models (same tokenizer, same seed)
    answers = [
        [r["answers"] for r in saved["models"][m]["results"]["niah_single_1"]["600"]["records"]]
        for m in ("oracle", "random")
    ]
    assert answers[0] == answers[1]
    md = (tmp_path / "eval" / "ruler.md").read_text()
    assert "| oracle | 600 | 1.00 ± 0.00 | 1.00 ± 0.00 |" in md and "niah_single_2" in md
    assert (tmp_path / "eval" / "ruler.png").stat().st_size > 5000


def test_the_clex_model_type_of_lm_eval_builds_models_by_spec(tmp_path):
    from lm_eval.api.registry import get_model

    from clex.eval.harness import lm_class

    plain = _folder(tmp_path / "plain", tiny_model("llama", vocab_size=V))
    saved = _folder(tmp_path / "clex", clex.apply_clex(tiny_model("llama", vocab_size=V), max_factor=8))
    cls = lm_class()
    assert get_model("clex") is cls
    lm = cls(pretrained=saved, inference_t="integer", max_length=64, device="cpu")
    assert clex.get_clex_rotary(lm.model).config.inference_t == "integer" and lm.max_length == 64
    yarn = cls(pretrained=plain, method="yarn", factor=4, device="cpu")
    assert yarn.model.config.rope_parameters["rope_type"] == "yarn"
    with pytest.raises(ValueError, match="no_such_field"):
        cls(pretrained=saved, no_such_field=1, device="cpu")
    with pytest.raises(ValueError, match="tokenizer from the model folder"):
        cls(pretrained=saved, tokenizer="gpt2", device="cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": "niah_single_9"}, r"task must be one of niah_single_1, .*got 'niah_single_9'"),
        ({"tasks": "niah_single_2"}, r"task 'niah_single_2' cannot run offline: its haystack is Paul Graham's essays"),
        ({"tasks": "ruler_qa_squad"}, r"cannot run offline: .*SQuAD"),
        ({"tasks": ""}, r"tasks: give at least one of niah_single_1"),
        ({"samples": 0}, r"samples must be an integer >= 1, got 0"),
        ({"lengths": "300"}, r"lengths: 300 tokens is too short for niah_single_1 with this tokenizer"),
        ({"tasks": "ruler_cwe"}, r"lengths: 600 tokens is too short for ruler_cwe .* give a length of at least \d+"),
        ({"tasks": "ruler_vt"}, r"task ruler_vt cannot run with this tokenizer: .*few-shot example within 500 tokens"),
    ],
)
def test_bad_input_names_the_field_the_value_and_what_is_allowed(kwargs, message, tmp_path):
    args = {"lengths": "600", "tasks": "niah_single_1", "samples": 1, "out_dir": str(tmp_path), "plot": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        run_ruler([("tiny", tiny_model("llama", vocab_size=V), byte_tokenizer())], **args)
    assert not (tmp_path / "ruler.json").exists()


def test_the_cli_refuses_a_task_in_one_line(capsys):
    assert main(["eval", "ruler", "--models", "x", "--tasks", "niah_multivalue"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clex: error: task 'niah_multivalue' cannot run offline") and err.count("\n") == 1
    assert set(TASKS) == {"niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe"}


def test_cells_done_before_a_crash_are_kept_in_a_partial_json(tmp_path, monkeypatch):
    import clex.eval.ruler as ruler

    real, calls = ruler.ruler_scores, []

    def dies_at_the_second_length(lm, tokenizer, tasks, n, *args, **kwargs):
        calls.append(n)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(lm, tokenizer, tasks, n, *args, **kwargs)

    monkeypatch.setattr(ruler, "ruler_scores", dies_at_the_second_length)
    oracle = Oracle(tiny_model("llama", vocab_size=V).config).eval()
    with pytest.raises(RuntimeError, match="killed"):
        run_ruler(
            [("oracle", oracle, byte_tokenizer())],
            lengths="600,700",
            tasks="niah_single_1",
            samples=1,
            out_dir=str(tmp_path),
        )
    saved = json.loads((tmp_path / "ruler.partial.json").read_text())
    assert saved["models"]["oracle"]["results"]["niah_single_1"]["600"]["score"] == 1.0
    assert "700" not in saved["models"]["oracle"]["results"]["niah_single_1"]
    assert not (tmp_path / "ruler.json").exists()
    monkeypatch.setattr(ruler, "ruler_scores", real)
    again = dict(lengths="600", tasks="niah_single_1", samples=1, out_dir=str(tmp_path), plot=False)
    with pytest.raises(ValueError, match=r"ruler\.partial\.json exists .*pass --overwrite"):  # kept unless asked
        run_ruler([("oracle", oracle, byte_tokenizer())], **again)
    run_ruler([("oracle", oracle, byte_tokenizer())], **again, overwrite=True)  # a whole run leaves the final files
    assert (tmp_path / "ruler.json").exists() and not (tmp_path / "ruler.partial.json").exists()


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(
        OSError,
        match=r"clex eval ruler needs lm-evaluation-harness \(lm_eval\), which cannot be imported "
        r"here .*pip install -c constraints.txt -e '\.\[ruler\]'",
    ):
        run_ruler(["x=/nowhere"], lengths="600", tasks="niah_single_1")


def test_variable_tracking_is_reseeded_past_lm_evals_repeated_name_failure():
    import random

    from lm_eval.tasks.ruler import vt_utils

    from clex.eval import ruler_tasks

    seeds = []

    def fails_twice():
        seeds.append(random.random())
        if len(seeds) < 3:
            raise IndexError("list index out of range")
        return "made"

    assert ruler_tasks._vt_reseeded(fails_twice, 7, "ruler_vt", 4096) == "made"
    random.seed(9)
    assert seeds[2] == random.random()  # attempt k is seeded with seed + k
    with pytest.raises(RuntimeError, match=r"ruler_vt generator failed 8 times at 4096 tokens"):
        ruler_tasks._vt_reseeded(lambda: [][0], 0, "ruler_vt", 4096)
    # seed 35: lm-eval 0.4.13's few-shot chain draws a repeated 3-letter name and raises IndexError
    names, chains = ruler_tasks._vt_reseeded(lambda: vt_utils.generate_chains(1, 4, is_icl=True), 35, "ruler_vt", 4096)
    assert len(names) == 1 and len(names[0]) == 5 and len(chains[0]) == 5


def test_tasks_may_be_given_with_commas_or_spaces():
    from clex.eval.ruler_tasks import check_tasks

    want = ["niah_single_1", "ruler_cwe"]
    assert check_tasks("niah_single_1,ruler_cwe") == check_tasks(["niah_single_1", "ruler_cwe"]) == want
    assert check_tasks(["niah_single_1,ruler_cwe"]) == check_tasks(["niah_single_1, ruler_cwe", "ruler_cwe"]) == want
    with pytest.raises(ValueError, match=r"task must be one of .*, got 'nope'"):
        check_tasks(["niah_single_1,nope"])


def test_an_exported_folder_runs_in_lm_evals_own_hf_model_type_without_clex(tmp_path):
    """What the README promises for `clex export` folders: `lm_eval --model hf` loads them as they are (clex not
    importable), runs the longrope model past L, and scores with the stock model's own log-probabilities."""
    import subprocess
    import sys

    from clex.hf.export import export

    model = clex.apply_clex(tiny_model("llama", vocab_size=V), max_factor=8, exact_cache=False)
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    out = tmp_path / "served"
    export(model, out, length=64)
    byte_tokenizer().save_pretrained(out)
    code = f"""
import sys, torch
sys.modules["clex"] = None  # importing clex now fails
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM
lm = HFLM(pretrained={str(out)!r}, device="cpu", max_length=64, batch_size=1)
text = "Shall I compare thee to a summer's day? Thou art more"
(score,) = lm.loglikelihood_rolling([type("R", (), {{"args": (text,)}})()], disable_tqdm=True)
stock = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
ids = torch.tensor([[lm.prefix_token_id, *lm.tok_encode(text)]])
with torch.no_grad():
    logp = stock(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).sum()
print(float(score), float(logp), stock.config.rope_parameters["rope_type"], ids.shape[1], abs(float(score) - float(logp)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    score, logp, rope, n, diff = done.stdout.split()[-5:]
    assert rope == "longrope" and int(n) > 16  # past L = 16: the longrope factors at work
    assert float(score) < -10 and float(diff) < 1e-4 * abs(float(logp))  # a real score, the stock model's own
