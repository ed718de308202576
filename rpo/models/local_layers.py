"""rpo's lean local modules: three for megatron-core's local (no Transformer Engine) transformer layer that keep
less for backward and copy less, with the same numbers (rpo.models.layers.local_block_spec puts them in the spec).

megatron-core 0.16's local layer, measured on SmolLM2-135M's shapes (CPU, float32), keeps per layer five
SwiGLU-sized tensors (the fc1 output, silu of its gate, `up + glu_linear_offset`, their product, and the gate's
view), two fp32 copies per RMSNorm (CPU torch's composite rms_norm), and in attention the repeated K and V, the
fp32 scores and their softmax; its attention is an unfused baddbmm / masked softmax / bmm. Here:

- `RMSNorm`: torch's rms_norm (the values of torch.nn.RMSNorm, megatron's local-spec norm) as one autograd
  function that keeps only its input, and recomputes 1/rms and x/rms in backward (about what the fused CUDA norms
  of TE/apex keep).
- `SwiGLUMLP`: megatron's MLP whose activation silu(gate) · up is one autograd function keeping only the fc1
  output (the gate and up halves); the product, which the fc2 linear keeps, is the only other MLP activation.
- `SDPAttention`: megatron's DotProductAttention computed by torch's scaled_dot_product_attention (CPU: its
  flash kernel; CUDA: flash / memory-efficient kernels) with grouped-query attention unrepeated; it keeps Q, K,
  V, the output and the per-row log-sum-exp, never the [b, heads, s, s] scores. The mask is rpo's explicit
  boolean mask (causal, padding, sliding window, packing), True = masked, as megatron's; a query with no visible
  key (left padding) is let see itself, so no row is empty (its output is never read: no real token attends to
  a padding key). Dropout draws from megatron's model-parallel RNG tracker, as megatron's attention does.

What each keeps is what rpo.models.memory_plan counts for the local spec. The layers' weights, names and
sharding are megatron's (rpo.models.hf_checkpoint maps them unchanged).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLP


# ============================================================================================= RMSNorm ===
class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.eps = eps
        ctx.save_for_backward(x, weight)
        # torch's own rms_norm: the values (and dtypes) of torch.nn.RMSNorm, megatron's local-spec norm.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        compute = x.float()
        rstd = torch.rsqrt(compute.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed = compute * rstd
        grad = grad_out.float()
        grad_weight = (grad * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        scaled = grad * weight.float()  # dL/d(normed)
        grad_x = rstd * (scaled - normed * (scaled * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(torch.nn.Module):
    """RMSNorm (as torch.nn.RMSNorm: `weight`, ε) keeping only its input and 1/rms for backward.

    Built by megatron's layer spec as `RMSNorm(config, hidden_size, eps)`. With sequence parallelism its weight
    carries megatron's `sequence_parallel` attribute, so finalize_model_grads sums its gradient over the
    tensor-parallel group (each rank normalises T/TP positions).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"rpo's local layers build RMSNorm only, got {config.normalization!r}")
        self.eps = eps
        # In the default dtype, as torch.nn.RMSNorm (megatron's local-spec norm) keeps it in bf16 runs too.
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        if config.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x):
        return _RMSNormFunction.apply(x, self.weight, self.eps)


# ============================================================================================== SwiGLU ===
class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fc1_output):
        gate, up = torch.chunk(fc1_output, 2, dim=-1)
        ctx.save_for_backward(fc1_output)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        (fc1_output,) = ctx.saved_tensors
        gate, up = torch.chunk(fc1_output, 2, dim=-1)
        grad = torch.empty_like(fc1_output)
        width = gate.shape[-1]
        # The gradients autograd gives silu(gate) * up: d/dup = g · silu(gate), d/dgate = silu'(gate) · g · up.
        torch.mul(grad_out, F.silu(gate), out=grad[..., width:])
        grad[..., :width] = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad


def swiglu(fc1_output: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of fc1's [..., 2f] output [gate; up], keeping only that output for backward."""
    return _SwiGLUFunction.apply(fc1_output)


class SwiGLUMLP(MLP):
    """megatron's MLP; for its SwiGLU without bias or per-token scale (LLaMA, Mistral) the activation is `swiglu`.

    Any other configuration runs megatron's own forward."""

    def _plain_swiglu(self) -> bool:
        config = self.config
        return (config.gated_linear_unit and config.activation_func is F.silu and not config.add_bias_linear
                and not config.bias_activation_fusion and not config.use_te_activation_func
                and config.glu_linear_offset == 0 and config.activation_func_clamp_value is None)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None or not self._plain_swiglu():
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, _ = self.linear_fc1(hidden_states)
        return self.linear_fc2(swiglu(intermediate))


# =========================================================================================== attention ===
class SDPAttention(DotProductAttention):
    """megatron's DotProductAttention computed by torch.nn.functional.scaled_dot_product_attention.

    Same inputs and output ([s, b, heads, d] in, [s, b, heads·d] out), same explicit mask (True = masked).
    Falls back to megatron's computation for what it does not cover (attention bias, packed-sequence params, a
    softmax offset, no mask).
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if (attention_bias is not None or packed_seq_params is not None or attention_mask is None
                or getattr(self, "softmax_offset", None) is not None):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        from megatron.core import tensor_parallel

        # [s, b, n, d] -> [b, n, s, d]. V is a view of the fused QKV output (Q and K are new tensors after RoPE):
        # its own copy lets that output go instead of being kept whole for backward.
        q, k = (t.permute(1, 2, 0, 3) for t in (query, key))
        v = value.permute(1, 2, 0, 3).contiguous()
        dropout = self.attention_dropout.p if self.training else 0.0
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
               else _null())
        with rng:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(attention_mask, q.dtype), dropout_p=dropout,
                                                     scale=scale,
                                                     enable_gqa=k.shape[1] != q.shape[1])
        # [b, n, s, d] -> [s, b, n·d]
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], -1)


_VISIBLE_CACHE: list = []  # [(weakref to megatron's mask, dtype, weakref to its SDPA mask)] of the last call


def _visible(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's additive mask (0 where visible, -inf where masked) of megatron's boolean mask (True = masked), with
    a query that sees no key let see itself. Every layer of a forward gets the same mask tensor: converted once,
    and one storage for all the layers that keep it for backward (weak references: nothing outlives the step)."""
    if _VISIBLE_CACHE:
        cached_mask, cached_dtype, cached_visible = _VISIBLE_CACHE[0]
        visible = cached_visible()
        if cached_mask() is mask and cached_dtype == dtype and visible is not None:
            return visible
    allowed = ~mask
    empty = ~allowed.any(dim=-1, keepdim=True)
    if empty.any():
        length = allowed.shape[-1]
        allowed = allowed | (empty & torch.eye(length, dtype=torch.bool, device=allowed.device))
    visible = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed, float("-inf"))
    _VISIBLE_CACHE[:] = [(weakref.ref(mask), dtype, weakref.ref(visible))]
    return visible


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# =========================================================================================== the spec ===
def finish_local_model(model) -> None:
    """After megatron built `model` from the local spec (rpo.models.layers.local_block_spec): its MLPs, dense or
    experts, become SwiGLUMLP. (The spec names megatron's
    MLP itself, the only MLP class that megatron's TransformerLayer builds with its tensor-parallel group; a
    subclass in the spec gets a deprecated default group and a warning per layer.)"""
    for module in model.modules():
        if type(module) is MLP:
            module.__class__ = SwiGLUMLP
