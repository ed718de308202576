"""A megatron-core GPTModel built from a Hugging Face config: LLaMA, Mistral, Qwen2/2.5, Qwen3, Gemma 3 (text),
Mixtral and Qwen3-MoE (rpo.models.architectures lists what each family needs and what is refused).

The local layer spec is megatron-core's local layer with rpo's lean modules (rpo.models.local_layers: RMSNorm,
SwiGLU and SDPA attention that keep less for backward, same values) and, where a family needs what megatron-core
does not have, rpo.models.layers'; Transformer Engine's spec is used when it is importable and the family needs
none of rpo's modules (LLaMA, Mistral, Qwen2, Qwen3). RoPE frequencies are transformers' own (set on megatron's
rotary embedding after it is built). The vocabulary is padded to a multiple of `vocab_divisible_by · TP`
(megatron's convention); rpo.models.logprobs masks the padding out of log-probs. Mixture-of-experts layers are
megatron-core's MoELayer (TopKRouter, SequentialMLP experts, the all-to-all token dispatcher) with expert
parallelism over the data-parallel ranks (megatron's expert-model-parallel group); the router's load-balancing
loss is transformers' (rpo.models.moe).

Sliding window: megatron-core's local attention (DotProductAttention) applies `config.window_size` by replacing
whatever mask it is given with a window mask built on CUDA, dropping padding. With the local spec the window is
therefore not put in the TransformerConfig; `attention_mask_for` builds one explicit mask (causal ∧ window ∧
key-is-not-padding) that every forward passes. When layers differ (Gemma 3's interleaved sliding and global
layers, Qwen2's `max_window_layers`), the shared mask has no window and each sliding layer's attention adds its
own (rpo.models.layers.WindowedDotProductAttention). With Transformer Engine the window goes in the config
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

from rpo.models import architectures

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = architectures.SUPPORTED_MODEL_TYPES
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
    expert_parallel: int = 1  # experts sharded over this many data-parallel ranks (MoE models)
    architecture: Any = None  # rpo.models.architectures.Architecture


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
                               sequence_parallel: bool = False, expert_parallel: int = 1):
    """megatron-core TransformerConfig equivalent to an HF config of a supported family (+ activation
    recomputation, sequence and expert parallelism). Raises UnsupportedModelError / ValueError naming the
    family, feature or option that cannot be built."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from rpo.models import layers

    arch = architectures.architecture(hf_config)
    if sequence_parallel and tp_size < 2:
        raise ValueError(f"sequence parallelism splits the sequence over the tensor-parallel group: it needs "
                         f"tp_size > 1, got {tp_size}")
    recompute_fields = recompute_settings(recompute)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    heads, groups = arch.num_heads, arch.num_kv_heads
    if heads % tp_size or groups % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} must divide num_attention_heads={heads} and "
                         f"num_key_value_heads={groups}")
    ffn_key, ffn = ("moe_intermediate_size" if arch.model_type == "qwen3_moe" else "intermediate_size",
                    arch.moe.ffn_hidden_size) if arch.moe else ("intermediate_size", arch.ffn_hidden_size)
    if ffn % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} must divide {ffn_key}={ffn}")
    if use_te and arch.needs_local_spec:
        raise ValueError(f"{arch.family}: this config needs rpo's local-spec modules (rpo.models.layers); "
                         f"Transformer Engine's layer spec cannot build it (use_te=False)")
    if not isinstance(expert_parallel, int) or expert_parallel < 1:
        raise ValueError(f"expert_parallel must be a positive integer, got {expert_parallel!r}")
    if expert_parallel > 1 and arch.moe is None:
        raise ValueError(f"--expert-parallel {expert_parallel}: {arch.family} has no experts (a dense model)")
    moe_fields = {}
    if arch.moe is not None:
        if arch.moe.num_experts % expert_parallel:
            raise ValueError(f"--expert-parallel {expert_parallel} must divide the {arch.moe.num_experts} experts")
        moe_fields = dict(
            num_moe_experts=arch.moe.num_experts, moe_router_topk=arch.moe.top_k,
            moe_ffn_hidden_size=arch.moe.ffn_hidden_size,
            # Renormalised top-k (Mixtral; Qwen3-MoE norm_topk_prob): softmax over the k chosen logits equals
            # transformers' top-k of the softmax divided by its sum. Otherwise the top-k of the full softmax.
            moe_router_pre_softmax=not arch.moe.normalize_top_k, moe_router_score_function="softmax",
            # transformers' load-balancing loss is added by rpo.models.moe (megatron's differs: see there).
            moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            # all-to-all: the only dispatcher for ranks with different token counts (data-parallel ranks' batches).
            moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, moe_permute_fusion=False,
            expert_model_parallel_size=expert_parallel,
        )
    uniform_window = arch.sliding_window if arch.uniform_window else None
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        # megatron's default ε is 1e-5, HF LLaMA's 1e-6: taking it from the config matters (~5e-3 in log-probs).
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=layers.gelu_tanh if arch.activation == "gelu_tanh" else F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        # One scale for every layer (None: megatron's head_dim^-½); per-layer scales go to each layer's attention.
        softmax_scale=layers.uniform_softmax_scale(arch),
        hidden_dropout=0.0,
        attention_dropout=arch.attention_dropout,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        rotary_interleaved=False,  # HF's rotate-half RoPE
        window_size=(uniform_window - 1, 0) if (uniform_window and use_te) else None,
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
        **moe_fields,
        **recompute_fields,
    )


def build_gpt_model(hf_config, tp_size: int | None = None, dtype: torch.dtype = torch.float32,
                    vocab_divisible_by: int = 128, use_te: bool | None = None, initialize: bool = True,
                    recompute: str = "none", sequence_parallel: bool = False,
                    moe_aux_loss_coeff: float | None = None):
    """Build this rank's shard of a GPTModel for `hf_config` (parallel state must be initialised).

    `initialize=False` skips megatron's random init (weights are about to be loaded). `use_te=None` picks
    Transformer Engine's layer spec when it is importable and the family needs no rpo module, else the local
    spec. `recompute`: activation recomputation, one of RECOMPUTE_MODES (see recompute_settings).
    `sequence_parallel`: megatron's sequence parallelism (needs TP > 1): the norms and residual stream of each
    layer hold T/TP positions per rank; with the local spec its norms (rpo.models.local_layers.RMSNorm, or Gemma's) mark their weights for
    megatron's TP gradient sum. Every
    rpo forward (forward_hidden_states, hidden_states_with_mask, full_logits) pads T to a multiple of TP and
    returns all T positions. Expert parallelism is megatron's parallel state's (rpo.models.init_parallel).
    `moe_aux_loss_coeff`: the load-balancing loss's weight (None: the config's router_aux_loss_coef).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from rpo.models import layers

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialised: call rpo.models.init_parallel(tp_size)")
    current_tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size is None:
        tp_size = current_tp
    if tp_size != current_tp:
        raise ValueError(f"tp_size={tp_size} but megatron's parallel state has TP={current_tp}")
    expert_parallel = parallel_state.get_expert_model_parallel_world_size()
    arch = architectures.architecture(hf_config)
    if use_te is None:
        use_te = te_available() and not arch.needs_local_spec
    elif use_te and not te_available():
        raise ValueError("use_te=True but Transformer Engine is not importable")
    # Transformer Engine layers are always initialised: skipping init is only verified for the local layers
    # (see _mark_tensor_parallel).
    config = transformer_config_from_hf(hf_config, tp_size, dtype, use_te=use_te,
                                        initialize=initialize or use_te, recompute=recompute,
                                        sequence_parallel=sequence_parallel, expert_parallel=expert_parallel)
    num_experts = arch.moe.num_experts if arch.moe else None
    if use_te:  # TE's norms support sequence parallelism
        layer_spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                                qk_layernorm=arch.qk_norm)
    else:
        layer_spec = layers.local_block_spec(arch, config, get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm, normalization="RMSNorm"))
    vocab = arch.vocab_size
    padded = padded_vocab_size(vocab, tp_size, vocab_divisible_by)
    model_rope = arch.rope[layers.model_rope_type(arch)]
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded,
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tied_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model_rope.theta,
    )
    # transformers' own inverse frequencies (default, linear, llama3, yarn alike), before any forward caches them.
    model.rotary_pos_emb.inv_freq = model_rope.inv_freq.clone()
    if arch.embedding_scale is not None:
        model.embedding.register_forward_hook(_scale_embeddings(arch.embedding_scale))
    if not use_te:
        from rpo.models.local_layers import finish_local_model

        finish_local_model(model)
    _mark_tensor_parallel(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if arch.moe is not None:
        from rpo.models import moe

        coeff = arch.moe.aux_loss_coeff if moe_aux_loss_coeff is None else float(moe_aux_loss_coeff)
        moe.attach_load_balancing(model, arch.moe.num_experts, arch.moe.top_k, coeff)
    model.rpo_info = GPTModelInfo(
        vocab_size=vocab, padded_vocab_size=padded, sliding_window=arch.sliding_window if arch.uniform_window
        else None, uses_te=use_te, tp_size=tp_size, dtype=dtype, hf_config=hf_config,
        vocab_divisible_by=vocab_divisible_by, recompute=recompute, sequence_parallel=sequence_parallel,
        expert_parallel=expert_parallel, architecture=arch,
    )
    return model


def _scale_embeddings(scale: float):
    """A forward hook multiplying the embedding output by `scale` rounded to its dtype, as transformers' Gemma
    embedding does (`embed_scale.to(weight.dtype)`)."""

    def hook(module, inputs, output):
        return output * torch.tensor(scale).to(device=output.device, dtype=output.dtype)

    return hook


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
    return hidden_states_with_mask(model, input_ids, position_ids, mask, token_mask=attention_mask.bool())


def hidden_states_with_mask(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                            mask: torch.Tensor | None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [T, R, hidden] for an explicit megatron attention mask [R, 1, T, T] (True = masked).

    The mask replaces the causal one, so it must contain it (rpo.models.packing builds block-diagonal ones).
    `token_mask` [R, T] (True = a real token, default all) tells a mixture-of-experts model's load-balancing loss
    which positions are padding. With sequence parallelism every TP rank still gets all T positions (see
    `_sequence_parallel_inputs`); pass them to the output layer inside `output_layer_on_gathered_states`.
    """
    gpt = unwrap(model)
    length = input_ids.shape[1]
    _begin_forward(gpt, token_mask)
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


def _begin_forward(gpt, token_mask: torch.Tensor | None) -> None:
    """A mixture-of-experts model's load-balancing loss starts over for this forward with the real tokens
    [R, T] of its rows, in megatron's [s, b] order (with sequence parallelism: this TP rank's shard of the
    sequence padded to a multiple of TP, as `_sequence_parallel_inputs` pads it); nothing for a dense model."""
    balance = getattr(gpt, "rpo_load_balancing", None)
    if balance is None:
        return
    if token_mask is None or not gpt.config.sequence_parallel:
        balance.begin(None if token_mask is None else token_mask.t())
        return
    from megatron.core import parallel_state

    tp = gpt.config.tensor_model_parallel_size
    padded = F.pad(token_mask.bool(), (0, -token_mask.shape[1] % tp), value=False).t()  # [T', R]
    balance.begin(padded.chunk(tp, dim=0)[parallel_state.get_tensor_model_parallel_rank()])


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
    _begin_forward(gpt, attention_mask.bool())
    # With sequence parallelism GPTModel's output layer gathers the sequence itself: only T is padded here.
    return model(*_sequence_parallel_inputs(gpt, input_ids, position_ids, mask))[:, :length]
