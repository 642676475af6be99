"""Passkey and needle: the harness tells a model that copies from the prompt from a random one."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

import clex
from clex.data.tokenizer import byte_tokenizer
from clex.eval.retrieval import assemble, greedy_decode, run_needle, run_passkey
from clex.hf.generation import fixed_clex_t

V = 257


class Copier(torch.nn.Module):
    """A cheating "model": an induction head. It finds the longest suffix of the text that occurred
    before and predicts the token that followed it; the history rides in the cache argument."""

    def forward(self, input_ids, cache=None, past_key_values=None, use_cache=True, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        h = input_ids[0] if cache is None else torch.cat([cache, input_ids[0]])
        cand = (h[:-1] == h[-1]).nonzero().flatten()  # earlier positions i with h[i] == last token
        best, k = cand, 1
        while cand.numel():
            best, k = cand, k + 1
            cand = cand[(cand >= k - 1)]
            cand = cand[h[cand - (k - 1)] == h[-k]] if k <= h.numel() else cand[:0]
        logits = torch.zeros(1, 1, V)
        if best.numel():
            logits[0, 0, h[best[-1] + 1]] = 1.0
        return SimpleNamespace(logits=logits, cache=h)


class Random(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, input_ids, past_key_values=None, **kwargs):
        return SimpleNamespace(logits=torch.randn(1, 1, V, generator=self.gen), past_key_values=None)


def test_passkey_is_solved_by_a_copier_and_not_by_a_random_model(tmp_path):
    tok = byte_tokenizer()
    out = run_passkey(
        [("copier", Copier(), tok), ("random", Random(), tok)],
        lengths=[300, 600],
        depths="0,0.5,1",
        samples=3,
        out_dir=str(tmp_path),
    )
    assert out["models"]["copier"]["mean"] == 1.0 and out["models"]["random"]["mean"] == 0.0
    rec = out["models"]["copier"]["records"]
    assert len(rec) == 2 * 3 * 3 and len({r["answer"] for r in rec}) > 10  # fresh keys per sample
    assert all(r["output"].strip().startswith(r["answer"]) for r in rec)
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved["models"]["copier"]["grid"]["600"]["0.5"] == 1.0 and saved["seed"] == 0
    assert "| copier | 300 | 1.000 | 1.000 | 1.000 | 1.000 |" in (tmp_path / "passkey.md").read_text()
    assert (tmp_path / "passkey.png").stat().st_size > 5000


def test_needle_in_real_text_is_solved_by_the_copier_only(tmp_path):
    tok = byte_tokenizer()
    out = run_needle(
        [("copier", Copier(), tok), ("random", Random(1), tok)],
        lengths=[400],
        depths=[0, 0.5, 1],
        samples=2,
        template="compact",
        out_dir=str(tmp_path),
        seed=3,
    )
    assert out["models"]["copier"]["mean"] == 1.0 and out["models"]["random"]["mean"] == 0.0
    assert out["config"]["documents"] == "embedded held-out plays"
    assert (tmp_path / "needle.png").stat().st_size > 5000


def test_samples_depend_on_the_seed_only(tmp_path):
    tok = byte_tokenizer()
    runs = [
        run_passkey(
            [("c", Copier(), tok)],
            lengths=[200],
            depths=[0.5],
            samples=3,
            template="compact",
            seed=s,
            plot=False,
            out_dir=str(tmp_path),
            overwrite=True,
        )
        for s in (0, 0, 1)
    ]
    keys = [[r["answer"] for r in run["models"]["c"]["records"]] for run in runs]
    assert keys[0] == keys[1] != keys[2]


def test_prompts_have_exactly_n_tokens_with_the_key_at_its_depth():
    intro, key, question = [1, 1], [7, 7, 7], [9, 9]
    units = [[2, 3, 4, 5]]
    first = assemble(intro, units, key, question, 40, 0.0)
    last = assemble(intro, units, key, question, 40, 1.0)
    mid = assemble(intro, units, key, question, 40, 0.5)
    assert len(first) == len(last) == len(mid) == 40
    assert first[2:5] == key and last[-5:-2] == key
    at = mid.index(7)
    assert abs(at - 2 - 33 / 2) <= 2 and mid[at - 1] == 5  # on a unit boundary
    with pytest.raises(ValueError, match="length 6 is too short for this task: the prompt needs at least 7 tokens"):
        assemble(intro, units, key, question, 6, 0.5)


def test_bad_input_is_refused_clearly(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="too short"):
        run_passkey([("c", Copier(), tok)], lengths=[50], samples=1, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"depths must be finite fractions in \[0, 1\]"):
        run_passkey([("c", Copier(), tok)], lengths=[300], depths=[1.5], out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="template must be one of standard, compact, got 'short'"):
        run_passkey([("c", Copier(), tok)], lengths=[300], template="short", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no known training length"):
        run_passkey([("c", Copier(), tok)], out_dir=str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt holds no text"):
        run_needle([("c", Copier(), tok)], lengths=[300], documents=str(empty), out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        run_passkey([str(tmp_path / "nowhere")], lengths=[300], out_dir=str(tmp_path))


def test_clex_decoding_with_fixed_t_matches_full_forwards():
    """With t pinned to that of prompt + answer, cached greedy decoding equals decoding by full forwards."""
    model = clex.apply_clex(tiny_model("llama", vocab_size=V), max_factor=8)
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(0, V, (50,), generator=torch.Generator().manual_seed(2))
    with fixed_clex_t(model, 56):
        cached = greedy_decode(model, prompt, 6)
        seq = prompt.tolist()
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert cached == seq[50:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depths": "nan"}, r"depths must be finite fractions in \[0, 1\] like '0,0.5,1', got 'nan'"),
        ({"depths": [0.5, float("inf")]}, r"depths must be finite fractions in \[0, 1\].*got inf"),
        ({"depths": "-0.1"}, r"depths must be finite fractions.*got '-0.1'"),
        ({"depths": []}, r"depths must be finite fractions.*got none"),
        ({"samples": 0}, r"samples must be an integer >= 1, got 0"),
        ({"lengths": [1]}, r"lengths must be integers >= 2"),
        ({"device": "cuda:x"}, r"device must be one of cpu, cuda, cuda:N"),
        ({"dtype": "float64"}, r"dtype must be one of float32, bfloat16, float16.*got 'float64'"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(kwargs, message, tmp_path):
    args = {"lengths": [300], "samples": 1, "out_dir": str(tmp_path), "plot": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        run_passkey([("c", Copier(), byte_tokenizer())], **args)
