"""Per-GPU memory plan of a training run: pure arithmetic from an HF config and the run's options.

No model is built: `estimate_memory` counts the bytes of every component of one rank's peak during a training
step of rpo's trainer (megatron-core GPTModel, local layer spec unless `attention="flash"`, megatron DDP with fp32
gradient buffers, megatron's optimizer wrappers, rpo.models.logprobs' chunked log-probs). It models megatron-core
0.16's local layers as measured on CPU (benchmarks/memory_plan.py checks it against measured peaks).

Notation: L layers, h hidden, a attention heads, g KV heads (GQA), d head dim, f intermediate (SwiGLU), V the padded
vocabulary (rpo.models.gpt.padded_vocab_size), t tensor-parallel size, D data-parallel size, P micro-batch pairs,
b = 2P sequences in one forward (chosen and rejected rows together), s tokens per sequence (prompt + response),
n = b·(s − prompt) scored tokens, c = min(chunk, n) tokens per log-prob chunk, e bytes per element of the
parameter/compute dtype (2 bf16, 4 fp32), sp = t with sequence parallelism else 1.

Parameters on one GPU (TP shards everything except the RMSNorm weights):
    per layer  (h·(a+2g)·d + a·d·h + 3·h·f) / t + n·h       QKV, output projection, gate+up, down; n norms (2;
               Gemma 3: 4) (+ (a+2g)·d / t with Qwen2's q/k/v bias, + 2d with q/k norms)
    MoE layer  the attention part as above + E·h (the router, replicated) + (E/x)·3·h·f_e / t: E experts of
               intermediate size f_e, split over the x expert-parallel ranks and the t (expert-)TP ranks
    embedding  V·h / t;  output layer V·h / t unless tied;  final norm h
Active parameters (what one token goes through; MoE models) count k of the E experts.
Persistent bytes, N = parameters on this GPU:
    parameters      e·N
    gradients       4·N            megatron DDP with grad_reduce_in_fp32=True keeps one fp32 buffer (not sharded
                                   by the distributed optimizer: it reduce-scatters inside it)
    master weights  4·N / D'       bf16 only (fp32 runs step the parameters themselves); D' = D with the
                                   distributed optimizer, else 1
    optimizer       4·k·N / D'     k = 2 AdamW, 1 RMSprop (+1 with momentum), 0 SGD (1 with momentum)
    reference       e·N            a frozen copy, unless its log-probs are precomputed (or the loss needs none)

Activations kept from forward to backward, per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", redone for RMSNorm, SwiGLU, GQA, RoPE, no dropout, and for what the layers actually
save: "local" is rpo's local spec, rpo.models.local_layers; "flash" Transformer Engine's):
    norms           2·e·s·b·h / sp       each RMSNorm's input (local: 1/rms is recomputed in backward; TE also keeps
                                         the fp32 1/rms, + 2·4·s·b / sp)
    RoPE            4·e·s·d            cos and sin, saved for Q and for K
    linear inputs   2·e·s·b·h / sp     QKV and gate+up inputs (with sp: the sequence shard, re-gathered in backward)
    attention, SDPA (rpo's local spec) or flash (TE fused)
                    e·s·b·d·(2a + 2g) / t + 4·b·a·s / t     Q, K, V (unrepeated), output (also the output
                                                            projection's input), per-row log-sum-exp
    SwiGLU MLP      3·e·s·b·f / t      local: the fc1 output (gate and up) and the fc2 input; megatron's own
                                       activation (TE spec, Gemma 3's GeGLU): 5·e·s·b·f / t (+ silu(gate), up + 0,
                                       the gate's view)
    MoE MLP         8·s·b·E / sp + e·s·b·k·h + 6·e·s·b·k·f_e / t    the router's two fp32 softmaxes (routing and the
                                       load-balancing loss), each token's k expert copies (the experts' input) and
                                       the experts' gated MLPs over those s·b·k tokens (megatron's activation with
                                       the routing probabilities applied); assumes balanced routing
    q/k norms       (r + e)·s·b·(a+g)·d / t   the norm's input copy and its output (kept by RoPE), + 4·s·b·(a+g)/t
                                       for norms that keep the fp32 1/rms; selective recomputation: r instead of
                                       r + e, and for rpo's lean norm only the query's input, e·s·b·a·d / t (the
                                       key's is a view of the fused QKV output the checkpoint keeps)
    Gemma's norms   its four (1 + w) RMSNorms are rpo's modules of torch ops: r = 8 bytes per element (fp32 input
                    and x/rms) + the fp32 1/rms per token, on every device
With selective recomputation (megatron's core_attn) the local attention keeps only the core attention's inputs
and output: e·s·b·d·(a + g + a+2g + a) / t (Q and K after RoPE, V's view keeping the fused QKV output, context) —
or e·s·b·d·(2a+2g)/t for flash. With full recomputation (uniform, one layer per checkpoint) a layer keeps its
input, e·s·b·h / sp. Besides the layers: the final norm, the response hidden states (e·n·h, the chunked log-probs'
checkpoint input) and, with local attention, one mask for all layers: SDPA's additive one (e·b·s²) or, under
recomputation, the boolean one the checkpoints keep (b·s²).

Working sets on top of the activations (the largest counts; `working` is it minus the log-prob chunk):
    log-prob chunk      c·(V/t)·(e + 4·[e≠4])  logits and their fp32 copy (padding masked, softmax and gradient
                        computed in place: rpo.models.logprobs)
    forward tail        e·s·b·h + chunk (+ e·n·h with a reference model, whose forward runs after the policy's)
    output backward     chunk + e·(V/t)·h     the output layer's weight gradient before DDP adds it to main_grad
    layer backward      the recomputed part of one layer (none: 0; selective: the core attention; full: the whole
                        layer) + that layer's activation gradients (MLP: 3·e·s·b·f/t; SDPA and flash attention
                        work in blocks)
    optimizer step      (no activations then) one fp32 copy of the optimizer's parameters (the foreach
                        RMSprop/AdamW sqrt, torch's default on CUDA) or of the largest one (the per-tensor loop,
                        torch's default on CPU or with foreach=False; AdamW: two)
Peak = persistent + overhead + max(activations + log-prob chunk + working, optimizer step).
Not modelled: pipeline and context parallelism (the trainer runs TP × DP (× EP) only), packing, fragmentation,
imbalanced expert routing (a rank's experts may receive more than s·b·k/x tokens' share).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from rpo.models.gpt import SUPPORTED_MODEL_TYPES, padded_vocab_size
from rpo.models.logprobs import DEFAULT_CHUNK_SIZE

GIB = 2**30
RECOMPUTE_MODES = ("none", "selective", "full")
REFERENCE_MODES = ("kept", "precomputed", "none")
OPTIMIZERS = ("rmsprop", "adamw", "sgd")
ATTENTION_BACKENDS = ("local", "flash")
DEVICES = ("cuda", "cpu")
DEFAULT_CUDA_OVERHEAD_BYTES = GIB  # CUDA context, cuBLAS/NCCL workspaces
_DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an HF config (any family of rpo.models.architectures) that decide memory."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3, Gemma 3
    norms_per_layer: int = 2  # Gemma 3: 4 (post-attention and post-feedforward norms)
    composite_norms: bool = False  # Gemma's (1 + w) RMSNorm is rpo's own module of torch ops, never fused
    activation: str = "silu"  # the gated MLP's: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    num_experts: int = 0  # mixture of experts: every layer's MLP is E experts of expert_intermediate_size
    experts_per_token: int = 0
    expert_intermediate_size: int = 0

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelShape":
        """From a config.json dict or a transformers config object (refused families raise, naming the feature)."""
        from rpo.models.architectures import architecture

        if isinstance(hf_config, Mapping):
            values = dict(hf_config)
            model_type = values.pop("model_type", None)
            if model_type not in SUPPORTED_MODEL_TYPES:
                from rpo.models.architectures import check_model_type

                check_model_type(type("Config", (), {"model_type": model_type})())  # raises, naming the family
            missing = [key for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                       "intermediate_size", "vocab_size") if values.get(key) is None]
            if missing:
                raise ValueError(f"the model config has no {missing}")
            from transformers import AutoConfig

            hf_config = AutoConfig.for_model(model_type, **values)
        arch = architecture(hf_config)
        moe = arch.moe
        return cls(model_type=arch.model_type, num_layers=arch.num_layers, hidden_size=arch.hidden_size,
                   num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                   intermediate_size=arch.ffn_hidden_size, vocab_size=arch.vocab_size,
                   tie_word_embeddings=arch.tied_embeddings, qkv_bias=arch.qkv_bias, qk_norm=arch.qk_norm,
                   norms_per_layer=4 if arch.post_norms else 2, composite_norms=arch.zero_centered_norms,
                   activation=arch.activation,
                   num_experts=moe.num_experts if moe else 0, experts_per_token=moe.top_k if moe else 0,
                   expert_intermediate_size=moe.ffn_hidden_size if moe else 0)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def _attention_parameters(self, tp: int) -> int:
        h, d, a, g = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        sharded = h * (a + 2 * g) * d + a * d * h + ((a + 2 * g) * d if self.qkv_bias else 0)
        return sharded // tp + self.norms_per_layer * h + (2 * d if self.qk_norm else 0)

    def expert_parameters(self) -> int:
        """One expert's parameters (gate, up, down)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    def layer_parameters(self, tp: int = 1, ep: int = 1) -> int:
        """One layer's parameters on one of `tp` tensor-parallel (and, experts, `ep` expert-parallel) ranks."""
        if not self.is_moe:
            return self._attention_parameters(tp) + 3 * self.hidden_size * self.intermediate_size // tp
        router = self.num_experts * self.hidden_size  # replicated
        return (self._attention_parameters(tp) + router
                + self.num_experts // ep * self.expert_parameters() // tp)

    def parameters(self, tp: int = 1, vocab: int | None = None, ep: int = 1) -> int:
        """Parameters on one of `tp` (× `ep`) ranks; `vocab` defaults to the config's (unpadded, as HF counts)."""
        vocab = self.vocab_size if vocab is None else vocab
        embeddings = (1 if self.tie_word_embeddings else 2) * vocab * self.hidden_size // tp
        return self.num_layers * self.layer_parameters(tp, ep) + embeddings + self.hidden_size

    def expert_parameters_per_gpu(self, tp: int = 1, ep: int = 1) -> int:
        """The experts' share of `parameters(tp, ep)` (sharded over tp × ep; 0 for a dense model)."""
        return self.num_layers * (self.num_experts // ep) * self.expert_parameters() // tp if self.is_moe else 0

    def active_parameters(self) -> int:
        """Parameters one token goes through (MoE: the router and its top-k experts; dense: all)."""
        if not self.is_moe:
            return self.parameters()
        unused = self.num_layers * (self.num_experts - self.experts_per_token) * self.expert_parameters()
        return self.parameters() - unused


def megatron_recompute_settings(recompute: str) -> dict:
    """The megatron-core TransformerConfig fields of a recompute mode, as this plan models them.

    selective: megatron's core-attention recomputation; full: every layer checkpointed on its own (uniform, 1).
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r} is not one of {RECOMPUTE_MODES}")
    return {"none": {}, "selective": dict(recompute_granularity="selective"),
            "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}[recompute]


def check_tensor_parallel(shape: ModelShape, tp: int, ep: int = 1, dp: int = 1) -> None:
    """The divisibility megatron-core needs for TP (and EP); the error names the option."""
    sizes = [("num_attention_heads", shape.num_heads), ("num_key_value_heads", shape.num_kv_heads)]
    sizes.append(("moe_intermediate_size", shape.expert_intermediate_size) if shape.is_moe
                 else ("intermediate_size", shape.intermediate_size))
    for name, value in sizes:
        if value % tp:
            raise ValueError(f"--tensor-parallel {tp} must divide the model's {name}={value} "
                             f"(num_attention_heads={shape.num_heads}, num_key_value_heads={shape.num_kv_heads})")
    if ep > 1 and not shape.is_moe:
        raise ValueError(f"--expert-parallel {ep}: the model ({shape.model_type}) has no experts")
    if shape.is_moe and shape.num_experts % ep:
        raise ValueError(f"--expert-parallel {ep} must divide the model's {shape.num_experts} experts")
    if dp % ep:
        raise ValueError(f"--expert-parallel {ep} must divide the data-parallel size {dp}")


@dataclass(frozen=True)
class PlanSettings:
    """The run's options that change memory (see estimate_memory)."""

    tensor_parallel: int = 1
    data_parallel: int = 1
    expert_parallel: int = 1  # MoE: experts split over this many of the DP ranks
    micro_batch_pairs: int = 1
    max_length: int = 512
    prompt_length: int = 256
    dtype: str = "bfloat16"
    optimizer: str = "rmsprop"
    momentum: float = 0.0
    reference: str = "kept"
    recompute: str = "none"
    distributed_optimizer: bool = False
    sequence_parallel: bool = False
    logprob_chunk_size: int = DEFAULT_CHUNK_SIZE
    attention: str = "local"
    device: str = "cuda"
    overhead_bytes: int | None = None  # None: 1 GiB on CUDA, 0 on CPU
    optimizer_foreach: bool | None = None  # the torch optimiser's foreach; None: torch's default (CUDA only)
    vocab_divisible_by: int = 128

    def __post_init__(self):
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {options}")

        for name in ("tensor_parallel", "data_parallel", "expert_parallel", "micro_batch_pairs",
                     "logprob_chunk_size", "vocab_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be ≥ 2, got {self.max_length}")
        if not 0 <= self.prompt_length < self.max_length:
            raise ValueError(f"prompt_length ({self.prompt_length}) must be in [0, max_length={self.max_length})")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
        choice("optimizer", OPTIMIZERS)
        choice("reference", REFERENCE_MODES)
        choice("recompute", RECOMPUTE_MODES)
        choice("attention", ATTENTION_BACKENDS)
        choice("device", DEVICES)
        if self.momentum < 0:
            raise ValueError(f"momentum must be ≥ 0, got {self.momentum}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("sequence_parallel (--sequence-parallel) needs --tensor-parallel > 1")
        if self.expert_parallel > 1 and self.distributed_optimizer:
            raise ValueError("expert_parallel > 1 with distributed_optimizer: the trainer does not run it yet "
                             "(--expert-parallel with --distributed-optimizer)")
        if self.expert_parallel > 1 and self.reference == "precomputed":
            raise ValueError("expert_parallel > 1 with reference='precomputed': the trainer does not run it "
                             "(--expert-parallel with --precompute-reference)")
        if self.overhead_bytes is not None and self.overhead_bytes < 0:
            raise ValueError(f"overhead_bytes must be ≥ 0, got {self.overhead_bytes}")

    @property
    def element_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class MemoryPlan:
    """One GPU's estimated memory, every component in bytes (see the module docstring for the formulas)."""

    shape: ModelShape
    settings: PlanSettings
    padded_vocab_size: int
    parameters_per_gpu: int
    parameters_total: int  # the HF model's (unpadded vocabulary)
    parameters: int
    gradients: int
    master_weights: int
    optimizer_state: int
    reference_model: int
    activations: int  # kept from forward to backward with settings.recompute
    activations_by_recompute: Mapping[str, int]
    logprob_chunk: int
    working: int  # other transients at the forward/backward peak (forward tail, weight gradient, recomputed layer)
    optimizer_step: int  # the optimizer step's temporaries (activations are freed by then)
    attention_buffer: int
    overhead: int
    gpu_memory_gb: float | None = None  # GiB (2**30 bytes, as nvidia-smi's MiB / 1024)
    working_candidates: Mapping[str, int] = field(default_factory=dict)

    @property
    def persistent(self) -> int:
        return (self.parameters + self.gradients + self.master_weights + self.optimizer_state
                + self.reference_model + self.attention_buffer)

    @property
    def peak_bytes(self) -> int:
        step = self.activations + self.logprob_chunk + self.working
        return self.persistent + self.overhead + max(step, self.optimizer_step)

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits `gpu_memory_gb` (None when no memory size was given)."""
        if self.gpu_memory_gb is None:
            return None
        return self.peak_bytes <= self.gpu_memory_gb * GIB

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(activations_by_recompute=dict(self.activations_by_recompute),
                   working_candidates=dict(self.working_candidates), persistent=self.persistent,
                   peak_bytes=self.peak_bytes, fits=self.fits)
        return out

    def format_plan(self) -> str:
        """A table of the components in GiB and the verdict."""
        s, m = self.settings, self.shape
        recompute_line = ", ".join(f"{mode} {_gib(value)}" for mode, value in self.activations_by_recompute.items())
        rows = [
            ("parameters", self.parameters, f"{self.parameters_per_gpu:,} on this GPU of {self.parameters_total:,}"
                                            f" ({s.dtype})" + (
                                                f"; experts {m.expert_parameters_per_gpu(s.tensor_parallel, s.expert_parallel):,}"
                                                f" of them, split over TP x EP = "
                                                f"{s.tensor_parallel * s.expert_parallel}" if m.is_moe else "")),
            ("gradients", self.gradients, "fp32 DDP buffer"),
            ("master weights", self.master_weights,
             "fp32 copy" + (f", sharded over DP={s.data_parallel}" if s.distributed_optimizer else "")
             if self.master_weights else "none (fp32 parameters)"),
            ("optimizer state", self.optimizer_state,
             s.optimizer + (f", sharded over DP={s.data_parallel}" if s.distributed_optimizer else "")),
            ("reference model", self.reference_model, s.reference),
            ("attention buffer", self.attention_buffer, "megatron's QKᵀ buffer" if self.attention_buffer else "-"),
            ("activations", self.activations, f"recompute={s.recompute} (none/selective/full: {recompute_line})"),
            ("log-prob chunk", self.logprob_chunk,
             f"{min(s.logprob_chunk_size, self._scored_tokens)} tokens x {self.padded_vocab_size // s.tensor_parallel}"
             " vocabulary"),
            ("other working set", self.working, "largest transient at the forward/backward peak"),
            ("optimizer step", self.optimizer_step, "temporaries (not added: activations are freed then)"),
            ("overhead", self.overhead, "CUDA context and workspaces" if self.overhead else "-"),
        ]
        width = max(len(name) for name, _, _ in rows)
        mlp = (f"{m.num_experts} experts of {m.expert_intermediate_size}, top-{m.experts_per_token} "
               f"({m.parameters():,} parameters, {m.active_parameters():,} active per token)" if m.is_moe
               else f"MLP {m.intermediate_size}")
        lines = [f"Memory plan: {m.model_type} {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/"
                 f"{m.num_kv_heads} KV, {mlp}, vocabulary {m.vocab_size}"
                 f"{' (tied)' if m.tie_word_embeddings else ''}",
                 f"  TP={s.tensor_parallel} DP={s.data_parallel}"
                 f"{f' EP={s.expert_parallel}' if m.is_moe else ''}, {s.micro_batch_pairs} pairs "
                 f"({2 * s.micro_batch_pairs} sequences) x {s.max_length} tokens (prompt {s.prompt_length}), "
                 f"{s.dtype}, distributed optimizer {'on' if s.distributed_optimizer else 'off'}, sequence parallel "
                 f"{'on' if s.sequence_parallel else 'off'}, attention {s.attention}, {s.device}",
                 f"  {'component':<{width}}  {'GiB':>8}  notes"]
        lines += [f"  {name:<{width}}  {value / GIB:8.2f}  {note}" for name, value, note in rows]
        lines.append(f"  {'peak':<{width}}  {self.peak_bytes / GIB:8.2f}  persistent + overhead + max(activations + "
                     "chunk + working, optimizer step)")
        if self.gpu_memory_gb is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.gpu_memory_gb:g} GiB "
                         f"({self.peak_bytes / (self.gpu_memory_gb * GIB):.0%} of it)")
        return "\n".join(lines)

    @property
    def _scored_tokens(self) -> int:
        s = self.settings
        return 2 * s.micro_batch_pairs * (s.max_length - s.prompt_length)


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def _optimizer_states(settings: PlanSettings) -> int:
    """fp32 tensors per parameter that the torch optimiser keeps (lazily created at its first step)."""
    momentum = 1 if settings.momentum > 0 else 0
    return {"adamw": 2, "rmsprop": 1 + momentum, "sgd": momentum}[settings.optimizer]


class _Activations:
    """The activation formulas of the module docstring for one shape and settings."""

    def __init__(self, shape: ModelShape, settings: PlanSettings):
        self.m, self.st = shape, settings
        self.e = settings.element_bytes
        self.t = settings.tensor_parallel
        self.sp = settings.tensor_parallel if settings.sequence_parallel else 1
        self.b = 2 * settings.micro_batch_pairs
        self.s = settings.max_length
        # Gemma's (1 + w) norm (rpo's module of torch ops) saves its fp32 input and fp32 x·rstd, and the fp32 1/rms
        # per token; rpo's lean RMSNorm (local spec) only its input; TE's its input and the fp32 1/rms.
        self.norm_bytes = 8 if shape.composite_norms else self.e
        self.norm_keeps_rstd = shape.composite_norms or settings.attention != "local"
        self.local = settings.attention == "local"
        self.k = shape.experts_per_token

    def sbh(self) -> int:
        return self.s * self.b * self.m.hidden_size

    def norm(self) -> int:
        """What one RMSNorm saves: its input (rpo's lean RMSNorm recomputes 1/rms in backward), in fp32 with x/rms
        for Gemma's (1 + w) norm; the fp32 1/rms per token too for TE's and Gemma's."""
        return (self.norm_bytes * self.sbh() + (4 * self.s * self.b if self.norm_keeps_rstd else 0)) // self.sp

    def scores(self) -> int:
        """Elements of one layer's attention scores on this rank, b·a·s²/t."""
        return self.b * self.m.num_heads // self.t * self.s * self.s

    def _heads(self, count: int) -> int:
        """Elements of s·b·count·d/t (count heads of head_dim on this rank)."""
        return self.s * self.b * count * self.m.head_dim // self.t

    def core_attention(self) -> int:
        """What the core attention saves beyond its inputs (dropped by selective recomputation): SDPA (rpo's local
        spec) and TE's flash attention keep Q, K and V unrepeated, the output and the fp32 log-sum-exp per row."""
        a, g = self.m.num_heads, self.m.num_kv_heads
        return self.e * self._heads(2 * a + 2 * g) + 4 * self.b * a // self.t * self.s

    def attention_kept(self, recompute: str) -> int:
        a, g = self.m.num_heads, self.m.num_kv_heads
        if not self.local:
            return self.core_attention()
        if recompute == "selective":
            # The checkpoint's inputs: Q and K after RoPE are new tensors, V is a view of the fused QKV output,
            # which it keeps whole; and its output, the projection's input.
            return self.e * self._heads(a + g + (a + 2 * g) + a)
        # SDPA returns its output in [b, s, heads, d] memory order: the projection's input is the same storage.
        return self.core_attention()

    def qk_norms(self, recompute: str) -> int:
        """What the q/k norms keep: like every norm, r bytes per element of their input (the query and key heads,
        copied out of the fused QKV output) (and the fp32 1/rms per head and token where the norm keeps it), plus,
        without recomputation, their output (e bytes, kept by RoPE's products)."""
        if not self.m.qk_norm:
            return 0
        heads = self.m.num_heads + self.m.num_kv_heads
        if recompute == "selective" and not self.norm_keeps_rstd:
            # rpo's lean norm keeps its input: the query's is a copy, the key's a view of the fused QKV output that
            # the core attention's checkpoint keeps anyway (measured on CPU, float32).
            return self.e * self._heads(self.m.num_heads)
        per_element = self.norm_bytes + (self.e if recompute == "none" else 0)
        rstd = 4 * self.s * self.b * heads // self.t if self.norm_keeps_rstd else 0
        return per_element * self._heads(heads) + rstd

    def mlp(self) -> int:
        """The MLP's kept activations: SwiGLU/GeGLU over s·b tokens, or (MoE) the router's fp32 softmaxes (the
        routing's and the load-balancing loss's), each token's k expert copies (the experts' input) and the
        experts' gated MLPs over those s·b·k tokens."""
        m = self.m
        if not m.is_moe:
            # rpo's SwiGLU (local spec) keeps the fc1 output (gate and up), fc2 its input; megatron's own
            # activation (TE spec, GeGLU) five tensors.
            kept = 3 if self.local and m.activation == "silu" else 5
            return kept * self.e * self.s * self.b * m.intermediate_size // self.t
        routed = self.s * self.b * self.k
        router = 2 * 4 * self.s * self.b * m.num_experts // self.sp
        return router + self.e * routed * m.hidden_size + 6 * self.e * routed * m.expert_intermediate_size // self.t

    def mlp_gradients(self) -> int:
        m = self.m
        tokens = self.s * self.b * (self.k if m.is_moe else 1)
        return 3 * self.e * tokens * (m.expert_intermediate_size if m.is_moe else m.intermediate_size) // self.t

    def layer(self, recompute: str) -> int:
        if recompute == "full":
            return self.e * self.sbh() // self.sp
        norms_and_inputs = self.m.norms_per_layer * self.norm() + 2 * self.e * self.sbh() // self.sp
        rope = 4 * self.e * self.s * self.m.head_dim  # cos and sin, cast to e, saved for Q and for K
        return norms_and_inputs + rope + self.qk_norms(recompute) + self.attention_kept(recompute) + self.mlp()

    def total(self, recompute: str) -> int:
        scored = self.b * (self.s - self.st.prompt_length)
        mask = 0
        if self.local:  # one storage for all layers: SDPA's additive mask, or the boolean one a checkpoint keeps
            mask = (self.e if recompute == "none" else 1) * self.b * self.s * self.s
        return (self.m.num_layers * self.layer(recompute) + self.norm() + self.e * scored * self.m.hidden_size
                + mask)

    def layer_backward(self, recompute: str) -> int:
        """Recomputed part of one layer plus that layer's activation gradients (SDPA's and flash attention's
        backward work in blocks: no [b, heads, s, s] gradient)."""
        recomputed = {"none": 0, "selective": self.core_attention() if self.local else 0,
                      "full": self.layer("none") - self.layer("full")}[recompute]
        return recomputed + self.mlp_gradients()


def estimate_memory(hf_config: Any, *, gpu_memory_gb: float | None = None, **options) -> MemoryPlan:
    """Estimate one GPU's peak memory of a training step; `options` are PlanSettings' fields.

    `hf_config`: a LLaMA/Mistral config.json dict or transformers config. `gpu_memory_gb` (GiB) adds the verdict.
    """
    shape = ModelShape.from_hf(hf_config)
    settings = PlanSettings(**options)
    tp, dp, ep = settings.tensor_parallel, settings.data_parallel, settings.expert_parallel
    check_tensor_parallel(shape, tp, ep, dp)
    e = settings.element_bytes
    vocab = padded_vocab_size(shape.vocab_size, tp, settings.vocab_divisible_by)
    count = shape.parameters(tp, vocab, ep)
    shards = dp if settings.distributed_optimizer else 1
    optimizer_params = count // shards  # the parameters (shards) the torch optimiser steps
    master = 4 * optimizer_params if e != 4 else 0
    optimizer_state = 4 * _optimizer_states(settings) * optimizer_params
    reference = e * count if settings.reference == "kept" else 0

    acts = _Activations(shape, settings)
    by_mode = {mode: acts.total(mode) for mode in RECOMPUTE_MODES}
    width = vocab // tp
    scored = 2 * settings.micro_batch_pairs * (settings.max_length - settings.prompt_length)
    chunk_tokens = min(settings.logprob_chunk_size, max(scored, 1))
    chunk = chunk_tokens * width * (e + (4 if e != 4 else 0))
    candidates = {
        "forward tail": e * acts.sbh() + (e * scored * shape.hidden_size if reference else 0) + chunk,
        "output backward": chunk + e * width * shape.hidden_size,
        "layer backward": acts.layer_backward(settings.recompute),
    }
    working = max(0, max(candidates.values()) - chunk)
    largest_param = max(width * shape.hidden_size,
                        shape.hidden_size * 2 * (shape.expert_intermediate_size if shape.is_moe
                                                 else shape.intermediate_size) // tp)
    foreach = settings.optimizer_foreach
    if foreach is None:  # torch's default: the multi-tensor (foreach) step for CUDA tensors only
        foreach = settings.device == "cuda"
    if foreach:
        step = 4 * optimizer_params if _optimizer_states(settings) else 0
    else:
        step = 4 * largest_param * (2 if settings.optimizer == "adamw" else 1)
    attention_buffer = 0  # megatron's QKᵀ buffer: neither rpo's local (SDPA) nor TE's attention allocates it
    overhead = settings.overhead_bytes
    if overhead is None:
        overhead = DEFAULT_CUDA_OVERHEAD_BYTES if settings.device == "cuda" else 0
    return MemoryPlan(
        shape=shape, settings=settings, padded_vocab_size=vocab, parameters_per_gpu=count,
        parameters_total=shape.parameters(), parameters=e * count, gradients=4 * count, master_weights=master,
        optimizer_state=optimizer_state, reference_model=reference, activations=by_mode[settings.recompute],
        activations_by_recompute=by_mode, logprob_chunk=chunk, working=working, optimizer_step=step,
        attention_buffer=attention_buffer, overhead=overhead, gpu_memory_gb=gpu_memory_gb,
        working_candidates=candidates)


def plan_from_train_config(config, hf_config: Any, *, world_size: int, needs_reference: bool = True,
                           gpu_memory_gb: float | None = None, device: str = "cuda", **overrides) -> MemoryPlan:
    """The plan of a trainer run: `config` is an rpo.train.TrainConfig, `world_size` the number of GPUs.

    `needs_reference` is the built loss's `needs_reference`; `device` "cuda" plans for GPUs, "cpu" for this
    machine. Options read from the config when it has them (recompute, distributed_optimizer, sequence_parallel,
    logprob_chunk_size) or given as keywords (`overrides`, any PlanSettings field, win over the config).
    """
    tp = int(config.tensor_parallel)
    if world_size < 1 or world_size % tp:
        raise ValueError(f"--tensor-parallel {tp} must divide the number of GPUs ({world_size})")
    dtype = config.dtype
    if dtype == "auto":  # the trainer's rule: bf16 on GPU, fp32 on CPU
        dtype = "bfloat16" if device == "cuda" else "float32"
    if not needs_reference:
        reference = "none"
    else:
        reference = "precomputed" if config.precompute_reference else "kept"
    options = dict(tensor_parallel=tp, data_parallel=world_size // tp, micro_batch_pairs=int(config.micro_batch_size),
                   max_length=int(config.max_length), prompt_length=int(config.max_prompt_length), dtype=dtype,
                   optimizer=config.optimizer, momentum=float(config.momentum), reference=reference, device=device)
    for name in ("recompute", "distributed_optimizer", "sequence_parallel", "logprob_chunk_size", "expert_parallel"):
        if hasattr(config, name):
            options[name] = getattr(config, name)
    options.update(overrides)
    return estimate_memory(hf_config, gpu_memory_gb=gpu_memory_gb, **options)
