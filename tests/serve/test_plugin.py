"""The plugin's request hook without vLLM: what it writes into a request (its final length, its prefix-cache salt),
what it refuses, and that models it does not serve pass through untouched."""

import math
from types import SimpleNamespace

import pytest
from conftest import tiny_model

import clex
from clex.serve.plugin import LENGTH_KEY, SERVED, scaling_of, stamp
from clex.serve.scaling import scaling_for


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clex")
    clex.apply_clex(tiny_model("llama"), exact_cache=False, log_scale=True).save_pretrained(folder)
    import json

    return scaling_for(json.loads((folder / "config.json").read_text()))


def request(prompt=10, max_tokens=6, salt=None, extra=None, **more):
    params = SimpleNamespace(max_tokens=max_tokens, extra_args=extra)
    return SimpleNamespace(prompt_token_ids=list(range(prompt)), sampling_params=params, cache_salt=salt, **more)


def test_a_request_carries_its_final_length_and_is_salted_with_its_t(scaling):
    r = request(prompt=30, max_tokens=10, extra={"mine": 1, LENGTH_KEY: 3})
    stamp(r, scaling)
    assert r.sampling_params.extra_args == {"mine": 1, LENGTH_KEY: 40}  # a client's own value is overwritten
    assert r.cache_salt == scaling.cache_key(40) == f"clex:t=2.5:q={math.log(40) / math.log(16)!r}"
    r = request(prompt=30, max_tokens=10, salt="user-7")
    stamp(r, scaling)
    assert r.cache_salt == "user-7|" + scaling.cache_key(40)  # the client's salt is kept


def test_requests_that_cannot_be_served_per_request_are_refused(scaling):
    with pytest.raises(ValueError, match="generation requests only"):
        stamp(SimpleNamespace(sampling_params=None, prompt_token_ids=[1]), scaling)
    with pytest.raises(ValueError, match="streaming-input"):
        stamp(request(resumable=True), scaling)


def test_only_the_served_architectures_get_a_scaling():
    config = tiny_model("llama").config
    config.rope_parameters = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 1e4,
    }
    stock = SimpleNamespace(architectures=["LlamaForCausalLM"], hf_config=config)
    assert scaling_of(stock) is None
    ours = SimpleNamespace(architectures=[SERVED["LlamaForCausalLM"]], hf_config=config)
    assert scaling_of(ours).kind == "yarn" and scaling_of(ours) is scaling_of(ours)
