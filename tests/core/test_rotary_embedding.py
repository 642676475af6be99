"""The rotary module: θ(t) lookups, the table and its invalidation, training draws, gradients."""

import math
import warnings

import pytest
import torch
from conftest import tiny_model

import clex
from clex.core.equations import ntk_inv_freq
from clex.core.policies import POSITION_SAMPLERS, T_SAMPLERS, step_generator


def rotary(**kw):
    inv0 = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    return clex.CLEXRotaryEmbedding(clex.CLEXConfig(**kw), inv0, original_length=16, rope_theta=1e4).eval()


def perturb(r, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.dynamics.ode_down_proj.copy_(torch.randn(r.dynamics.ode_down_proj.shape, generator=g) * 0.05)


def test_parameters_are_named_and_initialised_as_the_paper():
    r = rotary(param_factor=2)
    assert r.dynamics.ode_up_proj.shape == (8, 32) and r.dynamics.ode_down_proj.shape == (32, 8)
    assert torch.count_nonzero(r.dynamics.ode_down_proj) == 0
    bound = 1 / math.sqrt(32)  # kaiming-uniform with a=√5 on fan_in = λd
    assert r.dynamics.ode_up_proj.abs().max() <= bound and r.dynamics.ode_up_proj.std() > bound / 3


def test_table_matches_direct_solves_and_the_closed_form():
    r = rotary(max_factor=8)
    grid, theta = r.table()
    assert grid[0] == 1 and grid[-1] == 8 and len(grid) == 7 * 16 + 1
    assert torch.equal(theta[0], r.inv_freq)
    for k in (5, 16, 60, 112):
        torch.testing.assert_close(theta[k], ntk_inv_freq(r.inv_freq, float(grid[k])), rtol=1e-6, atol=0)
    perturb(r)
    with torch.no_grad():
        torch.testing.assert_close(r.table()[1][40], r.inv_freq_at(float(grid[40])), rtol=2e-6, atol=0)


def test_table_is_rebuilt_when_the_weights_change():
    r = rotary(max_factor=4)
    before = r.table()[1].clone()
    assert r.table()[1] is r._table[2]  # cached
    perturb(r)
    after = r.table()[1]
    assert (after - before).abs().max() > 1e-4
    r.load_state_dict({k: torch.zeros_like(v) if "down" in k else v for k, v in r.state_dict().items()})
    torch.testing.assert_close(r.table()[1], before, rtol=0, atol=0)


def test_past_max_factor_integrates_further_with_one_warning():
    r = rotary(max_factor=2)
    pos = torch.arange(80)[None]  # 80 keys = 5 L
    with pytest.warns(UserWarning, match="past max_factor"):
        r(torch.zeros(1), pos)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r(torch.zeros(1), torch.arange(96)[None])
    assert float(r.last_t) == 6.0
    torch.testing.assert_close(r.last_inv_freq[0], ntk_inv_freq(r.inv_freq, 6.0), rtol=1e-6, atol=0)


def test_inference_t_policies():
    lengths = torch.tensor([10, 16, 17, 40])
    assert rotary().t_for_length(lengths).tolist() == [1.0, 1.0, 1.0625, 2.5]
    assert rotary(t_resolution=0).t_for_length(lengths).tolist() == [1.0, 1.0, 17 / 16, 2.5]
    assert rotary(inference_t="integer").t_for_length(lengths).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert rotary(inference_t="fixed", fixed_t=3.0).t_for_length(lengths).tolist() == [3.0] * 4


def test_rows_of_a_batch_get_their_own_t():
    r = rotary(max_factor=4)
    pos = torch.stack([torch.arange(40), torch.cat([torch.ones(20, dtype=torch.long), torch.arange(20)])])
    cos, sin = r(torch.zeros(1), pos)
    assert r.last_t.tolist() == [2.5, 1.25]
    alone, _ = r(torch.zeros(1), pos[1:])
    torch.testing.assert_close(cos[1:], alone, rtol=0, atol=0)


def test_exact_continuous_t_is_solved_per_t():
    r = rotary(t_resolution=0, max_factor=4)
    perturb(r)
    r(torch.zeros(1), torch.arange(37)[None])
    with torch.no_grad():
        torch.testing.assert_close(r.last_inv_freq[0], r.inv_freq_at(37 / 16), rtol=0, atol=0)


def test_training_draws_are_seeded_and_follow_the_paper():
    r = rotary(max_factor=16, seed=7).train()
    draws = [r.draw(16) for _ in range(30)]
    r2 = rotary(max_factor=16, seed=7).train()
    assert [t for t, _ in draws] == [r2.draw(16)[0] for _ in range(30)]
    assert {t for t, _ in draws} <= set(range(1, 17)) and len({t for t, _ in draws}) > 5
    for t, pos in draws:
        span = int(16 * t)
        assert len(pos) == 16 and pos[0] == 0 and pos[-1] == span - 1
        assert torch.all(pos[1:] > pos[:-1])  # distinct, sorted
    r.draws = 3  # resume: the same draw as the 4th of an uninterrupted run
    assert r.draw(16)[0] == draws[3][0] and torch.equal(r.draw(16)[1], draws[4][1])


def test_long_training_sequences_are_scaled_to_the_original_length():
    r = rotary(max_factor=4, seed=1).train()
    for _ in range(8):
        t, pos = r.draw(64)  # n = 4L
        assert pos[-1] == (math.ceil(64 * t) - 1) / 4


@pytest.mark.parametrize("name", sorted(T_SAMPLERS))
def test_t_samplers_stay_in_range(name):
    ts = [T_SAMPLERS[name](step_generator(0, k), 8.0) for k in range(200)]
    assert min(ts) >= 1 and max(ts) <= 8 and max(ts) > 4


def test_pose_positions_are_two_contiguous_chunks():
    pos = POSITION_SAMPLERS["pose"](32, 200, step_generator(0, 1))
    jumps = (pos[1:] - pos[:-1] != 1).sum()
    assert pos[0] == 0 and jumps <= 1 and pos[-1] <= 199


def test_training_forward_has_gradients_for_every_t():
    r = rotary(max_factor=4).train()
    perturb(r)
    for _ in range(6):
        cos, sin = r(torch.zeros(1), torch.arange(16)[None])
        (cos.sum() + sin.sum()).backward()
    assert r.dynamics.ode_up_proj.grad.abs().sum() > 0 and r.dynamics.ode_down_proj.grad.abs().sum() > 0


def test_t_equal_one_keeps_the_weights_in_the_graph():
    r = rotary(max_factor=1).train()
    cos, _ = r(torch.zeros(1), torch.arange(16)[None])
    cos.sum().backward()
    assert r.dynamics.ode_up_proj.grad is not None and torch.count_nonzero(r.dynamics.ode_up_proj.grad) == 0


def test_short_rows_can_span_the_original_length():
    r = rotary(max_factor=4, seed=2, position_span="original").train()
    for _ in range(6):
        t, pos = r.draw(8)  # n = L/2
        assert len(pos) == 8 and pos[-1] == math.ceil(16 * t) - 1
    for _ in range(6):
        t, pos = r.draw(32)  # n = 2L: t >= 2, integer positions over L·t
        assert t >= 2 and pos[-1] == math.ceil(16 * t) - 1 and torch.all(pos[1:] - pos[:-1] >= 1)
    paper = rotary(max_factor=4, seed=2).train()
    t, pos = paper.draw(8)
    assert pos[-1] == math.ceil(8 * t) - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_solve_device_cpu_equals_model_device_on_cuda():
    """On a GPU, solve_device="cpu" (the default) gives the θ and the ODE-weight gradients of a solve on the GPU."""
    results = {}
    for where in ("cpu", "model"):
        model = clex.apply_clex(tiny_model("llama"), max_factor=16, solve_device=where).cuda()
        rotary = clex.get_clex_rotary(model)
        with torch.no_grad():
            rotary.dynamics.ode_down_proj.copy_(
                torch.randn(rotary.dynamics.ode_down_proj.shape, generator=torch.Generator().manual_seed(0)) * 0.05
            )
        theta = rotary.solve([1.0, 3.0, 11.5])
        assert theta.device.type == "cuda"
        theta.pow(2).sum().backward()
        results[where] = (theta.detach().cpu(), rotary.dynamics.ode_up_proj.grad.cpu())
    torch.testing.assert_close(results["cpu"][0], results["model"][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results["cpu"][1], results["model"][1], rtol=1e-5, atol=1e-9)


def test_fixed_frequencies_and_generation_t_are_what_a_fixed_t_forward_uses():
    r = rotary(t_resolution=16, max_factor=8)
    perturb(r)
    for length in (1, 16, 17, 40, 100):
        t = r.generation_t(length)
        assert t == max(1.0, math.ceil(length / 16 * 16 - 1e-6) / 16)  # continuous, rounded up to 1/16
        r.config = r.config.replace(inference_t="fixed", fixed_t=t)
        r(torch.zeros(1, 3, 16), torch.arange(3)[None])
        r.config = r.config.replace(inference_t="continuous", fixed_t=None)
        assert torch.equal(r.fixed_frequencies(t), r.last_inv_freq[0])
    assert rotary(inference_t="integer").generation_t(17) == 2.0
    assert rotary(inference_t="fixed", fixed_t=3.0).generation_t(17) == 1.0625  # fixed: continuous at its grid
    with pytest.raises(ValueError, match="t must be a finite number >= 1"):
        r.fixed_frequencies(0.5)
