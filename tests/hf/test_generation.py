"""Generation with CLEX: the exact key cache (re-rotation when t changes) and the fixed-t policy.

Two oracles. (1) One full forward over the sequence so far with the current t: a cache can match it only in
a ONE-layer model, because the keys of layer l >= 1 are computed from hidden states that went through earlier
layers' attention with the t of their own time (test_deeper_layers_cannot_match_a_full_forward). (2) For any
depth: the reference's way, unrotated keys cached and ALL rotated with the current θ at every step, written
here independently of clex.generation (UnrotatedCache + rotating only queries in the attention).
"""

import importlib

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache
from transformers.cache_utils import Cache, Fp8QuantizedLayer

import clex
from clex.core.equations import rope_angles
from clex.hf import generation
from clex.hf.compat import cache_kwargs, output_cache

L, NEW = 16, 150  # original length; 150 new tokens: t changes every 8 tokens (t_resolution = 2), ~19 times
PROMPTS = ([5, 9, 13, 7, 8, 21, 30, 11, 12, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [30, 31, 32, 33, 34, 35, 36])
MODULES = {"llama": "llama", "gpt_neox": "gpt_neox", "phi3": "phi3"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads on a shared CPU; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clex_model(family="llama", exact_cache=False, **kw):
    model = tiny_model(family, **kw)
    # a coarse solve: the cache is tested; the exact cache off unless a test turns it on
    clex.apply_clex(model, max_factor=12, t_resolution=2, time_dt=0.05, exact_cache=exact_cache)
    with torch.no_grad():  # a trained-looking ODE: not just the NTK prior
        clex.get_clex_rotary(model).dynamics.ode_down_proj.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    model.generation_config.eos_token_id = None
    return model


def left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def generate(model, prompts, new=NEW, **kw):
    """-> (rows: each prompt + its generated tokens, logits per step [steps, B, V])."""
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            **kw,
        )
    rows = [p + out.sequences[b, ids.shape[1] :].tolist() for b, p in enumerate(prompts)]
    return rows, torch.stack(out.logits)


def full_forward_logits(model, rows, prompts):
    """Row by row, unpadded: the last logits of one cache-free forward over each prefix.  [steps, B, V]"""
    steps = len(rows[0]) - len(prompts[0])
    out = torch.zeros(steps, len(rows), model.config.vocab_size)
    with torch.no_grad():
        for b, (row, p) in enumerate(zip(rows, prompts)):
            for k in range(steps):
                out[k, b] = model(torch.tensor([row[: len(p) + k]]), use_cache=False).logits[0, -1]
    return out


class UnrotatedCache(DynamicCache):
    """The reference's cache: keys stored unrotated, all returned rotated with the current θ."""

    def __init__(self, rotary):
        super().__init__()
        self.rotary, self.positions = rotary, None  # positions [B, S] of every cached key, set by the driver

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx)
        theta = self.rotary.last_inv_freq.expand(keys.shape[0], -1)
        angles = rope_angles(self.positions.float(), theta)  # [B, S, d]
        cos, sin, d = angles.cos()[:, None], angles.sin()[:, None], angles.shape[-1]
        k = keys[..., :d]
        turned = torch.cat((-k[..., d // 2 :], k[..., : d // 2]), dim=-1)
        return torch.cat((k * cos + turned * sin, keys[..., d:]), dim=-1), values


def rotate_queries_only(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin, d = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim), cos.shape[-1]
    r = q[..., :d]
    turned = torch.cat((-r[..., d // 2 :], r[..., : d // 2]), dim=-1)
    return torch.cat((r * cos + turned * sin, q[..., d:]), dim=-1), k


def reference_logits(model, family, rows, prompts, monkeypatch):
    """Teacher-forced decoding of ``rows`` with UnrotatedCache, padded as generate pads.  [steps, B, V]"""
    generation.disable_exact_cache(model)  # the oracle rotates by itself
    module = importlib.import_module(f"transformers.models.{MODULES[family]}.modeling_{MODULES[family]}")
    monkeypatch.setattr(module, "apply_rotary_pos_emb", rotate_queries_only)
    ids, mask = left_pad(prompts)
    width, steps = ids.shape[1], len(rows[0]) - len(prompts[0])
    tokens = torch.cat([ids, torch.tensor([r[len(p) :] for r, p in zip(rows, prompts)])], dim=1)
    mask = torch.cat([mask, torch.ones(len(rows), steps, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache, out = UnrotatedCache(clex.get_clex_rotary(model)), []
    with torch.no_grad():
        for end in range(width, width + steps):
            start = 0 if end == width else end - 1
            cache.positions = positions[:, :end]
            logits = model(
                tokens[:, start:end],
                attention_mask=mask[:, :end],
                position_ids=positions[:, start:end],
                **cache_kwargs(cache),
            ).logits
            out.append(logits[:, -1])
    monkeypatch.undo()
    return torch.stack(out)


def test_one_layer_generation_equals_a_full_forward_at_every_step():
    model = clex_model(num_hidden_layers=1)
    hooks = generation.enable_exact_cache(model)
    prompts = PROMPTS[:1]
    rows, logits = generate(model, prompts)
    assert hooks.rerotations >= 3
    assert (logits - full_forward_logits(model, rows, prompts)).abs().max() <= 1e-4
    generation.disable_exact_cache(model)  # the stale cache of plain transformers
    rows, logits = generate(model, prompts, new=40)
    assert (logits - full_forward_logits(model, rows, prompts)).abs().max() > 1e-3


@pytest.mark.parametrize("family, sample", [("llama", False), ("llama", True), ("gpt_neox", False), ("phi3", True)])
def test_batched_left_padded_generation_equals_the_reference_rotation(family, sample, monkeypatch):
    model = clex_model(family)
    hooks = generation.enable_exact_cache(model)
    torch.manual_seed(0)
    rows, logits = generate(model, PROMPTS, do_sample=sample, top_k=0)
    assert hooks.rerotations >= 3 and len(rows[0]) == len(PROMPTS[0]) + NEW
    reference = reference_logits(model, family, rows, PROMPTS, monkeypatch)
    assert (logits - reference).abs().max() <= 1e-4


def test_the_stale_cache_differs_from_the_reference(monkeypatch):
    model = clex_model("llama")
    rows, logits = generate(model, PROMPTS, new=40)  # no enable_exact_cache: transformers as it is
    assert (logits - reference_logits(model, "llama", rows, PROMPTS, monkeypatch)).abs().max() > 1e-3


def test_apply_clex_turns_the_exact_cache_on_by_default(monkeypatch):
    model = clex_model("llama", exact_cache=True)
    rows, logits = generate(model, PROMPTS, new=40)
    assert (logits - reference_logits(model, "llama", rows, PROMPTS, monkeypatch)).abs().max() <= 1e-4


def test_deeper_layers_cannot_match_a_full_forward():
    """Why oracle (1) is for one layer only: re-rotated layer-0 keys are exact, layer-1 keys are not."""
    model = clex_model("llama")
    generation.enable_exact_cache(model)
    ids = torch.randint(3, 97, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        incremental, full = DynamicCache(), DynamicCache()
        model(ids[:, :16], **cache_kwargs(incremental))  # t = 1
        model(ids[:, 16:], **cache_kwargs(incremental))  # t = 1.5: cached keys re-rotated
        model(ids, **cache_kwargs(full))  # everything at t = 1.5
    k0, k1 = [(a.keys - b.keys).abs().max() for a, b in zip(incremental.layers, full.layers)]
    assert k0 <= 1e-6 and k1 > 1e-5


def test_static_cache_and_every_step_mode_agree_with_the_dynamic_cache():
    model = clex_model("llama")
    generation.enable_exact_cache(model)
    rows, logits = generate(model, PROMPTS, new=60)
    _, static = generate(model, PROMPTS, new=60, cache_implementation="static")
    assert (static - logits).abs().max() <= 1e-5
    hooks = generation.enable_exact_cache(model, rerotate="every_step")
    _, every = generate(model, PROMPTS, new=60)
    assert (every - logits).abs().max() <= 1e-4 and hooks.rerotations >= 59


def test_fixed_t_generation_equals_a_full_forward_at_that_t():
    model = clex_model("llama")
    prompts = PROMPTS[:1]
    t = generation.fixed_t_for(model, len(prompts[0]), 60)
    assert t == 5.0  # (20 + 60) / 16, on the 1/2 grid
    assert generation.fixed_t_for(model, 20, 61) == 5.5
    out = generation.generate_fixed_t(
        model, torch.tensor(prompts), max_new_tokens=60, return_dict_in_generate=True, output_logits=True
    )
    assert clex.get_clex_rotary(model).config.inference_t == "continuous"  # restored
    rows = [out.sequences[0].tolist()]
    with generation.fixed_t(model, t):
        reference = full_forward_logits(model, rows, prompts)
    assert (torch.stack(out.logits) - reference).abs().max() <= 1e-4


def test_unsupported_caches_are_refused_with_a_clear_message():
    model = clex_model("llama")
    generation.enable_exact_cache(model)
    ids = torch.tensor([PROMPTS[1]])
    with pytest.raises(ValueError, match="Fp8QuantizedLayer.*fixed-t policy"):
        model.generate(ids, **cache_kwargs(Cache(layers=[Fp8QuantizedLayer(), Fp8QuantizedLayer()])), max_new_tokens=2)
    with pytest.raises(ValueError, match="offloads layers"):
        model(ids, **cache_kwargs(DynamicCache(offloading=True)))
    filled = DynamicCache()
    generation.disable_exact_cache(model)
    with torch.no_grad():
        model(ids, **cache_kwargs(filled))
    generation.enable_exact_cache(model)
    with pytest.raises(ValueError, match="without CLEX's exact key cache"):
        model(ids, **cache_kwargs(filled))
    with pytest.raises(ValueError, match="rerotate must be one of 'on_change', 'every_step'"):
        generation.enable_exact_cache(model, rerotate="always")


def test_a_cache_made_inside_the_forward_gets_its_state_and_crop_is_followed():
    model = clex_model("llama", num_hidden_layers=1)
    hooks = generation.enable_exact_cache(model)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = output_cache(model(ids[:, :30], use_cache=True))  # DynamicCache made by the model
        assert cache._clex_keys.length == 30
        cache.crop(-10)  # back to 20 keys, cached at t = 2 (30 keys); the next forward has t = 1.5
        logits = model(ids[:, 20:21], **cache_kwargs(cache)).logits[0, -1]
        full = model(ids[:, :21], use_cache=False).logits[0, -1]
    assert cache._clex_keys.length == 21 and hooks.rerotations == 1
    assert (logits - full).abs().max() <= 1e-5


def test_the_rotary_decode_memo_follows_lengths_weights_and_policy():
    """The rotary's per-token memo (clex.core.rotary_embedding._inference_frequencies) gives what a fresh lookup gives."""
    model = clex_model("llama")
    rotary = clex.get_clex_rotary(model)
    x = torch.zeros(2, 1, 8)
    with torch.no_grad():
        for n in (40, 41, 17, 16, 190, 5):  # within the block of lengths memoised, and back before it
            rotary(x, torch.tensor([[n - 1], [n // 2]]))
            t = rotary.t_for_length(torch.tensor([n, n // 2 + 1]))
            assert torch.equal(rotary.last_t, t) and torch.equal(rotary.last_inv_freq, rotary.frequencies(t))
        rotary(x, torch.tensor([[39], [20]]))  # t = 2.5, 1.5
        before = rotary.last_inv_freq.clone()
        rotary.dynamics.ode_down_proj.mul_(2)  # new weights: new θ for the same t
        rotary(x, torch.tensor([[39], [20]]))
        assert (rotary.last_inv_freq - before).abs().max() > 1e-4
        assert torch.equal(rotary.last_inv_freq, rotary.frequencies(torch.tensor([2.5, 1.5], dtype=torch.float64)))
        with generation.fixed_t(model, 3.5):
            rotary(x, torch.tensor([[6], [2]]))
            assert rotary.last_t.tolist() == [3.5, 3.5]
        rotary(x, torch.tensor([[6], [2]]))
        assert rotary.last_t.tolist() == [1.0, 1.0]


def test_fixed_t_for_checks_its_arguments():
    model = clex_model("llama")
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -1"):
        generation.fixed_t_for(model, 10, -1)
    with pytest.raises(ValueError, match="fixed_t must be a number >= 1"):
        with generation.fixed_t(model, 0.5):
            pass


def test_rotate_keys_in_blocks_rows_and_half_precision_equals_a_fresh_rotation(monkeypatch):
    from clex.hf import keycache

    monkeypatch.setattr(keycache, "_CPU_BLOCK_BYTES", 1024)  # many blocks of 4 positions
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 50, 20, generator=g)  # head_dim 20, rotary d = 16: partial rotary
    positions = torch.arange(50.0).expand(2, -1)
    old, new = torch.rand(2, 8, generator=g), torch.rand(2, 8, generator=g)

    def rotate(theta):
        angles = rope_angles(positions, theta)[:, None]  # [B, 1, S, 16]
        k = keys[..., :16]
        turned = torch.cat((-k[..., 8:], k[..., :8]), dim=-1)
        return torch.cat((k * angles.cos() + turned * angles.sin(), keys[..., 16:]), dim=-1)

    cached, expected = rotate(old), rotate(new)
    cos, sin = generation.rotation_delta(positions, old, new)
    every = cached.clone()
    generation.rotate_keys_(every, cos, sin)
    torch.testing.assert_close(every, expected, rtol=0, atol=1e-5)
    assert torch.equal(every[..., 16:], keys[..., 16:])  # the pass-through dims are untouched
    one = cached.clone()
    generation.rotate_keys_(one, cos[1:], sin[1:], rows=torch.tensor([1]))
    assert torch.equal(one[0], cached[0])
    torch.testing.assert_close(one[1], expected[1], rtol=0, atol=1e-5)
    half = cached.bfloat16()
    generation.rotate_keys_(half, cos, sin)
    torch.testing.assert_close(half.float(), expected, rtol=0, atol=3e-2)


def test_a_cache_the_hooks_cannot_see_fails_loudly_naming_the_transformers_version(monkeypatch):
    """A release that passes the cache under a name the hooks do not know must not decode with stale keys."""
    import transformers

    from clex.hf import keycache

    model = clex_model("llama", exact_cache=True)
    monkeypatch.setattr(keycache, "CACHE_ARGS", ("kv_cache_of_the_future",))
    monkeypatch.setattr(clex.get_clex_rotary(model)._clex_exact_cache, "_cache_arg", "kv_cache_of_the_future")
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(RuntimeError, match=f"did not see the key cache.*transformers {transformers.__version__}"):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=3, pad_token_id=0)


def test_the_cache_argument_is_found_by_signature_and_an_unknown_one_is_refused():
    from clex.hf.compat import cache_argument

    model = clex_model("llama")
    assert cache_argument(model.model.forward) in ("cache", "past_key_values")
    with pytest.raises(RuntimeError, match="takes none of cache, past_key_values in transformers"):
        cache_argument(lambda input_ids, kv=None: None)
