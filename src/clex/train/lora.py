"""LoRA for ``train: lora``: wrapping the model with peft, and merging the adapters into the final weights.

The merge, W' = W + (α / r) · B A for every adapted linear layer, is peft's ``merge_and_unload`` where the
weights are whole in this process (one process, DDP). Under ZeRO-3 and FSDP they are sharded: each process
holds a slice (a ZeRO-3 parameter outside its forward has 0 elements), so merging in place fails. There the
trainer gathers the full state dict first (``accelerator.get_state_dict``, on the main process) and
:func:`merge_state_dict` applies the same formula to it, so the final folder is the same either way.
"""

from __future__ import annotations

import torch

_BASE, _A, _B = ".base_layer.weight", ".lora_A.default.weight", ".lora_B.default.weight"
_PEFT_PREFIX = "base_model.model."


def wrap(model, *, rank: int, alpha: float, dropout: float, targets):
    """``model`` with peft LoRA adapters of rank ``rank`` (scale alpha / rank) on the ``targets`` linears."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("TrainConfig.train='lora' needs peft: pip install peft") from None
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def save_adapter(peft_model, folder, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the LoRA adapters unmerged to ``folder`` in peft's format (adapter_config.json +
    adapter_model.safetensors): ``PeftModel.from_pretrained(base, folder)`` reads them back. ``state_dict``: the
    full gathered one where the weights are sharded (ZeRO-3, FSDP)."""
    peft_model.save_pretrained(str(folder), state_dict=state_dict)


def merge_state_dict(state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a LoRA model's full one: every ``X.base_layer.weight`` becomes
    ``X.weight`` = W + (alpha / rank) · B @ A (computed in float32, stored in W's dtype), the adapters dropped,
    peft's ``base_model.model.`` prefix removed. Raises ValueError on an adapter without its base weight."""
    scale = alpha / rank
    out = {}
    for key, value in state_dict.items():
        if key.endswith((_A, _B)):
            continue
        name = key.removeprefix(_PEFT_PREFIX)
        if key.endswith(_BASE):
            stem = key[: -len(_BASE)]
            a, b = state_dict.get(stem + _A), state_dict.get(stem + _B)
            if a is None or b is None:
                raise ValueError(
                    f"LoRA merge: {key} has no lora_A/lora_B beside it (state dict keys: {len(state_dict)})"
                )
            delta = (b.float() @ a.float()) * scale  # [out, r] @ [r, in] -> [out, in]
            value = (value.float() + delta).to(value.dtype)
            name = name[: -len(_BASE)] + ".weight"
        out[name] = value
    orphans = [k for k in state_dict if k.endswith(_A) and k[: -len(_A)] + _BASE not in state_dict]
    if orphans:
        raise ValueError(f"LoRA merge: {orphans[0]} has no base weight beside it")
    return out
