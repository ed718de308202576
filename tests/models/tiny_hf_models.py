"""Tiny Hugging Face models of every supported family (LLaMA, Mistral, Qwen2, Qwen3, Gemma 3, Mixtral, Qwen3-MoE),
tokenizer and batches for the rpo.models tests, and their independent references (HF log-probs in float64,
plain-PyTorch loss and SGD step, transformers' own load-balancing loss)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

VOCAB = 300  # not a multiple of 128: padding to 384 (TP=1) / 512 (TP=2) is exercised
ROWS, LENGTH = 6, 14
SLIDING_WINDOW = 4  # smaller than LENGTH, so the window changes Mistral's log-probs


# The families added by issue 25, each exercising its own features (see tiny_config).
FAMILIES = ("qwen2", "qwen3", "gemma3", "mixtral", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "qwen3_moe")
LONG_LENGTH = 96  # long enough for the windows and RoPE scalings to matter, rows of about −400
FAMILY_WINDOW = 9


def tiny_config(kind: str, vocab: int = VOCAB, special_ids: tuple = (1, 2, 3)):
    """Tiny configs. llama: untied, θ 5000, ε 1e-5. mistral: window 4 on every layer, tied. qwen2: q/k/v bias,
    tied, yarn RoPE (factor 4 over 32 original positions), window on layer 1 only (max_window_layers=1). qwen3:
    q/k norms, head_dim 24 ≠ 64/4, linear RoPE (factor 2), untied. gemma3: every Gemma 3 text feature, layers
    sliding / global / sliding with local θ 10000 and global θ 1e6 linear ×8, query_pre_attn_scalar 20 ≠ head_dim
    24. mixtral: 4 experts top-2 (renormalised), aux coefficient 0.02. qwen3_moe: 8 experts top-2 without
    renormalisation (norm_topk_prob=False), q/k norms, aux coefficient 0.01."""
    from transformers import (Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config,
                              Qwen3MoeConfig)

    pad, bos, eos = special_ids
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.2, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    if kind == "llama":  # untied, non-default θ and ε
        return LlamaConfig(rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **common)
    if kind == "mistral":
        return MistralConfig(rope_theta=20000.0, rms_norm_eps=1e-6, sliding_window=SLIDING_WINDOW,
                             tie_word_embeddings=True, **common)
    common.update(max_position_embeddings=128, initializer_range=0.1)
    if kind == "qwen2":
        return Qwen2Config(rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=True,
                           sliding_window=FAMILY_WINDOW, max_window_layers=1,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 32}, **common)
    if kind == "qwen3":
        return Qwen3Config(head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}, **common)
    if kind == "gemma3":
        common.update(num_hidden_layers=3)
        return Gemma3TextConfig(head_dim=24, query_pre_attn_scalar=20, rms_norm_eps=1e-6, sliding_window=FAMILY_WINDOW,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                                                    "factor": 8.0}},
                                **common)
    if kind == "mixtral":
        return MixtralConfig(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                             rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False, **common)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
                              router_aux_loss_coef=0.01, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=False,
                              **common)
    raise ValueError(kind)


def tiny_hf_model(kind: str, seed: int, **config_options):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # Eager attention and, for MoE, eager experts (the grouped-matmul default has no float64 kernel).
    extra = {"experts_implementation": "eager"} if kind in MOE_FAMILIES else {}
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **config_options), attn_implementation="eager",
                                             dtype=torch.float32, **extra)
    with torch.no_grad():  # norms away from 1 (Gemma's 1 + w: w away from 0), so a misplaced norm changes the output
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_((0.0 if kind == "gemma3" else 1.0) + 0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):  # transformers initialises biases to 0: make them matter
                param.copy_(0.3 * torch.randn_like(param))
    return model.eval()


def long_batch(seed: int = 0, rows: int = 6):
    """Rows of up to LONG_LENGTH tokens (responses of ~50-80 tokens: sums around −300 to −450), right-padded, one
    left-padded, so windows (9) and scaled RoPE (positions past 32) matter."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (rows, LONG_LENGTH), generator=g)
    lengths = [96, 80, 71, 96, 88, 60][:rows]
    prompt = [12, 9, 7, 14, 6, 5][:rows]
    attention_mask = torch.zeros(rows, LONG_LENGTH, dtype=torch.long)
    loss_mask = torch.zeros(rows, LONG_LENGTH, dtype=torch.bool)
    for r in range(rows):
        attention_mask[r, :lengths[r]] = 1
        loss_mask[r, prompt[r]:lengths[r]] = True
    if rows > 3:  # row 3 left-padded by 5
        attention_mask[3, :5] = 0
        loss_mask[3, :prompt[3]] = False
    input_ids[attention_mask == 0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def hf_token_logprobs_float64(model, batch) -> torch.Tensor:
    """[R, T] float64 log-probs from a float64 copy of the HF model (eager attention), 0 outside loss_mask.

    Each row alone, cut to its real tokens, without an attention mask: transformers' float64 eager attention
    turns fully masked padding queries into NaN that then reach real tokens (0 · NaN in the next layer's P·V),
    and RoPE depends only on position differences, so a left-padded row's shift changes nothing."""
    model = copy.deepcopy(model).double().eval()
    out = torch.zeros(batch["input_ids"].shape, dtype=torch.float64)
    for r in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][r].bool().nonzero().flatten()
        start, end = int(real[0]), int(real[-1]) + 1
        ids = batch["input_ids"][r:r + 1, start:end]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out[r, start + 1:end] = logp
    return out * batch["loss_mask"]


def hf_load_balancing_loss(model, batch) -> torch.Tensor:
    """transformers' own load_balancing_loss_func of an HF MoE model's forward on `batch` (padding excluded)."""
    import importlib

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    module = importlib.import_module(type(model).__module__)
    config = model.config
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    return module.load_balancing_loss_func(out.router_logits, experts, config.num_experts_per_tok,
                                           batch["attention_mask"])


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_batch(seed: int = 0):
    """Right-padded rows of different lengths (plus one left-padded row), responses after a prompt."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (ROWS, LENGTH), generator=g)
    lengths = [14, 11, 9, 14, 12, 7]
    prompt = [5, 3, 4, 6, 2, 3]
    attention_mask = torch.zeros(ROWS, LENGTH, dtype=torch.long)
    loss_mask = torch.zeros(ROWS, LENGTH, dtype=torch.bool)
    for r in range(ROWS):
        attention_mask[r, :lengths[r]] = 1
        loss_mask[r, prompt[r]:lengths[r]] = True
    # Row 3 left-padded by 2 (its positions shift, as in HF's forward without position_ids).
    attention_mask[3, :2] = 0
    loss_mask[3, :prompt[3]] = False
    input_ids[attention_mask == 0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def hf_token_logprobs(model, batch) -> torch.Tensor:
    """log p(input_ids[r, t] | input_ids[r, <t]) from HF logits, 0 outside loss_mask; [R, T]."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    logp = torch.cat([torch.zeros(logp.shape[0], 1, dtype=logp.dtype), logp], dim=1)
    return (logp * batch["loss_mask"]).float()


def hf_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None])
    mask = batch["loss_mask"][:, 1:]
    sums = (logp.squeeze(-1) * mask).sum(1)
    return -(sums / mask.sum(1)).mean()


def hf_sgd_reference(model, batch, lr: float, clip: float):
    """(state after one clipped SGD step, gradient norm before clipping), plain PyTorch on the HF model."""
    model = copy.deepcopy(model)
    model.zero_grad()
    hf_loss(model, batch).backward()
    params = [p for p in model.parameters()]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(norm)


def read_safetensors_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def hf_hub_grads(model, kind) -> dict:
    """Gradients of an HF model under checkpoint (hub) names: fused expert gradients split per expert."""
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach()
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            prefix = prefix.replace("mlp.", "block_sparse_moe.") if kind == "mixtral" else prefix
            gate, up = ("w1", "w3") if kind == "mixtral" else ("gate_proj", "up_proj")
            for e, fused in enumerate(grad):
                g, u = fused.chunk(2, dim=0)
                out[f"{prefix}{e}.{gate}.weight"], out[f"{prefix}{e}.{up}.weight"] = g, u
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            prefix = prefix.replace("mlp.", "block_sparse_moe.") if kind == "mixtral" else prefix
            for e, single in enumerate(grad):
                out[f"{prefix}{e}.{'w2' if kind == 'mixtral' else 'down_proj'}.weight"] = single
        elif kind == "mixtral" and ".mlp.gate." in name:
            out[name.replace(".mlp.", ".block_sparse_moe.")] = grad
        else:
            out[name] = grad
    return out
