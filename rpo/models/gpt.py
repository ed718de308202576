"""A megatron-core GPTModel built from a Hugging Face LLaMA-family or Mistral config.

Covered: grouped-query attention, RoPE with the config's θ (and LLaMA-3.1 "llama3" scaling), RMSNorm with the
config's ε, SwiGLU, tied or untied embeddings, Mistral's sliding window. The local layer spec (megatron-core's
local layer with rpo.models.local_layers' norm, SwiGLU and attention) is used unless Transformer Engine is
importable. The vocabulary is padded to a multiple of
`vocab_divisible_by · TP` (megatron's convention); rpo.models.logprobs masks the padding out of log-probs.

Sliding window: megatron-core's local attention (DotProductAttention) applies `config.window_size` by replacing
whatever mask it is given with a window mask built on CUDA, dropping padding. With the local spec the window is
therefore not put in the TransformerConfig; `attention_mask_for` builds one explicit mask (causal ∧ window ∧
key-is-not-padding) that every forward passes. With Transformer Engine the window goes in the config
(`window_size=(W-1, 0)`: HF's window W counts the query itself) and TE's fused causal attention is used, which
requires right-padded batches.
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclasses.dataclass(frozen=True)
class GPTModelInfo:
    """What rpo needs to know about a built model beyond megatron's TransformerConfig."""

    vocab_size: int  # the tokenizer's / HF config's vocabulary
    padded_vocab_size: int  # rows of the (TP-sharded) embedding and output layer, summed over TP ranks
    sliding_window: int | None  # HF semantics: a query sees itself and the W-1 tokens before it
    uses_te: bool
    tp_size: int
    dtype: torch.dtype
    hf_config: Any
    vocab_divisible_by: int
    recompute: str = "none"  # activation recomputation in training mode, see recompute_settings
    sequence_parallel: bool = False  # megatron sequence parallelism over the TP group, see build_gpt_model


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Smallest multiple of divisible_by·tp_size that holds vocab_size (megatron's _vocab_size_with_padding)."""
    if vocab_size < 1 or tp_size < 1 or divisible_by < 1:
        raise ValueError(f"vocab_size, tp_size and divisible_by must be positive, got "
                         f"{vocab_size}, {tp_size}, {divisible_by}")
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def te_available() -> bool:
    try:
        from megatron.core.models.gpt import gpt_layer_specs
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        return False
    return bool(getattr(gpt_layer_specs, "HAVE_TE", False))


def rope_settings(hf_config) -> dict:
    """RoPE θ and scaling from an HF config (transformers ≥ 5 `rope_parameters`, older `rope_theta`/`rope_scaling`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy_scaling = getattr(hf_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        theta = 10000.0
    scaling = {**legacy_scaling, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type == "default":
        return {"rotary_base": float(theta), "rope_scaling": False, "rope_scaling_factor": 8.0}
    if rope_type == "llama3":
        # megatron-core's LLaMA-3.x scaling hard-codes these three; other values would silently differ.
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in fixed.items():
            if float(scaling.get(key, value)) != float(value):
                raise ValueError(f"rope scaling 'llama3' with {key}={scaling.get(key)} is not supported by "
                                 f"megatron-core (it fixes {key}={value})")
        return {"rotary_base": float(theta), "rope_scaling": True,
                "rope_scaling_factor": float(scaling.get("factor", 8.0))}
    raise ValueError(f"rope type {rope_type!r} is not supported (supported: 'default', 'llama3')")


def _check_hf_config(hf_config) -> None:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (LLaMA/Mistral use 'silu' for SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise ValueError(f"config.{flag}=True is not supported (LLaMA/Mistral projections have no bias)")


def hf_sliding_window(hf_config) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    if window is None or getattr(hf_config, "use_sliding_window", True) is False:
        return None
    if int(window) < 1:
        raise ValueError(f"config.sliding_window must be ≥ 1, got {window}")
    return int(window)


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def recompute_settings(recompute: str) -> dict:
    """megatron-core's own activation-recomputation fields of TransformerConfig for `recompute`.

    none: every layer's activations are kept for backward. selective: the core attention (QKᵀ, softmax, ·V:
    the activations that grow with T²) of every layer is recomputed in backward. full: only each layer's input is
    kept and the whole layer is recomputed ("uniform" method, one layer per recomputed unit). Megatron applies
    both in training mode only (model.train()); eval-mode forwards keep nothing anyway.
    """
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise ValueError(f"recompute {recompute!r} is not one of {RECOMPUTE_MODES}")


def transformer_config_from_hf(hf_config, tp_size: int, dtype: torch.dtype = torch.float32,
                               use_te: bool = False, initialize: bool = True, recompute: str = "none",
                               sequence_parallel: bool = False):
    """megatron-core TransformerConfig equivalent to an HF LLaMA/Mistral config (+ activation recomputation,
    sequence parallelism)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    _check_hf_config(hf_config)
    if sequence_parallel and tp_size < 2:
        raise ValueError(f"sequence parallelism splits the sequence over the tensor-parallel group: it needs "
                         f"tp_size > 1, got {tp_size}")
    recompute_fields = recompute_settings(recompute)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp_size or groups % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} must divide num_attention_heads={heads} and "
                         f"num_key_value_heads={groups}")
    if hf_config.intermediate_size % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} must divide intermediate_size="
                         f"{hf_config.intermediate_size}")
    window = hf_sliding_window(hf_config)
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        # megatron's default ε is 1e-5, HF LLaMA's 1e-6: taking it from the config matters (~5e-3 in log-probs).
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        rotary_interleaved=False,  # HF's rotate-half RoPE
        window_size=(window - 1, 0) if (window and use_te) else None,
        tensor_model_parallel_size=tp_size,
        sequence_parallel=sequence_parallel,
        # The empty list is megatron's "whole layer" scope; its default "full" only warns that it is deprecated.
        cuda_graph_scope=[],
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=not cuda,
        perform_initialization=initialize,
        # Fused kernels need CUDA extensions (apex / TE); the unfused paths are exact and run everywhere.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **recompute_fields,
    )


def build_gpt_model(hf_config, tp_size: int | None = None, dtype: torch.dtype = torch.float32,
                    vocab_divisible_by: int = 128, use_te: bool | None = None, initialize: bool = True,
                    recompute: str = "none", sequence_parallel: bool = False):
    """Build this rank's shard of a GPTModel for `hf_config` (parallel state must be initialised).

    `initialize=False` skips megatron's random init (weights are about to be loaded). `use_te=None` picks
    Transformer Engine's layer spec when it is importable, else the local spec. `recompute`: activation
    recomputation, one of RECOMPUTE_MODES (see recompute_settings). `sequence_parallel`: megatron's sequence
    parallelism (needs TP > 1): the norms and residual stream of each layer hold T/TP positions per rank (the local
    spec's norms, rpo.models.local_layers.RMSNorm, mark their weights for megatron's TP gradient sum). Every rpo
    forward (forward_hidden_states,
    hidden_states_with_mask, full_logits) pads T to a multiple of TP and returns all T positions.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialised: call rpo.models.init_parallel(tp_size)")
    current_tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size is None:
        tp_size = current_tp
    if tp_size != current_tp:
        raise ValueError(f"tp_size={tp_size} but megatron's parallel state has TP={current_tp}")
    if use_te is None:
        use_te = te_available()
    elif use_te and not te_available():
        raise ValueError("use_te=True but Transformer Engine is not importable")
    # Transformer Engine layers are always initialised: skipping init is only verified for the local layers
    # (see _mark_tensor_parallel).
    config = transformer_config_from_hf(hf_config, tp_size, dtype, use_te=use_te,
                                        initialize=initialize or use_te, recompute=recompute,
                                        sequence_parallel=sequence_parallel)
    if use_te:
        layer_spec = get_gpt_layer_with_transformer_engine_spec()  # TE's norms support sequence parallelism
    else:
        from rpo.models.local_layers import local_layer_spec

        # megatron's local layer with rpo's RMSNorm, SwiGLU and SDPA attention (less kept, same values)
        layer_spec = local_layer_spec(config.num_layers, sequence_parallel)
    vocab = int(hf_config.vocab_size)
    padded = padded_vocab_size(vocab, tp_size, vocab_divisible_by)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded,
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        **rope_settings(hf_config),
    )
    if not use_te:
        from rpo.models.local_layers import finish_local_model

        finish_local_model(model)
    _mark_tensor_parallel(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.rpo_info = GPTModelInfo(
        vocab_size=vocab, padded_vocab_size=padded, sliding_window=hf_sliding_window(hf_config),
        uses_te=use_te, tp_size=tp_size, dtype=dtype, hf_config=hf_config, vocab_divisible_by=vocab_divisible_by,
        recompute=recompute, sequence_parallel=sequence_parallel,
    )
    return model


def _mark_tensor_parallel(model) -> None:
    """Tag TP-sharded weights with megatron's tensor_model_parallel attributes where init did not.

    megatron-core sets these attributes inside its weight initialisers, so with perform_initialization=False
    (weights about to be loaded) they are missing; the grad-norm (clipping) then counts a TP-sharded weight
    on TP rank 0 only, as if it were replicated. Measured with 0.16.1: TP=2 grad norm 7.0 instead of 9.15.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not getattr(weight, "tensor_model_parallel", False):
            # The attributes megatron's set_tensor_model_parallel_attributes writes (it asserts they are unset).
            weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, dim, 1


def unwrap(model):
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    from megatron.core.models.gpt import GPTModel

    inner = model
    while not isinstance(inner, GPTModel):
        if not hasattr(inner, "module"):
            raise TypeError(f"{type(model).__name__} does not wrap a megatron GPTModel")
        inner = inner.module
    return inner


def model_info(model) -> GPTModelInfo:
    info = getattr(unwrap(model), "rpo_info", None)
    if info is None:
        raise ValueError("this GPTModel was not built by rpo.models.build_gpt_model (no rpo_info)")
    return info


def attention_mask_for(attention_mask: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """megatron's boolean attention mask [R, 1, T, T] (True = masked out) from an HF-style [R, T] 0/1 mask.

    Query t may attend key k iff k ≤ t, k > t − W (sliding window W, if any) and key k is not padding.
    """
    rows, length = attention_mask.shape
    positions = torch.arange(length, device=attention_mask.device)
    allowed = positions[None, :] <= positions[:, None]
    if sliding_window is not None:
        allowed = allowed & (positions[None, :] > positions[:, None] - sliding_window)
    allowed = allowed[None, :, :] & attention_mask.bool()[:, None, :]
    return ~allowed[:, None, :, :]


def is_right_padded(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row: True when the mask is ones then zeros."""
    mask = attention_mask.bool()
    # A right-padded row never has a 1 after a 0: the running minimum equals the mask itself.
    return (torch.cummin(mask.int(), dim=1).values.bool() == mask).all(dim=1)


@contextmanager
def _hidden_states_only(gpt):
    # GPTModel._postprocess returns the decoder's hidden states (final norm applied) before the output layer
    # when post_process is False; the flag is read only there in forward, so toggling it for one call is safe.
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def forward_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [T, R, hidden] (megatron's sequence-first layout) of right- or arbitrarily padded rows.

    `model` may be wrapped (megatron DDP, Float16Module). Positions are 0..T−1 for every row, as in HF's forward
    without position_ids.
    """
    gpt = unwrap(model)
    info = model_info(gpt)
    rows, length = input_ids.shape
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(rows, length)
    if info.uses_te:
        bad = (~is_right_padded(attention_mask)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"Transformer Engine attention needs right-padded rows; rows {bad[:10]} are not")
        mask = None  # TE's causal (and sliding-window) attention builds its own mask
    else:
        mask = attention_mask_for(attention_mask, info.sliding_window)
    return hidden_states_with_mask(model, input_ids, position_ids, mask)


def hidden_states_with_mask(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """Final hidden states [T, R, hidden] for an explicit megatron attention mask [R, 1, T, T] (True = masked).

    The mask replaces the causal one, so it must contain it (rpo.models.packing builds block-diagonal ones).
    With sequence parallelism every TP rank still gets all T positions (see `_sequence_parallel_inputs`); pass
    them to the output layer inside `output_layer_on_gathered_states`.
    """
    gpt = unwrap(model)
    length = input_ids.shape[1]
    input_ids, position_ids, mask = _sequence_parallel_inputs(gpt, input_ids, position_ids, mask)
    with _hidden_states_only(gpt):
        hidden = model(input_ids, position_ids, mask)
    if not gpt.config.sequence_parallel:
        return hidden
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    # The decoder's output is this rank's T'/TP positions. Gathered, the states are replicated over TP as without
    # sequence parallelism, and so is their gradient: the output layer's input copy all-reduces it in backward
    # (output_layer_on_gathered_states), so the gather's backward only keeps this rank's part
    # (tensor_parallel_output_grad=False) instead of summing again.
    hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return hidden[:length]


def _sequence_parallel_inputs(gpt, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None):
    """With sequence parallelism, (input_ids, position_ids, mask) right-padded to T' = a multiple of TP (megatron
    splits the sequence into TP equal parts). The extra positions come after every real one and are masked as
    keys, so no real position sees them; their own outputs are dropped by the callers. Unchanged without
    sequence parallelism."""
    if not gpt.config.sequence_parallel:
        return input_ids, position_ids, mask
    tp = gpt.config.tensor_model_parallel_size
    length = input_ids.shape[1]
    extra = -length % tp
    if not extra:
        return input_ids, position_ids, mask
    input_ids = F.pad(input_ids, (0, extra), value=0)
    after = torch.arange(length, length + extra, device=position_ids.device, dtype=position_ids.dtype)
    position_ids = torch.cat([position_ids, after.expand(position_ids.shape[0], extra)], dim=1)
    if mask is not None:
        mask = F.pad(mask, (0, extra, 0, extra), value=True)
    return input_ids, position_ids, mask


@contextmanager
def output_layer_on_gathered_states(output_layer):
    """The output layer applied to hidden states already gathered along the sequence (hidden_states_with_mask).

    With sequence parallelism megatron's ColumnParallelLinear all-gathers its input along the sequence itself;
    on gathered states it must not. GPTModel does the same for dynamic inference: gather_from_sequence_parallel_
    region, then `output_layer.sequence_parallel = False` for the call (models/gpt/gpt_model.py, megatron-core
    0.16.1). The layer then copies its input to the TP region, whose backward all-reduces the input's gradient,
    as without sequence parallelism. A no-op for a model without sequence parallelism.
    """
    saved = output_layer.sequence_parallel
    output_layer.sequence_parallel = False
    try:
        yield output_layer
    finally:
        output_layer.sequence_parallel = saved


def output_weight(model) -> torch.Tensor | None:
    """The weight to pass to output_layer: the shared embedding when embeddings are tied, else None."""
    gpt = unwrap(model)
    return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None


def full_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """This rank's vocabulary shard of the logits [R, T, padded_vocab/TP] via GPTModel's own forward."""
    gpt = unwrap(model)
    info = model_info(gpt)
    rows, length = input_ids.shape
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(rows, length)
    mask = None if info.uses_te else attention_mask_for(attention_mask, info.sliding_window)
    # With sequence parallelism GPTModel's output layer gathers the sequence itself: only T is padded here.
    return model(*_sequence_parallel_inputs(gpt, input_ids, position_ids, mask))[:, :length]
