"""The ratio-to-best view (clex.eval.compare): its arithmetic, seeds averaged, groups, and bad input."""

import json

import pytest

from clex.cli import main
from clex.eval.compare import ratio_to_best, run_compare


def ppl_file(path, models: dict[str, dict[int, float]]):
    payload = {"task": "perplexity", "models": {}}
    for name, row in models.items():
        payload["models"][name] = {"results": {str(n): {"length": n, "ppl": p} for n, p in row.items()}}
    path.write_text(json.dumps(payload))
    return str(path)


def test_the_best_model_at_each_length_is_one_and_the_others_are_their_quotient():
    ratios = ratio_to_best({"a": {8: 10.0, 16: 30.0}, "b": {8: 20.0, 16: 15.0}})
    assert ratios == {"a": {8: 1.0, 16: 2.0}, "b": {8: 2.0, 16: 1.0}}


def test_only_the_lengths_every_model_has_are_compared():
    ratios = ratio_to_best({"a": {8: 10.0, 16: 30.0}, "b": {8: 20.0}})
    assert ratios == {"a": {8: 1.0}, "b": {8: 2.0}}


def test_seeds_in_several_files_are_averaged_and_groups_join_models(tmp_path):
    f1 = ppl_file(tmp_path / "s0.json", {"clex": {8: 10.0, 16: 12.0}, "yarn": {8: 9.0, 16: 20.0}})
    f2 = ppl_file(tmp_path / "s1.json", {"clex": {8: 12.0, 16: 14.0}, "yarn-s1": {8: 11.0, 16: 22.0}})
    out = run_compare([f1, f2], groups=["yarn=yarn,yarn-s1"], out_dir=str(tmp_path / "out"), plot=False)
    clex_row, yarn_row = out["models"]["clex"], out["models"]["yarn"]
    assert clex_row["ppl"] == {8: 11.0, 16: 13.0} and clex_row["members"] == 2
    assert clex_row["ppl_range"][8] == [10.0, 12.0]
    assert yarn_row["ppl"] == {8: 10.0, 16: 21.0}
    assert clex_row["ratio"] == {8: 1.1, 16: 1.0} and clex_row["worst"] == pytest.approx(1.1)
    assert yarn_row["worst"] == pytest.approx(21.0 / 13.0)
    table = (tmp_path / "out" / "compare.md").read_text()
    assert table.index("| clex") < table.index("| yarn")  # best worst ratio first


def test_the_command_writes_json_markdown_and_png(tmp_path):
    f = ppl_file(tmp_path / "ppl.json", {"a": {8: 10.0, 16: 30.0}, "b": {8: 20.0, 16: 15.0}})
    assert main(["eval", "compare", "--results", f, "--out-dir", str(tmp_path / "o")]) == 0
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"compare.json", "compare.md", "compare.png"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "cannot read .*bad.json as JSON"),
        ('{"task": "ruler"}', "bad.json is not a result of `clex eval ppl`"),
        ('{"models": {"a": {"results": {"8k": {"ppl": 3}}}}}', "model 'a' has no perplexity at length '8k'"),
    ],
)
def test_a_file_that_is_not_a_perplexity_result_is_named(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message):
        run_compare([str(bad)], out_dir=str(tmp_path / "o"), plot=False)


def test_a_group_naming_an_unknown_model_is_refused(tmp_path):
    f = ppl_file(tmp_path / "ppl.json", {"a": {8: 10.0}})
    with pytest.raises(ValueError, match="--groups names models that no result holds: zz"):
        run_compare([f], groups=["g=a,zz"], out_dir=str(tmp_path / "o"), plot=False)
