"""clex.recipes: each recipe held once, applied through CLEXConfig and TrainConfig, read by the YAML recipes and
the demo, so that no copy can drift from it."""

import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

import clex.recipes as recipes
from clex.core.config import CLEXConfig
from clex.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
#: the training files: recipes/ and the experiments' own (e.g. experiments/one-model-every-length/every.yaml)
YAMLS = sorted([*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "experiments").rglob("*.yaml")])


def test_the_three_recipes_and_their_names():
    assert recipes.names() == ("paper", "recommended", "far")
    for name in recipes.names():
        recipe = recipes.get(name)
        assert recipe.name == name and tuple(recipe.clex) == recipes.RECIPE_FIELDS  # the same fields, in one order
        assert isinstance(recipe.clex_config(), CLEXConfig)
    with pytest.raises(TypeError):
        recipes.FAR.clex["mscale"] = "yarn"  # read-only: one copy, not a starting point to edit


def test_an_unknown_name_says_the_closest_and_every_valid_one():
    with pytest.raises(
        ValueError, match=r"recipe must be one of paper, recommended, far, got 'farr' \(did you mean 'far'\?\)"
    ):
        recipes.get("farr")
    with pytest.raises(ValueError, match="got 'x'$"):  # nothing close: no guess
        recipes.get("x")


def test_the_paper_recipe_is_clexconfigs_defaults():
    assert recipes.PAPER.clex_config() == CLEXConfig(max_factor=16)


def test_clex_config_applies_the_factor_pose_and_overrides():
    far = recipes.get("far").clex_config()
    assert (far.max_factor, far.position_sampler, far.log_scale, far.mscale) == (16, "pose", True, "none")
    assert far.train_t == "integer-quadratic" and far.prior == "yarn" and far.angle_cap and far.past_max == "prior"
    assert recipes.get("recommended").clex_config(max_factor=12, mscale="none").max_factor == 12
    with pytest.raises(ValueError, match="CLEXConfig has no field 'maxfactor' \\(did you mean 'max_factor'\\?\\)"):
        recipes.get("far").clex_config(maxfactor=8)


def test_train_fields_build_the_trainconfig_of_the_recipe_with_explicit_fields_on_top():
    fields = recipes.FAR.train_fields(steps=3, clex={"mscale": "yarn"})
    assert fields["clex"]["mscale"] == "yarn" and fields["clex"]["log_scale"] is True  # merged key by key
    config = TrainConfig(**fields)
    assert (config.recipe, config.method, config.factor, config.pose, config.steps) == ("far", "clex", 16, True, 3)
    assert recipes.FAR.clex == recipes.get("far").clex  # the override touched a copy
    plain = TrainConfig(**recipes.FAR.train_fields())
    assert plain.clex_config() == recipes.FAR.clex_config()


def test_a_config_file_names_a_recipe_and_its_explicit_keys_win(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("recipe: far\nfactor: 8\nclex:\n  mscale: yarn\nsteps: 2\n")
    config = TrainConfig.from_file(file, ["clex.log_scale=false"])
    expected = recipes.FAR.clex_config(max_factor=8, mscale="yarn", log_scale=False)
    assert config.clex_config() == expected and config.pose is True and config.method == "clex"
    # the resolved config.yaml of a run reads back to the same run (a resume, the demo's settings check)
    config.write_yaml(tmp_path / "config.yaml")
    assert TrainConfig.from_file(tmp_path / "config.yaml") == config
    with pytest.raises(ValueError, match="did you mean 'recommended'"):
        TrainConfig.from_file(file, ["recipe=recomended"])
    with pytest.raises(ValueError, match="apply to method 'clex' only"):
        TrainConfig.from_file(file, ["method=yarn"])


def test_constructing_trainconfig_with_a_bare_recipe_name_is_refused():
    """TrainConfig(recipe=...) cannot tell defaults from explicit fields, so it does not guess: it says how."""
    with pytest.raises(ValueError, match=r"TrainConfig\(\*\*clex.recipes.get\('far'\).train_fields\(...\)\)"):
        TrainConfig(recipe="far")


@pytest.mark.parametrize(
    "path",
    [p for p in YAMLS if "recipe" in yaml.safe_load(p.read_text())],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_a_yaml_recipe_restates_none_of_its_recipes_fields(path):
    """The file names the recipe and overrides only what it changes: a restated value could drift from it."""
    raw = yaml.safe_load(path.read_text())
    recipe = recipes.get(raw["recipe"])
    restated = {k for k, v in (raw.get("clex") or {}).items() if recipe.clex.get(k, object()) == v}
    restated |= {k for k in ("factor", "pose") if raw.get(k, object()) == getattr(recipe, k)}
    assert not restated and "method" not in raw, (path.name, restated)
    config = TrainConfig.from_file(path)
    overridden = {k: v for k, v in (raw.get("clex") or {}).items()}
    overridden |= {"max_factor": raw["factor"]} if "factor" in raw else {}
    overridden |= {"position_sampler": "pose" if raw["pose"] else "random"} if "pose" in raw else {}
    assert config.clex_config() == recipe.clex_config(**overridden)


def test_every_clex_yaml_names_a_recipe():
    for path in YAMLS:
        config = TrainConfig.from_file(path)
        assert config.method != "clex" or config.recipe, path.name


def test_the_smollm2_recipes_are_the_named_ones():
    for file, name in (("smollm2-clex-rec", "recommended"), ("smollm2-clex-far", "far")):
        config = TrainConfig.from_file(ROOT / "recipes" / f"{file}.yaml")
        assert config.clex_config() == recipes.get(name).clex_config(act="tanh", param_factor=1, time_dt=0.01)


def test_every_recipe_says_when_to_use_it_and_cites_its_measurements():
    for name in recipes.names():
        doc = inspect.getdoc(recipes.get(name))
        assert "Measured" in doc and re.search(r"\buse\b", doc, re.I), name
        folders = re.findall(r"``(experiments/[\w./-]+)``", doc)
        assert folders, name
        for folder in folders:
            assert (ROOT / folder).is_dir(), folder
        assert not re.search(r"\b(session|issue|wave)\b", doc, re.I), name


def test_the_demo_variants_are_recipes_and_methods_that_resolve():
    from clex.demo_variants import SCALES, VARIANTS, ScaleName, VariantName

    assert typing.get_args(VariantName) == tuple(VARIANTS) and typing.get_args(ScaleName) == tuple(SCALES)
    assert SCALES["default"].variants == ("clex-rec-4x", "clex-far-4x", "yarn8-4x", "yarn16-4x", "pi-4x")
    assert set(SCALES["large"].variants) == set(VARIANTS)
    for name, variant in VARIANTS.items():
        assert (variant.recipe is None) != (variant.method is None), name
        config = TrainConfig.from_dict({**variant.train_fields(), "seq_len": 128 * variant.rows})
        if variant.recipe:  # the recipe's CLEX, changed only where the variant says
            changes = dict(variant.fields.get("clex", {}))
            changes |= {"max_factor": variant.factor} if variant.factor else {}
            changes |= (
                {"position_sampler": "pose" if variant.fields["pose"] else "random"} if "pose" in variant.fields else {}
            )
            assert config.clex_config() == recipes.get(variant.recipe).clex_config(**changes), name
    far = TrainConfig.from_dict(VARIANTS["clex-far-4x"].train_fields())
    assert far.clex_config() == recipes.FAR.clex_config()


def test_recipes_and_the_demos_tables_load_without_torch():
    """The CLI offers their names as choices before any heavy import."""
    code = (
        "import sys, clex.recipes, clex.demo; clex.recipes.names(); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
