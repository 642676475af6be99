"""CLEXConfig validation: every bad value names its field and what is allowed."""

import pytest

import clex
from clex import CLEXConfig


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_factor", 0, "max_factor must be a number >= 1, got 0"),
        ("max_factor", "16", "max_factor must be a number >= 1"),
        ("time_dt", 0, "time_dt must be a number > 0, got 0"),
        ("time_dt", -0.01, "time_dt must be a number > 0"),
        ("param_factor", 1.5, "param_factor must be an integer >= 1"),
        ("act", "relu", "act must be one of 'tanh', 'silu', got 'relu'"),
        ("method", "rk5", "method must be one of 'rk4-fused', "),
        ("formulation", "fast", "formulation must be one of 'residual', 'reference'"),
        (
            "train_t",
            "normal",
            "train_t must be one of 'integer', 'integer-linear', 'integer-quadratic', 'integer-mixed', 'uniform', 'log-uniform'",
        ),
        ("position_sampler", "skip", "position_sampler must be one of 'random', 'pose'"),
        ("position_span", "all", "position_span must be one of 'sequence', 'original'"),
        ("solve_device", "gpu", "solve_device must be one of 'cpu', 'model', got 'gpu'"),
        ("inference_t", "ceil", "inference_t must be one of 'continuous', 'integer', 'fixed'"),
        ("t_resolution", -1, "t_resolution must be an integer >= 0"),
        ("prior_base", 1, "prior_base must be a number > 1"),
        ("original_length", 0, "original_length must be an integer >= 1"),
        ("fixed_t", 0.5, "fixed_t must be a number >= 1"),
        ("log_scale", "yes", "log_scale must be True or False"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CLEXConfig(**{field: value})


def test_fixed_policy_needs_fixed_t():
    with pytest.raises(ValueError, match="needs fixed_t"):
        CLEXConfig(inference_t="fixed")


def test_dict_round_trip():
    c = CLEXConfig(max_factor=8, act="silu")
    assert CLEXConfig.from_dict(c.to_dict()) == c and "extra" not in c.to_dict()


def test_unknown_keys_are_refused_with_the_valid_names():
    message = r"CLEXConfig has no field 'maxfactor' \(did you mean 'max_factor'\?\); valid fields: act, "
    with pytest.raises(ValueError, match=message):
        CLEXConfig.from_dict({"maxfactor": 4})
    with pytest.raises(ValueError, match=message):
        CLEXConfig().replace(maxfactor=4)
    with pytest.raises(ValueError, match="has no field 'zzz'; valid fields"):  # nothing close: no guess
        CLEXConfig.from_dict({"zzz": 1})
    with pytest.raises(ValueError, match="from_dict needs a dict, got list"):
        CLEXConfig.from_dict([("max_factor", 4)])


def test_the_config_is_immutable_and_replace_validates():
    import dataclasses

    c = CLEXConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_factor = 0
    with pytest.raises(ValueError, match="max_factor must be a number >= 1, got 0"):
        c.replace(max_factor=0)
    assert c.replace(max_factor=8).max_factor == 8 and c.max_factor == 16
    assert CLEXConfig(param_factor=2.0).param_factor == 2 and type(CLEXConfig(param_factor=2.0).param_factor) is int


def test_fixed_t_needs_the_fixed_policy():
    with pytest.raises(
        ValueError, match=r"fixed_t applies to inference_t='fixed' only, got fixed_t=2.0 with inference_t='continuous'"
    ):
        CLEXConfig(fixed_t=2.0)
    fixed = CLEXConfig(inference_t="fixed", fixed_t=2.0)
    with pytest.raises(ValueError, match="fixed_t applies to inference_t='fixed' only"):
        fixed.replace(inference_t="integer")
    assert fixed.replace(inference_t="integer", fixed_t=None).inference_t == "integer"


def test_solver_methods_are_torchdiffeqs_registry_and_ours():
    from torchdiffeq._impl.odeint import SOLVERS

    from clex.core.config import SOLVER_METHODS

    assert set(SOLVER_METHODS) == {"rk4-fused", *SOLVERS} - {"scipy_solver"}
    for method in ("bosh3", "heun3", "fehlberg2"):
        CLEXConfig(method=method)


def test_odd_rotary_dimension_is_refused():
    with pytest.raises(
        ValueError, match=r"rotary dimension d must be even and >= 4 \(the prior divides by d-2\), got d=7"
    ):
        clex.CLEXDynamics(7)


def test_apply_clex_takes_dicts_and_refuses_other_things():
    from conftest import tiny_model

    model = clex.apply_clex(tiny_model("llama"), {"max_factor": 8})
    assert clex.get_clex_rotary(model).config.max_factor == 8
    with pytest.raises(ValueError, match="config must be a CLEXConfig, a dict or None, got int"):
        clex.apply_clex(tiny_model("llama"), 3)
    with pytest.raises(ValueError, match="config must be a CLEXConfig, a dict or None, got str"):
        clex.apply_clex(tiny_model("llama"), "clex", max_factor=4)
