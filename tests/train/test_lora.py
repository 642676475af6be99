"""The LoRA merge of sharded runs (clex.train.lora.merge_state_dict) equals peft's own merge_and_unload."""

import pytest
import torch
from conftest import tiny_model

import clex
from clex.train import lora


def _lora_model(seed=0):
    model = clex.apply_clex(tiny_model(seed=seed), clex.CLEXConfig(max_factor=4))
    wrapped = lora.wrap(model, rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    torch.manual_seed(seed)
    with torch.no_grad():  # peft starts B at zero, which would make any merge look right
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return wrapped


def test_merged_state_dict_equals_peft_merge_and_unload():
    wrapped = _lora_model()
    full = {k: v.clone() for k, v in wrapped.state_dict().items()}
    merged = lora.merge_state_dict(full, rank=4, alpha=8)
    ref = wrapped.merge_and_unload().state_dict()
    assert merged.keys() == ref.keys()
    assert any("rotary_emb.dynamics" in k for k in merged)  # the CLEX ODE weights travel with it
    for k in ref:
        assert torch.equal(merged[k], ref[k]), k
    changed = [
        k
        for k in ref
        if k.endswith("q_proj.weight")
        and not torch.equal(ref[k], full["base_model.model." + k.replace(".weight", ".base_layer.weight")])
    ]
    assert changed  # the merge did change the adapted weights


def test_merge_refuses_an_adapter_without_its_partner():
    full = {k: v for k, v in _lora_model().state_dict().items()}
    key = next(k for k in full if k.endswith(".lora_B.default.weight"))
    del full[key]
    with pytest.raises(ValueError, match="has no lora_A/lora_B beside it"):
        lora.merge_state_dict(full, rank=4, alpha=8)
