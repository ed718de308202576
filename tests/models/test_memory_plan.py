"""rpo.models.memory_plan: the per-GPU memory plan against independent counts.

References: parameter counts of Hugging Face LlamaForCausalLM / MistralForCausalLM built here and of megatron's
GPTModel built by rpo.models (its padded vocabulary); the bytes autograd actually keeps for backward in a tiny
megatron model (saved-tensor hooks, storages counted once); and the closed forms of each component recomputed in
the test from the config's numbers.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from rpo.models.memory_plan import GIB, estimate_memory, megatron_recompute_settings, plan_from_train_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

VOCAB = 512  # a multiple of 128·4: no vocabulary padding at TP = 1, 2, 4, so TP shards the same vocabulary


def tiny(kind: str = "llama", tied: bool = False, vocab: int = VOCAB, **overrides) -> dict:
    config = dict(model_type=kind, num_hidden_layers=3, hidden_size=64, intermediate_size=160,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied)
    config.update(overrides)
    return config


def hf_config(config: dict):
    from transformers import LlamaConfig, MistralConfig

    cls = LlamaConfig if config["model_type"] == "llama" else MistralConfig
    return cls(**{k: v for k, v in config.items() if k != "model_type"}, max_position_embeddings=128)


SMOLLM2_135M = dict(model_type="llama", num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_hf_model(kind, tied):
    from transformers import AutoModelForCausalLM

    config = tiny(kind, tied, vocab=300)
    model = AutoModelForCausalLM.from_config(hf_config(config))
    plan = estimate_memory(config, micro_batch_pairs=1, max_length=16, prompt_length=8)
    assert plan.parameters_total == sum(p.numel() for p in model.parameters())
    # A transformers config object gives the same plan as its config.json dict.
    assert estimate_memory(hf_config(config), micro_batch_pairs=1, max_length=16,
                           prompt_length=8).parameters_total == plan.parameters_total


def _megatron_tiny_model(config: dict, recompute: str):
    """rpo's megatron GPTModel for `config`, float32, TP = 1, with megatron's settings for `recompute`."""
    from memory_plan import build_policy  # benchmarks/memory_plan.py (the validation benchmark's builder)

    return build_policy(hf_config(config), torch.float32, recompute)


def _saved_activation_bytes(model, batch) -> int:
    """Bytes of the storages autograd keeps for backward (parameters excluded), each storage once."""
    from rpo.models import sequence_logprobs

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = sequence_logprobs(model, batch, return_token_logprobs=False)
    out.sums.sum().backward()
    return sum(storages.values())


def _measured_and_planned(model, config, recompute: str, pairs: int = 2, length: int = 40, prompt: int = 10):
    """(bytes autograd keeps for one training forward of `pairs` random pairs, the plan for the same shape)."""
    model.train()
    rows = 2 * pairs
    loss_mask = torch.zeros(rows, length, dtype=torch.bool)
    loss_mask[:, prompt:] = True
    batch = {"input_ids": torch.randint(0, 1000, (rows, length), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(rows, length, dtype=torch.long), "loss_mask": loss_mask}
    plan = estimate_memory(config, micro_batch_pairs=pairs, max_length=length, prompt_length=prompt,
                           dtype="float32", recompute=recompute, device="cpu")
    return _saved_activation_bytes(model, batch), plan


@pytest.fixture(scope="module")
def megatron_tp1():
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from rpo.models import init_parallel, teardown

    init_parallel(1, seed=0)
    yield
    teardown()


@pytest.mark.parametrize("kind, tied, heads", [("llama", False, 2), ("mistral", True, 4)])
def test_parameters_per_gpu_match_megatron_model(megatron_tp1, kind, tied, heads):
    config = tiny(kind, tied, vocab=300, num_key_value_heads=heads)  # 300 is padded to 384
    model = _megatron_tiny_model(config, "none")
    plan = estimate_memory(config, micro_batch_pairs=1, max_length=16, prompt_length=8, dtype="float32")
    assert plan.padded_vocab_size == 384
    assert plan.parameters_per_gpu == sum(p.numel() for p in model.parameters())
    assert plan.parameters == 4 * plan.parameters_per_gpu


@pytest.mark.parametrize("recompute, tolerance", [("none", 0.01), ("selective", 0.01), ("full", 0.05)])
@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (K, V repeated) and plain multi-head attention
def test_activations_match_what_autograd_saves(megatron_tp1, recompute, tolerance, kv_heads):
    config = tiny(num_key_value_heads=kv_heads, vocab=1000)
    model = _megatron_tiny_model(config, recompute)
    assert model.config.recompute_granularity == megatron_recompute_settings(recompute).get("recompute_granularity")
    measured, plan = _measured_and_planned(model, config, recompute)
    assert plan.activations == pytest.approx(measured, rel=tolerance)


def _closed_form_counts(config: dict, tp: int) -> tuple[int, int]:
    """(TP-sharded parameters at TP=1, replicated norm parameters) from the config, as HF names them."""
    L, h, f = config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]
    a, g = config["num_attention_heads"], config["num_key_value_heads"]
    d = h // a
    per_layer = h * a * d + 2 * h * g * d + a * d * h + 3 * h * f
    embeddings = (1 if config["tie_word_embeddings"] else 2) * config["vocab_size"] * h
    return L * per_layer + embeddings, (2 * L + 1) * h


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype, e", [("bfloat16", 2), ("float32", 4)])
@pytest.mark.parametrize("optimizer, momentum, states", [
    ("adamw", 0.0, 2), ("rmsprop", 0.0, 1), ("rmsprop", 0.9, 2), ("sgd", 0.0, 0), ("sgd", 0.9, 1)])
def test_persistent_bytes_closed_form(tp, dtype, e, optimizer, momentum, states):
    config = tiny()
    sharded, norms = _closed_form_counts(config, tp)
    n = sharded // tp + norms  # TP divides everything except the norm weights
    common = dict(tensor_parallel=tp, data_parallel=4, micro_batch_pairs=2, max_length=32, prompt_length=16,
                  dtype=dtype, optimizer=optimizer, momentum=momentum)
    plan = estimate_memory(config, **common)
    assert plan.parameters_per_gpu == n
    assert (plan.parameters, plan.gradients) == (e * n, 4 * n)
    assert plan.master_weights == (4 * n if e == 2 else 0)
    assert plan.optimizer_state == 4 * states * n
    assert plan.reference_model == e * n
    sharded_plan = estimate_memory(config, distributed_optimizer=True, **common)
    assert sharded_plan.optimizer_state == 4 * states * (n // 4)
    assert sharded_plan.master_weights == (4 * (n // 4) if e == 2 else 0)
    assert (sharded_plan.parameters, sharded_plan.gradients) == (plan.parameters, plan.gradients)
    assert estimate_memory(config, reference="precomputed", **common).reference_model == 0
    assert estimate_memory(config, reference="none", **common).reference_model == 0


@pytest.mark.parametrize("optimizer, copies", [("rmsprop", 1), ("adamw", 1), ("sgd", 0)])
def test_optimizer_step_temporaries(optimizer, copies):
    config = tiny(num_key_value_heads=4)
    common = dict(tensor_parallel=2, data_parallel=4, distributed_optimizer=True, optimizer=optimizer,
                  dtype="bfloat16", max_length=32, prompt_length=16)
    n = estimate_memory(config, **common).parameters_per_gpu
    # foreach (torch's CUDA default): sqrt of every state shard at once, one fp32 copy of the optimizer's shard.
    assert estimate_memory(config, **common).optimizer_step == 4 * copies * (n // 4)
    # Per-tensor loop: the largest parameter (the vocabulary shard of the embedding), twice for AdamW's sqrt/div.
    loop = estimate_memory(config, optimizer_foreach=False, **common).optimizer_step
    assert loop == 4 * (VOCAB // 2) * 64 * {"rmsprop": 1, "adamw": 2, "sgd": 1}[optimizer]
    assert estimate_memory(config, device="cpu", **common).optimizer_step == loop


def test_recomputation_orders_activations_and_sequence_parallel_shards_them():
    config = tiny()
    common = dict(tensor_parallel=2, micro_batch_pairs=4, max_length=256, prompt_length=128)
    by_mode = estimate_memory(config, **common).activations_by_recompute
    # Full recomputation keeps least. rpo's local attention (SDPA) keeps no [b, heads, s, s] scores, so megatron's
    # selective (core-attention) recomputation, whose checkpoint keeps V's view of the whole QKV output, keeps a
    # little more than none; with TE's flash attention the two are equal.
    assert by_mode["full"] < by_mode["none"] < by_mode["selective"]
    flash = estimate_memory(config, attention="flash", **common).activations_by_recompute
    assert flash["full"] < flash["selective"] == flash["none"]
    for mode in by_mode:
        assert estimate_memory(config, recompute=mode, **common).activations == by_mode[mode]
    # Full recompute keeps each layer's input (e·s·b·h) and the final norm's (e·s·b·h): SP halves exactly those
    # at TP=2; the response hidden states and the mask stay whole.
    s, b, h, L, e = 256, 8, 64, 3, 2
    kept_per_rank = L * e * s * b * h + e * s * b * h
    plain = estimate_memory(config, recompute="full", **common).activations
    parallel = estimate_memory(config, recompute="full", sequence_parallel=True, **common).activations
    assert plain - parallel == kept_per_rank - kept_per_rank // 2


def test_tensor_parallel_divides_per_gpu_memory():
    config = tiny(num_key_value_heads=4)
    one, four = (estimate_memory(config, tensor_parallel=t, micro_batch_pairs=2, max_length=64, prompt_length=32)
                 for t in (1, 4))
    sharded, norms = _closed_form_counts(config, 1)
    assert (one.parameters_per_gpu, four.parameters_per_gpu) == (sharded + norms, sharded // 4 + norms)
    assert four.activations < one.activations


def test_smollm2_tp2_is_rejected_naming_the_option():
    with pytest.raises(ValueError, match=r"--tensor-parallel 2 .*num_attention_heads=9"):
        estimate_memory(SMOLLM2_135M, tensor_parallel=2)
    plan = estimate_memory(SMOLLM2_135M, tensor_parallel=3)  # 3 divides 9 heads, 3 KV heads and 1536
    assert plan.parameters_total == 134_515_008  # SmolLM2-135M's published count (tied embeddings)


@pytest.mark.parametrize("options, field", [
    (dict(recompute="partial"), "recompute"), (dict(optimizer="adam"), "optimizer"), (dict(dtype="fp8"), "dtype"),
    (dict(sequence_parallel=True), "sequence_parallel"), (dict(micro_batch_pairs=0), "micro_batch_pairs"),
    (dict(prompt_length=512), "prompt_length"), (dict(reference="cached"), "reference")])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        estimate_memory(tiny(), **options)
    with pytest.raises(ValueError, match="recompute"):
        megatron_recompute_settings("partial")
    with pytest.raises(ValueError, match="model_type"):
        estimate_memory(tiny(kind="gpt2"))


def test_peak_fits_and_table():
    config = tiny()
    plan = estimate_memory(config, micro_batch_pairs=2, max_length=64, prompt_length=32, recompute="selective")
    assert plan.overhead == GIB and estimate_memory(config, device="cpu").overhead == 0
    assert plan.peak_bytes == plan.persistent + plan.overhead + max(
        plan.activations + plan.logprob_chunk + plan.working, plan.optimizer_step)
    assert plan.persistent == sum((plan.parameters, plan.gradients, plan.master_weights, plan.optimizer_state,
                                   plan.reference_model, plan.attention_buffer))
    assert plan.fits is None
    peak_gib = plan.peak_bytes / GIB
    assert estimate_memory(config, gpu_memory_gb=peak_gib * 1.001, micro_batch_pairs=2, max_length=64,
                           prompt_length=32, recompute="selective").fits is True
    small = estimate_memory(config, gpu_memory_gb=peak_gib * 0.999, micro_batch_pairs=2, max_length=64,
                            prompt_length=32, recompute="selective")
    assert small.fits is False
    table = small.format_plan()
    for name in ("parameters", "gradients", "master weights", "optimizer state", "reference model", "activations",
                 "log-prob chunk", "overhead", "peak", "does NOT fit"):
        assert name in table
    # The log-prob chunk: c tokens × padded vocabulary / TP × (bf16 logits + fp32 copy; no padding here).
    assert plan.logprob_chunk == 2 * 2 * 32 * VOCAB * (2 + 4)


def test_plan_from_train_config():
    from rpo.train.config import TrainConfig

    config = TrainConfig(tensor_parallel=2, micro_batch_size=4, global_batch_size=64, max_length=512,
                         max_prompt_length=256, optimizer="adamw", precompute_reference=True)
    plan = plan_from_train_config(config, tiny(num_key_value_heads=4), world_size=8, gpu_memory_gb=80,
                                  recompute="full")
    s = plan.settings
    assert (s.tensor_parallel, s.data_parallel, s.micro_batch_pairs, s.max_length, s.prompt_length) == (2, 4, 4, 512,
                                                                                                        256)
    assert (s.dtype, s.optimizer, s.reference, s.recompute, plan.fits) == ("bfloat16", "adamw", "precomputed",
                                                                           "full", True)
    cpu = plan_from_train_config(config, tiny(num_key_value_heads=4), world_size=2, device="cpu",
                                 needs_reference=False)
    assert (cpu.settings.dtype, cpu.settings.reference, cpu.settings.data_parallel) == ("float32", "none", 1)
    with pytest.raises(ValueError, match="--tensor-parallel 2 must divide the number of GPUs"):
        plan_from_train_config(config, tiny(), world_size=3)


# ---------------------------------------------------------------------------------------------------------------
# The families of issue 25: Qwen2 (q/k/v bias), Qwen3 (q/k norms), Gemma 3 (four norms of its own kind), Mixtral
# and Qwen3-MoE (experts, expert parallelism).

FAMILY_KINDS = ("qwen2", "qwen3", "gemma3", "mixtral", "qwen3_moe")


def _family_config(kind: str, vocab: int = 1000):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_hf_models import tiny_config

    return tiny_config(kind, vocab=vocab)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_family_parameter_counts_match_hf_and_megatron(megatron_tp1, kind):
    from transformers import AutoModelForCausalLM

    config = _family_config(kind, vocab=300)
    hf = AutoModelForCausalLM.from_config(config)
    plan = estimate_memory(config, micro_batch_pairs=1, max_length=16, prompt_length=8, dtype="float32")
    assert plan.parameters_total == sum(p.numel() for p in hf.parameters())
    # The config.json form (a dict) gives the same numbers.
    as_dict = {k: v for k, v in config.to_dict().items() if v is not None}
    assert estimate_memory(as_dict, micro_batch_pairs=1, max_length=16, prompt_length=8).parameters_total == \
        plan.parameters_total
    model = _megatron_tiny_model_for(config)
    assert plan.parameters_per_gpu == sum(p.numel() for p in model.parameters())


def _megatron_tiny_model_for(config, recompute: str = "none"):
    from rpo.models import build_gpt_model

    return build_gpt_model(config, tp_size=1, dtype=torch.float32, recompute=recompute)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_family_activations_match_what_autograd_saves(megatron_tp1, kind, recompute):
    """Within 3 % (full recomputation: 5 %, as for LLaMA above): q/k norms (12 bytes per element kept on CPU without
    recomputation), Gemma's four norms of torch ops, the MoE layer's router softmaxes, expert inputs and expert
    MLPs over s·b·k tokens."""
    config = _family_config(kind)
    model = _megatron_tiny_model_for(config, recompute)
    measured, plan = _measured_and_planned(model, config, recompute)
    assert plan.activations == pytest.approx(measured, rel=0.05 if recompute == "full" else 0.03)


def test_moe_total_active_and_expert_parallel_sharding():
    """Mixtral-8x7B and Qwen3-30B-A3B from their config.json numbers: the published totals (46.7B / 12.9B active;
    30.5B / "3.3B activated", 3.35B with both embeddings counted); experts split over TP × EP, the rest over TP;
    the options checked with their names."""
    mixtral = dict(model_type="mixtral", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                   num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, num_local_experts=8,
                   num_experts_per_tok=2)
    qwen3_moe = dict(model_type="qwen3_moe", num_hidden_layers=48, hidden_size=2048, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                     num_experts=128, num_experts_per_tok=8, vocab_size=151936)
    from rpo.models.memory_plan import ModelShape

    m, q = ModelShape.from_hf(mixtral), ModelShape.from_hf(qwen3_moe)
    assert round(m.parameters() / 1e9, 1) == 46.7 and round(m.active_parameters() / 1e9, 1) == 12.9
    assert round(q.parameters() / 1e9, 1) == 30.5 and round(q.active_parameters() / 1e9, 2) == 3.35
    experts = 32 * 8 * 3 * 4096 * 14336
    for tp, ep in ((1, 1), (2, 1), (1, 2), (2, 4)):
        plan = estimate_memory(mixtral, tensor_parallel=tp, expert_parallel=ep, data_parallel=8)
        dense = m.parameters(tp=tp) - experts // tp  # everything but the experts, TP-sharded as dense layers
        assert plan.parameters_per_gpu == dense + experts // (tp * ep)
        assert m.expert_parameters_per_gpu(tp, ep) == experts // (tp * ep)
    with pytest.raises(ValueError, match="--expert-parallel 3 must divide the model's 8 experts"):
        estimate_memory(mixtral, expert_parallel=3, data_parallel=3)
    with pytest.raises(ValueError, match="--expert-parallel 4 must divide the data-parallel size 2"):
        estimate_memory(mixtral, expert_parallel=4, data_parallel=2)
    with pytest.raises(ValueError, match="--expert-parallel 2: the model \\(llama\\) has no experts"):
        estimate_memory(tiny(), expert_parallel=2, data_parallel=2)
    with pytest.raises(ValueError, match="distributed_optimizer"):
        estimate_memory(mixtral, expert_parallel=2, data_parallel=2, distributed_optimizer=True, optimizer="adamw")
    with pytest.raises(ValueError, match="precompute-reference"):
        estimate_memory(mixtral, expert_parallel=2, data_parallel=2, reference="precomputed")
    table = estimate_memory(mixtral, tensor_parallel=2, expert_parallel=4, data_parallel=4).format_plan()
    assert "8 experts of 14336, top-2 (46,702,792,704 parameters, 12,879,925,248 active per token)" in table
    assert "EP=4" in table and "split over TP x EP = 8" in table


def test_refused_family_is_refused_by_the_plan_too():
    with pytest.raises(ValueError, match="Phi-3"):
        estimate_memory(dict(model_type="phi3", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                             intermediate_size=96, vocab_size=300))
