"""CLEX models in lm-evaluation-harness (``lm_eval``, 0.4.x): a model type ``clex``, and the Python route.

lm-eval finds a model type by name in its registry (``lm_eval.api.registry``); a class gets in with
``@register_model(name)`` when its module is imported. lm-eval 0.4.13 reads no entry points and its CLI
imports no third-party module (``--include_path`` adds task YAMLs only), so the stock ``lm_eval`` command
cannot see ``clex``; this module's command line is lm-eval's own, with ``clex`` registered first::

    python -m clex.eval.harness --model clex --model_args pretrained=runs/clex,inference_t=integer \\
        --tasks niah_single_1 --metadata '{"max_seq_lengths":[8192]}' --device cuda:0
    python -m clex.eval.harness --model clex --model_args pretrained=runs/base,method=yarn,factor=8 ...

``--model_args`` of ``clex``:

- ``pretrained``: a model folder, or ``smollm2`` (the embedded SmolLM2), exactly as ``PATH`` of a model spec
  (:mod:`clex.eval.specs`); the tokenizer comes from the same folder (never the hub).
- ``method``: optional, a baseline of :data:`clex.hf.methods.METHODS` (``yarn``, ``pi``, ``ntk``, ...) or
  ``clex``; with no method a CLEX folder runs with its saved settings.
- every other key that is not one of HFLM's own arguments (``batch_size``, ``max_length``, ``device``,
  ``dtype``, ...) is a parameter of the spec: CLEXConfig fields (``inference_t``, ``t_resolution``,
  ``fixed_t``, ``log_scale``, ...; unknown ones are refused) for a CLEX model, ``factor`` and rope keys for
  a baseline. So ``pretrained=P,method=yarn,factor=8`` is the spec ``P:yarn:factor=8`` of ``clex eval``.

In Python, with a model already built (ours or anyone's)::

    from clex.eval.harness import clex_lm
    lm = clex_lm(model, tokenizer, max_length=8192 + 128, batch_size=4)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

which is lm-eval's documented ``HFLM(pretrained=<built model>)`` plus one thing: a CLEX model generates
with t fixed to the t of the prompt plus ``max_gen_toks`` (:func:`clex.hf.generation.fixed_clex_t`), so the key
cache stays exact (plain HFLM would let t grow token by token). Other models generate as in HFLM. A folder
made by ``clex export`` needs none of this: ``--model hf`` / ``--model vllm`` load it as it is.
"""

from __future__ import annotations

import inspect
import sys

from ..core.checks import check_device, check_dtype
from ..hf.generation import fixed_clex_t
from .specs import ModelSpec, load_spec

#: the name lm-eval knows the model type by
MODEL_NAME = "clex"


def missing_lm_eval(what: str, error: ImportError) -> OSError:
    """The error for a missing lm-eval: ``what`` needs it, why the import failed, and how to install it."""
    return OSError(
        f"{what} needs lm-evaluation-harness (lm_eval), which cannot be imported here ({error}); "
        "install it with: pip install -c constraints.txt -e '.[ruler]'"
    )


def _lm_eval():
    """lm_eval's HFLM and register_model, or an OSError saying how to install lm-eval."""
    try:
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise missing_lm_eval("this", e) from None
    return HFLM, register_model


def _hflm_arguments(hflm) -> set[str]:
    return {
        n
        for n, p in inspect.signature(hflm.__init__).parameters.items()
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    } - {"self"}


def _build_class():
    """The HFLM subclass, registered as ``clex`` (built once, on first use: lm-eval is optional)."""
    HFLM, register_model = _lm_eval()

    class ClexLM(HFLM):
        """lm-eval's HFLM for a model built by a clex model spec; CLEX generates with t fixed (see module)."""

        def __init__(
            self,
            pretrained,
            method: str | None = None,
            tokenizer=None,
            device: str | None = None,
            dtype: str | None = None,
            **kwargs,
        ):
            own = _hflm_arguments(HFLM)
            params = {k: kwargs.pop(k) for k in list(kwargs) if k not in own}
            if isinstance(pretrained, str):
                if tokenizer is not None:
                    raise ValueError(
                        "model_args tokenizer: clex takes the tokenizer from the model folder; "
                        f"leave tokenizer out, got {tokenizer!r}"
                    )
                if params and not method:
                    method = "clex"  # CLEX settings for a saved CLEX folder
                spec = ModelSpec(path=pretrained, method=method, params=params)
                import torch

                device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
                dtype = check_dtype(None if dtype in (None, "auto") else str(dtype))
                loaded = load_spec(spec, device=device, dtype=dtype)
                pretrained, tokenizer = loaded.model, loaded.tokenizer
            elif params or method:
                raise ValueError(
                    f"model_args {sorted(params) or ['method']}: settings apply to a model folder "
                    "(pretrained=PATH); a built model is used as it is"
                )
            if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None):
                tokenizer.pad_token = tokenizer.eos_token  # batched generation pads on the left
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)

        def _model_generate(self, context, max_length: int, stop, **generation_kwargs):
            # max_length = padded prompt + max_gen_toks: t of the longest row's final length, held fixed
            with fixed_clex_t(self.model, int(max_length)):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)

    register_model(MODEL_NAME)(ClexLM)
    return ClexLM


_CLASS = None


def lm_class():
    """The registered ``clex`` model class of lm-eval (registers it on the first call)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _build_class()
    return _CLASS


def clex_lm(model, tokenizer, *, max_length: int, batch_size: int = 1, **kwargs):
    """An lm-eval model (HFLM) around an already-built causal LM and its tokenizer; CLEX keeps t fixed
    during each generation. max_length: the longest prompt + generation in tokens (HFLM truncates past it)."""
    return lm_class()(
        pretrained=model, tokenizer=tokenizer, max_length=int(max_length), batch_size=batch_size, **kwargs
    )


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``clex`` model type registered (``python -m clex.eval.harness ...``)."""
    lm_class()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
