"""The Hugging Face model families rpo trains, and what each one's config means for a megatron-core GPTModel.

`architecture(hf_config)` reads an HF config into an `Architecture`: every feature the megatron model needs to
compute exactly what transformers computes. A feature that cannot be made exact is refused with one line naming
the family and the feature (`UnsupportedModelError`); nothing converts approximately.

| model_type | family | what it adds to the LLaMA layout |
| --- | --- | --- |
| llama | LLaMA 2/3/3.x, SmolLM2 | (the base: GQA, RoPE, RMSNorm, SwiGLU, tied or untied embeddings) |
| mistral | Mistral | one sliding window for every layer |
| qwen2 | Qwen2 / Qwen2.5 | bias on q, k, v (not o); windows on the layers transformers' `layer_types` names |
| qwen3 | Qwen3 (dense) | per-head RMSNorm on q and k (megatron's qk layernorm); head_dim ≠ hidden / heads |
| gemma3_text | Gemma 3 (text) | √hidden embedding scale; RMSNorm applied as (1 + w); GeGLU (tanh GELU); norms after attention and MLP; q/k norms; interleaved sliding/global layers with their own RoPE; query scale query_pre_attn_scalar^-½ |
| mixtral | Mixtral | megatron-core's MoE layer (router, experts) instead of the MLP; top-k probabilities renormalised |
| qwen3_moe | Qwen3-MoE | Qwen3's attention with the MoE layer; `norm_topk_prob` picks renormalised or raw top-k probabilities |

RoPE: the inverse frequencies are transformers' own (its `ROPE_INIT_FUNCTIONS` for `linear`, `llama3` and `yarn`,
the default formula otherwise), so every static scaling is exact by construction; a yarn attention factor f
scales cos and sin, i.e. every attention score by f², and goes into the softmax scale. `dynamic` and `longrope`
change the frequencies with each batch's length and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# model_type -> the family's name in errors and docs
FAMILIES = {
    "llama": "LLaMA", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3_text": "Gemma 3",
    "mixtral": "Mixtral", "qwen3_moe": "Qwen3-MoE",
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")
# Families asked for often, each with what is missing.
REFUSED_FAMILIES = {
    "phi3": "Phi-3: its LongRoPE scaling (rope type 'longrope') depends on each batch's length and its fused "
            "qkv_proj / gate_up_proj weights are not mapped",
    "gemma2": "Gemma 2: attention logit soft-capping (attn_logit_softcapping) is not in megatron-core's local "
              "attention",
    "gemma": "Gemma (1): not mapped (Gemma 3 text, model_type 'gemma3_text', is)",
    "gemma3": "Gemma 3 multimodal (Gemma3ForConditionalGeneration): its vision tower is not mapped; the text "
              "models (Gemma3ForCausalLM, model_type 'gemma3_text') are",
    "qwen2_moe": "Qwen2-MoE: its shared expert with a sigmoid gate is not mapped",
    "deepseek_v2": "DeepSeek-V2: multi-latent attention and shared experts are not mapped",
    "deepseek_v3": "DeepSeek-V3: multi-latent attention, shared experts and sigmoid routing are not mapped",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    """A model family or config feature that rpo cannot convert exactly (the message names both)."""


@dataclass(frozen=True)
class Rope:
    """One layer type's rotary embedding, as transformers computes it."""

    rope_type: str
    theta: float
    inv_freq: torch.Tensor = field(compare=False, repr=False)  # [head_dim / 2] float32
    attention_scaling: float = 1.0  # multiplies cos and sin (yarn's attention factor)


@dataclass(frozen=True)
class MoE:
    num_experts: int
    top_k: int
    ffn_hidden_size: int  # each expert's intermediate size
    normalize_top_k: bool  # top-k probabilities renormalised to sum 1 (Mixtral always; Qwen3-MoE norm_topk_prob)
    aux_loss_coeff: float  # router_aux_loss_coef: weight of transformers' load_balancing_loss_func


@dataclass(frozen=True)
class Architecture:
    model_type: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int  # the dense MLP's intermediate size (unused by MoE layers)
    vocab_size: int
    tied_embeddings: bool
    norm_eps: float
    activation: str  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool = False
    qk_norm: bool = False
    zero_centered_norms: bool = False  # every RMSNorm applies (1 + w), w stored as is (Gemma)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add (Gemma 3)
    embedding_scale: float | None = None  # embeddings multiplied by this (Gemma: √hidden)
    query_scale: float | None = None  # softmax scale before RoPE factors; None = head_dim^-½
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None  # HF semantics: a query sees itself and the W−1 tokens before it
    rope: dict[str, Rope] = field(default_factory=dict, compare=False)  # per layer type
    moe: MoE | None = None
    attention_dropout: float = 0.0

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(self.layer_window(i) for i in range(self.num_layers))

    @property
    def uniform_window(self) -> bool:
        """True when every layer has the same window (or none): one attention mask serves them all."""
        return len(set(self.windows)) == 1

    def layer_rope(self, layer: int) -> Rope:
        return self.rope[self.layer_types[layer]]

    @property
    def uniform_rope(self) -> bool:
        ropes = {(r.rope_type, r.theta, r.attention_scaling, tuple(r.inv_freq.tolist()))
                 for r in (self.layer_rope(i) for i in range(self.num_layers))}
        return len(ropes) == 1

    def softmax_scale(self, layer: int) -> float:
        """The scale of QKᵀ in `layer`: the query scale times the RoPE attention factor squared (it multiplies
        both the rotated query and key)."""
        base = self.query_scale if self.query_scale is not None else self.head_dim ** -0.5
        return base * self.layer_rope(layer).attention_scaling ** 2

    @property
    def needs_local_spec(self) -> bool:
        """Features built from rpo's own megatron modules (rpo.models.layers), which exist for the local spec."""
        return bool(self.zero_centered_norms or self.post_norms or self.embedding_scale or self.moe
                    or not self.uniform_window or not self.uniform_rope)


def _get(hf_config: Any, key: str, default: Any = None) -> Any:
    return getattr(hf_config, key, default)


def _refuse(family: str, feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{family}: {feature}")


def check_model_type(hf_config: Any) -> str:
    """The family name of a supported config; refuses others with what is missing."""
    model_type = _get(hf_config, "model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in REFUSED_FAMILIES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported: {REFUSED_FAMILIES[model_type]}")
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")


def architecture(hf_config: Any) -> Architecture:
    """Everything rpo builds from `hf_config`, checked; UnsupportedModelError names what cannot be exact."""
    family = check_model_type(hf_config)
    model_type = hf_config.model_type
    heads = int(hf_config.num_attention_heads)
    head_dim = int(_get(hf_config, "head_dim") or hf_config.hidden_size // heads)
    gemma = model_type == "gemma3_text"

    act_key = "hidden_activation" if gemma else "hidden_act"
    act = _get(hf_config, act_key, "silu")
    expected_act = "gelu_pytorch_tanh" if gemma else "silu"
    if act != expected_act:
        raise _refuse(family, f"{act_key}={act!r} is not supported (the gated MLP is mapped for "
                              f"{expected_act!r} only)")
    if model_type == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if _get(hf_config, flag, False):
                raise _refuse(family, f"config.{flag}=True is not supported (LLaMA projections are mapped "
                                      f"without bias)")
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text") and _get(hf_config, "attention_bias", False):
        raise _refuse(family, "config.attention_bias=True is not supported (a bias on o_proj is not mapped)")
    if gemma:
        for key, why in (("attn_logit_softcapping", "megatron-core's local attention has no logit soft-capping"),
                         ("final_logit_softcapping", "rpo's chunked vocab-parallel log-probs apply no "
                                                     "soft-capping"),
                         ("use_bidirectional_attention", "rpo scores causal language models")):
            if _get(hf_config, key):
                raise _refuse(family, f"{key}={_get(hf_config, key)!r} is not supported ({why})")

    layer_types, window = _layer_types_and_window(hf_config, family)
    rope = {kind: _rope(hf_config, family, kind if _per_layer_rope(hf_config) else None, head_dim)
            for kind in sorted(set(layer_types))}
    moe = _moe(hf_config, family) if model_type in MOE_MODEL_TYPES else None
    return Architecture(
        model_type=model_type, family=family, num_layers=int(hf_config.num_hidden_layers),
        hidden_size=int(hf_config.hidden_size), num_heads=heads,
        num_kv_heads=int(_get(hf_config, "num_key_value_heads") or heads), head_dim=head_dim,
        ffn_hidden_size=int(hf_config.intermediate_size), vocab_size=int(hf_config.vocab_size),
        tied_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        norm_eps=float(hf_config.rms_norm_eps), activation="gelu_tanh" if gemma else "silu",
        qkv_bias=model_type == "qwen2", qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        zero_centered_norms=gemma, post_norms=gemma,
        embedding_scale=float(hf_config.hidden_size) ** 0.5 if gemma else None,
        query_scale=float(hf_config.query_pre_attn_scalar) ** -0.5 if gemma else None,
        layer_types=tuple(layer_types), sliding_window=window, rope=rope, moe=moe,
        attention_dropout=float(_get(hf_config, "attention_dropout", 0.0) or 0.0),
    )


def _layer_types_and_window(hf_config: Any, family: str) -> tuple[list[str], int | None]:
    layers = int(hf_config.num_hidden_layers)
    window = _get(hf_config, "sliding_window")
    if _get(hf_config, "use_sliding_window", True) is False:
        window = None
    declared = _get(hf_config, "layer_types")
    if declared:
        unknown = sorted(set(declared) - set(LAYER_TYPES))
        if unknown:
            raise _refuse(family, f"layer_types {unknown} are not supported (supported: {LAYER_TYPES})")
        if len(declared) != layers:
            raise _refuse(family, f"layer_types has {len(declared)} entries for {layers} layers")
        types = list(declared)
    else:  # one window (or none) for every layer, as in Mistral
        types = ["sliding_attention" if window is not None else "full_attention"] * layers
    if "sliding_attention" in types:
        if window is None or int(window) < 1:
            raise _refuse(family, f"sliding-attention layers need sliding_window ≥ 1, got {window}")
        return types, int(window)
    return types, None


def _per_layer_rope(hf_config: Any) -> bool:
    params = _get(hf_config, "rope_parameters")
    return isinstance(params, dict) and set(LAYER_TYPES) & set(params) != set()


def _rope(hf_config: Any, family: str, layer_type: str | None, head_dim: int) -> Rope:
    """transformers' inverse frequencies and attention factor for one layer type (None: the model's only one)."""
    params = _get(hf_config, "rope_parameters")
    if params is None:  # transformers < 5: rope_theta and rope_scaling
        params = {"rope_theta": _get(hf_config, "rope_theta", 10000.0), **(_get(hf_config, "rope_scaling") or {})}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    where = f" ({layer_type} layers)" if layer_type else ""
    if rope_type not in ROPE_TYPES:
        why = {"dynamic": "its frequencies change with each batch's length",
               "longrope": "its frequencies change with each batch's length"}.get(rope_type, "not mapped")
        raise _refuse(family, f"rope type {rope_type!r}{where} is not supported ({why}; supported: {ROPE_TYPES})")
    partial = float(params.get("partial_rotary_factor", _get(hf_config, "partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise _refuse(family, f"partial_rotary_factor={partial} is not supported (RoPE on the whole head only)")
    theta = float(params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0)))
    if rope_type == "default":
        # transformers' default formula, written the same way so that the float32 values are identical.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kwargs = {"layer_type": layer_type} if layer_type is not None else {}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, **kwargs)
    inv_freq = inv_freq.detach().to("cpu", torch.float32).contiguous()
    if inv_freq.shape != (head_dim // 2,):
        raise _refuse(family, f"rope type {rope_type!r}{where} gives {tuple(inv_freq.shape)} frequencies for "
                              f"head_dim {head_dim}")
    return Rope(rope_type=rope_type, theta=theta, inv_freq=inv_freq, attention_scaling=float(scaling))


def _moe(hf_config: Any, family: str) -> MoE:
    if hf_config.model_type == "mixtral":
        jitter = float(_get(hf_config, "router_jitter_noise", 0.0) or 0.0)
        if jitter > 0:
            raise _refuse(family, f"router_jitter_noise={jitter} is not supported (random multiplicative "
                                  f"noise on the router input)")
        return MoE(num_experts=int(hf_config.num_local_experts), top_k=int(hf_config.num_experts_per_tok),
                   ffn_hidden_size=int(hf_config.intermediate_size), normalize_top_k=True,
                   aux_loss_coeff=float(_get(hf_config, "router_aux_loss_coef", 0.0) or 0.0))
    dense_layers = list(_get(hf_config, "mlp_only_layers", None) or [])
    if dense_layers:
        raise _refuse(family, f"mlp_only_layers={dense_layers} is not supported (every layer must be MoE)")
    step = int(_get(hf_config, "decoder_sparse_step", 1) or 1)
    if step != 1:
        raise _refuse(family, f"decoder_sparse_step={step} is not supported (every layer must be MoE)")
    return MoE(num_experts=int(hf_config.num_experts), top_k=int(hf_config.num_experts_per_tok),
               ffn_hidden_size=int(hf_config.moe_intermediate_size),
               normalize_top_k=bool(_get(hf_config, "norm_topk_prob", False)),
               aux_loss_coeff=float(_get(hf_config, "router_aux_loss_coef", 0.0) or 0.0))


def describe(arch: Architecture) -> str:
    """One line: the family and the options in use (for logs)."""
    parts = [arch.family, f"{arch.num_layers} layers", f"h{arch.hidden_size}", f"heads {arch.num_heads}/"
             f"{arch.num_kv_heads}", f"head_dim {arch.head_dim}"]
    if arch.moe:
        parts.append(f"{arch.moe.num_experts} experts top-{arch.moe.top_k}")
    ropes = sorted({f"{r.rope_type} θ={r.theta:g}" for r in arch.rope.values()})
    parts.append("RoPE " + ", ".join(ropes))
    if arch.sliding_window:
        sliding = sum(t == "sliding_attention" for t in arch.layer_types)
        parts.append(f"window {arch.sliding_window} on {sliding}/{arch.num_layers} layers")
    return "; ".join(parts)


__all__ = ["Architecture", "FAMILIES", "MOE_MODEL_TYPES", "MoE", "ROPE_TYPES", "Rope", "SUPPORTED_MODEL_TYPES",
           "UnsupportedModelError", "architecture", "check_model_type", "describe"]

