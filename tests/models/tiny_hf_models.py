"""Tiny Hugging Face LLaMA / Mistral models, tokenizer and batch for the rpo.models tests, and their
independent references (HF log-probs in float64, plain-PyTorch loss and SGD step)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

VOCAB = 300  # not a multiple of 128: padding to 384 (TP=1) / 512 (TP=2) is exercised
ROWS, LENGTH = 6, 14
SLIDING_WINDOW = 4  # smaller than LENGTH, so the window changes Mistral's log-probs


def tiny_config(kind: str):
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.2, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    if kind == "llama":  # untied, non-default θ and ε
        return LlamaConfig(rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **common)
    return MistralConfig(rope_theta=20000.0, rms_norm_eps=1e-6, sliding_window=SLIDING_WINDOW,
                         tie_word_embeddings=True, **common)


def tiny_hf_model(kind: str, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager",
                                             dtype=torch.float32)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight changes the output
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model.eval()


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
