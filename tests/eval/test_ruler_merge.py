"""`clex eval ruler-merge`: runs made apart become one table, and only runs that can share one table merge."""

import json

import pytest

from clex.cli import main
from clex.eval.ruler import merge_ruler

TASKS = ["niah_single_1", "ruler_cwe"]


def _run(path, models, **config):
    cfg = {
        "lengths": [600, 700],
        "tasks": TASKS,
        "samples": 2,
        "batch_size": 1,
        "device": "cpu",
        "dtype": None,
        "lm_eval": "0.4.13",
        "metric": "RULER string match (lm-eval), mean over samples",
        **config,
    }
    payload = {"task": "ruler", "config": cfg, "seed": 0, "models": {}, "skipped": {}}
    for name, score in models.items():
        cell = {"score": score, "stderr": 0.1, "samples": 2, "records": []}
        payload["models"][name] = {
            "spec": name,
            "results": {t: {str(n): dict(cell) for n in cfg["lengths"]} for t in TASKS},
            "mean": {str(n): {"score": score, "stderr": 0.07} for n in cfg["lengths"]},
        }
    path.write_text(json.dumps(payload))
    return str(path)


def test_runs_made_apart_merge_into_one_table(tmp_path):
    a = _run(tmp_path / "a.json", {"clex": 0.75})
    b = _run(tmp_path / "b.json", {"yarn": 0.25, "pi": 0.0})
    out = merge_ruler([a, b], out_dir=str(tmp_path / "out"), plot=False)
    assert list(out["models"]) == ["clex", "yarn", "pi"] and out["merged_from"] == [a, b]
    saved = json.loads((tmp_path / "out" / "ruler.json").read_text())
    assert saved["models"]["yarn"] == json.loads((tmp_path / "b.json").read_text())["models"]["yarn"]
    md = (tmp_path / "out" / "ruler.md").read_text()
    assert "| clex | 700 | 0.75 ± 0.10 | 0.75 ± 0.10 | 0.75 ± 0.07 |" in md and "| pi | 600 | 0.00 ± 0.10" in md


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"models": {"clex": 0.5}}, r"model 'clex' appears twice"),
        ({"models": {"yarn": 0.5}, "samples": 4}, r"has samples=4, the first file 2: only runs with the same lengths"),
        ({"models": {"yarn": 0.5}, "lengths": [600]}, r"has lengths=\[600\], the first file \[600, 700\]"),
        ({"models": {"yarn": 0.5}, "dtype": "bfloat16"}, r"has dtype='bfloat16', the first file None"),
    ],
)
def test_runs_that_cannot_share_a_table_are_refused(tmp_path, second, message):
    a = _run(tmp_path / "a.json", {"clex": 0.75})
    models = second.pop("models")
    b = _run(tmp_path / "b.json", models, **second)
    with pytest.raises(ValueError, match=message):
        merge_ruler([a, b], out_dir=str(tmp_path / "out"), plot=False)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_ruler_result_is_named_in_one_line(tmp_path, capsys):
    other = tmp_path / "ppl.json"
    other.write_text(json.dumps({"task": "ppl", "models": {}}))
    assert main(["eval", "ruler-merge", "--results", str(other), "--out-dir", str(tmp_path / "o"), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err == f"clex: error: results: {other} is not the JSON of `clex eval ruler` (no task 'ruler' with models)\n"
    assert main(["eval", "ruler-merge", "--results", str(tmp_path / "missing.json")]) == 2
    assert "results: cannot read" in capsys.readouterr().err


def test_the_merged_table_never_overwrites_an_input(tmp_path):
    a = _run(tmp_path / "ruler.json", {"clex": 0.75})
    b = _run(tmp_path / "b.json", {"yarn": 0.25})
    before = (tmp_path / "ruler.json").read_text()
    with pytest.raises(ValueError, match=r"would overwrite its input .*ruler.json; pick another out_dir or name"):
        merge_ruler([a, b], out_dir=str(tmp_path), plot=False)
    assert (tmp_path / "ruler.json").read_text() == before


def _edit(path, change):
    payload = json.loads(open(path).read())
    change(payload)
    open(path, "w").write(json.dumps(payload))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.pop("config"), r"has no 'config' mapping"),
        (lambda p: p["models"]["clex"].pop("mean"), r"model 'clex' has no 'mean'"),
        (lambda p: p["models"]["clex"]["mean"].update({"long": {"score": 1}}), r"mean has the length key 'long'"),
        (lambda p: p["config"].update(lengths=[600, 700, 800]), r"has no cell at length\(s\) \[800\]"),
        (lambda p: p["models"]["clex"]["results"].pop("ruler_cwe"), r"no results for task\(s\) \['ruler_cwe'\]"),
        (lambda p: p["config"].update(lengths="600"), r"config.lengths must be a list of integers, got '600'"),
    ],
    ids=["no config", "no mean", "length key", "lengths the cells lack", "task missing", "lengths not a list"],
)
def test_a_malformed_result_is_named_with_its_field_in_one_line(tmp_path, capsys, change, message):
    path = _edit(_run(tmp_path / "a.json", {"clex": 0.5}), change)
    assert main(["eval", "ruler-merge", "--results", path, "--out-dir", str(tmp_path / "o"), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clex: error: results: {path}") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "o").exists()


def test_a_binary_file_is_named_in_one_line(tmp_path, capsys):
    binary = tmp_path / "ruler.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert main(["eval", "ruler-merge", "--results", str(binary), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clex: error: results: cannot read {binary} as the JSON") and err.count("\n") == 1
