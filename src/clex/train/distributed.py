"""The distributed glue of fine-tuning: accelerate's Accelerator for a run, and what DDP, FSDP and DeepSpeed each
need to train CLEX with the numerics of one process (:mod:`clex.train.loop` calls these around ``prepare``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.rotary_embedding import CLEXRotaryEmbedding
from .config import TrainConfig


def make_accelerator(config: TrainConfig):
    """accelerate's Accelerator for the run: CPU where no accelerator is present, bf16 mixed precision for dtype
    bfloat16 (else the launch config's), the run's accumulation, TensorBoard logging where asked."""
    from accelerate import Accelerator

    kwargs = {}
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("TrainConfig.tensorboard=true needs TensorBoard: pip install tensorboard") from None
        kwargs.update(log_with="tensorboard", project_dir=str(Path(config.out_dir) / "tensorboard"))
    return Accelerator(
        cpu=config.cpu or not has_accelerator(),
        mixed_precision="bf16" if config.dtype == "bfloat16" else None,  # None: the launch config's
        gradient_accumulation_steps=config.grad_accum,
        **kwargs,
    )


def has_accelerator() -> bool:
    """A GPU (or other device) is present; without one, accelerate must be told `cpu` to form a gloo group
    from torchrun's environment (else every process would train alone)."""
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return torch.cuda.is_available() or is_mps_available() or is_xpu_available() or is_npu_available()


def deepspeed_fill(accelerator, config: TrainConfig) -> None:
    """DeepSpeed reads micro-batch size, accumulation and clipping from its own config (we feed it no
    dataloader): the run config's values win."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm
        plugin.deepspeed_config["gradient_accumulation_steps"] = config.grad_accum


def float32_rotary_policy(policy):
    """FSDP1's mixed-precision policy with the rotary module and every buffer kept in float32.

    accelerate's bf16 policy casts every parameter and buffer to bf16 for the forward: the CLEX ODE weights,
    θ⁰ (``inv_freq``: relative error 2^-9, so at 64k positions an angle off by up to ~128 rad) and the
    frequencies solved from them, where DDP's autocast keeps all of that in float32. FSDP runs the modules of
    ``_module_classes_to_ignore`` unwrapped from mixed precision (their own FSDP unit, inputs cast to float32
    and outputs back), so adding the CLEX rotary there gives FSDP the numerics of DDP for the part CLEX adds;
    ``buffer_dtype`` float32 does the same for plain RoPE's θ⁰. -> a new MixedPrecision (None stays None)."""
    if policy is None:
        return None
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(
        param_dtype=policy.param_dtype,
        reduce_dtype=policy.reduce_dtype,
        buffer_dtype=torch.float32,
        keep_low_precision_grads=policy.keep_low_precision_grads,
        cast_forward_inputs=policy.cast_forward_inputs,
        cast_root_forward_inputs=policy.cast_root_forward_inputs,
        _module_classes_to_ignore=tuple({*policy._module_classes_to_ignore, CLEXRotaryEmbedding}),
    )


def fsdp_float32_rotary(accelerator) -> None:
    """Under FSDP1 with mixed precision, the policy of :func:`float32_rotary_policy` (before ``prepare``)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1:
        plugin.mixed_precision_policy = float32_rotary_policy(plugin.mixed_precision_policy)


def nonfinite_gradients(model) -> list[str]:
    """Names of the trained parameters whose gradient holds a nan or an inf (an empty list when all are finite)."""
    return [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


def zero3_external_params(accelerator, rotary) -> None:
    """Under DeepSpeed ZeRO-3 a parameter is gathered when ITS module runs; the rotary reads the ODE weights
    of its `dynamics` child directly, so register them as the rotary's external parameters."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if rotary is None or plugin is None or plugin.zero_stage != 3:
        return
    import deepspeed

    for p in rotary.dynamics.parameters():
        deepspeed.zero.register_external_parameter(rotary, p)
