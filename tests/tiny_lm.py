"""A tiny causal LM for generation tests: a word-level tokenizer of ~50 words (sentiment words VADER scores and
neutral ones) with a ChatML-like template, and a random 2-layer LLaMA over it, saved as a Hugging Face folder.

With a small vocabulary a random model ends (draws the end-of-turn token) within a few tokens often enough that
ended and cut-off samples both occur; the real 49k-token tokenizer would almost never end.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("good great love happy excellent wonderful nice bad terrible awful hate sad horrible poor the a food movie "
         "city book phone was is it and but very really quite i think this that service place price day time "
         "review write about one sentence what do you").split()
SPECIAL = ["<pad>", "[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                        unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int = 0, eos_rate: float = 0.0):
    """A random tiny LLaMA. ``eos_rate`` > 0: the end token's output row is moved along the mean final hidden state
    until its mean probability over random contexts is ``eos_rate`` (bisection), so that some samples end within
    a few tokens and others are cut off, whatever the seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if eos_rate > 0:
        eos = tokenizer.eos_token_id
        with torch.no_grad():
            contexts = torch.randint(len(SPECIAL), len(tokenizer), (32, 12), generator=torch.Generator().manual_seed(0))
            hidden = model.model(input_ids=contexts).last_hidden_state.reshape(-1, config.hidden_size)
            direction = hidden.mean(0) / hidden.mean(0).norm()
            row = model.lm_head.weight[eos].clone()

            def rate(boost: float) -> float:
                model.lm_head.weight[eos] = row + boost * direction
                return float(torch.softmax(model.lm_head(hidden), -1)[:, eos].mean())

            low, high = -50.0, 50.0
            for _ in range(60):
                middle = (low + high) / 2
                low, high = (middle, high) if rate(middle) < eos_rate else (low, middle)
            rate((low + high) / 2)
    return model


def save_tiny_lm(folder: Path, seed: int = 0, eos_rate: float = 0.0) -> Path:
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed, eos_rate).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
