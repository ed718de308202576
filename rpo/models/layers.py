"""megatron-core modules for what its local layer spec does not express, and the layer specs that use them.

Each module computes what transformers computes, written against megatron-core 0.16's module interfaces:

- `ZeroCenteredRMSNorm`: Gemma's RMSNorm, x / rms(x) · (1 + w) in float32, w stored as in the checkpoint.
- `RowParallelLinearWithPostNorm`: a row-parallel output projection followed by a norm of its (reduced) output:
  Gemma 3's post-attention and post-feedforward norms, applied before the residual add.
- `WindowedDotProductAttention`: rpo's SDPA attention (rpo.models.local_layers) with this layer's own sliding
  window (added to the explicit mask every rpo forward passes) and softmax scale.
- `OwnRopeSelfAttention`: a SelfAttention whose RoPE uses this layer's frequencies instead of the model's (Gemma
  3's sliding layers use another θ than its global layers).

`local_block_spec` assembles them per layer from an `Architecture` (rpo.models.architectures), with the lean
RMSNorm and SDPA attention of rpo.models.local_layers wherever the family has no module of its own.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from rpo.models.architectures import Architecture, Rope
from rpo.models.local_layers import RMSNorm, SDPAttention


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' "gelu_pytorch_tanh" (Gemma's GeGLU activation)."""
    return F.gelu(x, approximate="tanh")


class ZeroCenteredRMSNorm(torch.nn.Module):
    """Gemma's RMSNorm: float32 x · rsqrt(mean(x²) + ε) · (1 + w), cast back to x's dtype."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class RowParallelLinearWithPostNorm(RowParallelLinear):
    """RowParallelLinear whose output (all-reduced, or this rank's sequence shard with sequence parallelism) goes
    through `post_norm` before the layer's residual add."""

    def __init__(self, input_size: int, output_size: int, *, config, post_norm, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_norm = build_module(post_norm, config=config, hidden_size=output_size,
                                      eps=config.layernorm_epsilon)

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if bias is not None:  # the norm must see the biased output; rpo builds these without bias
            raise ValueError("RowParallelLinearWithPostNorm needs add_bias_linear=False")
        return self.post_norm(output), None


class WindowedDotProductAttention(SDPAttention):
    """SDPAttention with a per-layer sliding window and softmax scale.

    window W (HF semantics): query q sees key k only if q − W < k (and whatever the given mask allows: causal,
    padding, packed segments). The given mask is megatron's boolean [R, 1, T, T] (True = masked).
    """

    def __init__(self, *args, window: int | None = None, layer_softmax_scale: float | None = None, **kwargs):
        if layer_softmax_scale is not None:
            kwargs["softmax_scale"] = layer_softmax_scale
        super().__init__(*args, **kwargs)
        self.window = window

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        if self.window is not None:
            if attention_mask is None:
                raise ValueError("a per-layer sliding window needs the explicit attention mask of rpo's forwards")
            positions = torch.arange(query.shape[0], device=query.device)
            outside = positions[None, :] <= positions[:, None] - self.window  # [query, key]
            attention_mask = attention_mask | outside
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


class OwnRopeSelfAttention(SelfAttention):
    """SelfAttention with this layer's RoPE frequencies (positions 0..T−1 as the model's own RoPE)."""

    def __init__(self, *args, rope: Rope, **kwargs):
        super().__init__(*args, **kwargs)
        self.own_rotary = RotaryEmbedding(kv_channels=self.config.kv_channels, rotary_percent=1.0,
                                          rotary_interleaved=False, use_cpu_initialization=True)
        self.own_rotary.inv_freq = rope.inv_freq.clone()

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if rotary_pos_emb is not None:
            length = (rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb).shape[0]
            rotary_pos_emb = self.own_rotary(length)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


def model_rope_type(arch: Architecture) -> str:
    """The layer type whose RoPE the GPTModel's own rotary embedding uses (others get OwnRopeSelfAttention)."""
    return "full_attention" if "full_attention" in arch.rope else sorted(arch.rope)[0]


def uniform_softmax_scale(arch: Architecture) -> float | None:
    scales = {arch.softmax_scale(i) for i in range(arch.num_layers)}
    return scales.pop() if len(scales) == 1 else None


def local_block_spec(arch: Architecture, config, base_layer_spec):
    """A TransformerBlock spec of megatron's local layers, one spec per layer: rpo's lean RMSNorm and SDPA attention
    (rpo.models.local_layers), and what the architecture needs (Gemma's norms and post-norms, per-layer windows,
    scales and RoPE, the MoE router)."""
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    norm = ZeroCenteredRMSNorm if arch.zero_centered_norms else RMSNorm
    per_layer_attention = not arch.uniform_window or uniform_softmax_scale(arch) is None
    model_rope = arch.rope[model_rope_type(arch)]
    layers = []
    for i in range(arch.num_layers):
        base = base_layer_spec.submodules
        attention = base.self_attention
        attn_sub = dataclasses.replace(
            attention.submodules,
            q_layernorm=norm if arch.qk_norm else attention.submodules.q_layernorm,
            k_layernorm=norm if arch.qk_norm else attention.submodules.k_layernorm)
        if per_layer_attention:
            attn_sub = dataclasses.replace(attn_sub, core_attention=ModuleSpec(
                module=WindowedDotProductAttention,
                params={"window": None if arch.uniform_window else arch.layer_window(i),
                        "layer_softmax_scale": arch.softmax_scale(i)}))
        else:
            attn_sub = dataclasses.replace(attn_sub, core_attention=SDPAttention)
        if arch.post_norms:
            attn_sub = dataclasses.replace(attn_sub, linear_proj=ModuleSpec(
                module=RowParallelLinearWithPostNorm, params={"post_norm": norm}))
        params = dict(attention.params)
        module = attention.module
        if arch.layer_rope(i) is not model_rope and not _same_rope(arch.layer_rope(i), model_rope):
            module, params["rope"] = OwnRopeSelfAttention, arch.layer_rope(i)
        attention = ModuleSpec(module=module, params=params, submodules=attn_sub)
        mlp = base.mlp
        if arch.post_norms:
            mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, linear_fc2=ModuleSpec(
                module=RowParallelLinearWithPostNorm, params={"post_norm": norm})))
        if arch.moe is not None:
            from rpo.models.moe import LoadBalancedRouter

            mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, router=LoadBalancedRouter))
        layers.append(dataclasses.replace(base_layer_spec, submodules=dataclasses.replace(
            base, input_layernorm=norm, pre_mlp_layernorm=norm, self_attention=attention, mlp=mlp)))
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=layers,
                                                                                      layer_norm=norm))


def _same_rope(a: Rope, b: Rope) -> bool:
    return a.attention_scaling == b.attention_scaling and torch.equal(a.inv_freq, b.inv_freq)
