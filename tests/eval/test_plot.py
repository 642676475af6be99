"""Figures: written, non-empty PNGs; the frequency plot's numbers are transformers' own and CLEX's."""

import json

import pytest
import torch
from conftest import tiny_model

import clex
from clex.eval.plot import plot_freqs, plot_ppl, plot_retrieval

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    return path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == PNG


def test_ppl_and_retrieval_plots_are_written(tmp_path):
    ppl = {
        "config": {"protocol": "chunked"},
        "models": {
            "base": {
                "original_length": 128,
                "results": {128: {"ppl": 5.0, "ppl_std": 0.2}, 256: {"ppl": 40.0, "ppl_std": 3.0}},
            },
            "clex": {
                "original_length": 128,
                "results": {"128": {"ppl": 5.1, "ppl_std": 0.2}, "256": {"ppl": 5.3, "ppl_std": None}},
            },
        },
    }
    assert is_png(plot_ppl(ppl, tmp_path / "sub" / "ppl.png"))
    grid = {"passkey": {"128": {"0.0": 1.0, "1.0": 0.5}, "256": {"0.0": 0.0, "1.0": 0.25}}}
    payload = {
        "task": "passkey",
        "models": {"a": {"grid": grid["passkey"], "mean": 0.44}, "b": {"grid": grid["passkey"]}},
    }
    assert is_png(plot_retrieval(payload, tmp_path / "heat.png"))
    with pytest.raises(ValueError, match="at least one model"):
        plot_ppl({"models": {}}, tmp_path / "x.png")


def test_freqs_of_an_untrained_clex_model_are_the_ntk_prior_and_baselines_are_transformers(tmp_path):
    model = clex.apply_clex(tiny_model("llama"), max_factor=16)
    out = plot_freqs(model, ts="1,2,4", out_dir=tmp_path, name="freqs")
    assert is_png(tmp_path / "freqs.png") and json.loads((tmp_path / "freqs.json").read_text())["original_length"] == 16
    theta0 = torch.tensor(out["theta0"])
    for t in ("1", "2", "4"):
        curves = {k: torch.tensor(v) for k, v in out["t"][t].items()}
        torch.testing.assert_close(curves["CLEX (learned)"], curves["CLEX prior (NTK α=2t-1)"], rtol=1e-5, atol=0)
        torch.testing.assert_close(curves["PI"], theta0 / float(t))
        j = torch.arange(theta0.numel())
        torch.testing.assert_close(
            curves["NTK"], theta0 * float(t) ** (-2 * j / (2 * theta0.numel() - 2)), rtol=1e-5, atol=0
        )
    yarn4 = torch.tensor(out["t"]["4"]["YaRN"])
    assert yarn4[0] == theta0[0] and torch.isclose(yarn4[-1], theta0[-1] / 4)  # high freqs kept, low ones interpolated


def test_freqs_from_a_saved_folder_and_a_trained_clex_differs_from_its_prior(tmp_path):
    model = clex.apply_clex(tiny_model("llama"), max_factor=16)
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "m")
    out = plot_freqs(str(tmp_path / "m"), ts=[4], out_dir=tmp_path, name="f")
    curves = out["t"]["4"]
    assert max(abs(a - b) for a, b in zip(curves["CLEX (learned)"], curves["CLEX prior (NTK α=2t-1)"])) > 1e-3
    assert is_png(tmp_path / "f.png")
    # a bare rotary works too (a minimal config is rebuilt from θ⁰), with the same baselines
    again = plot_freqs(clex.get_clex_rotary(model), ts=[4], out_dir=tmp_path, name="g")
    torch.testing.assert_close(torch.tensor(again["t"]["4"]["YaRN"]), torch.tensor(curves["YaRN"]))


def test_freqs_needs_a_clex_model(tmp_path):
    with pytest.raises(ValueError, match="needs a CLEX model"):
        plot_freqs(tiny_model("llama"), out_dir=tmp_path, name="x")
    with pytest.raises(ValueError, match="ts must be finite length factors >= 1"):
        plot_freqs(clex.apply_clex(tiny_model("llama")), ts=[0.5], out_dir=tmp_path, name="x")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        plot_freqs(str(tmp_path / "nowhere"), out_dir=tmp_path, name="x")
    with pytest.raises(ValueError, match="ts must be finite length factors >= 1"):
        plot_freqs(clex.apply_clex(tiny_model("llama")), ts=[float("inf")], out_dir=tmp_path, name="x")


def test_freqs_refuse_to_replace_an_earlier_figure_and_write_nothing_outside(tmp_path):
    model = clex.apply_clex(tiny_model("llama"), max_factor=4)
    plot_freqs(model, ts=[2], out_dir=tmp_path, name="f")
    stamp = (tmp_path / "f.png").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"f\.json exists \(an earlier result named 'f'\); pass --overwrite"):
        plot_freqs(model, ts=[2], out_dir=tmp_path, name="f")
    assert (tmp_path / "f.png").stat().st_mtime_ns == stamp
    plot_freqs(model, ts=[2], out_dir=tmp_path, name="f", overwrite=True)
    for bad in ("../f", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="name must be a plain file stem"):
            plot_freqs(model, ts=[2], out_dir=tmp_path / "sub", name=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "f.png"]


def test_freqs_show_each_pairs_largest_angle_against_its_pretraining_range(tmp_path):
    """The bottom row: t·θ_j(t)/θ⁰_j. PI keeps every pair at 1 (same largest angle); the angle cap keeps the
    pairs that never turned at <= 1 however the network moved."""
    model = clex.apply_clex(tiny_model("llama"), max_factor=16, angle_cap=True)
    with torch.no_grad():
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    out = plot_freqs(model, ts=[6], out_dir=tmp_path, name="f")
    never = out["never_turned"]
    assert any(never) and not all(never)
    ratios = out["angle_ratio"]["6"]
    assert all(abs(r - 1) < 1e-5 for r in ratios["PI"])
    assert all(r <= 1 + 1e-5 for r, n in zip(ratios["CLEX (learned)"], never) if n)
    assert is_png(tmp_path / "f.png")
