"""A tiny random LLaMA, a word-level tokenizer and a preference data set for the TRL integration tests, plus the
independent reference: per-sequence log-probs from the model's plain logits (float64 log-softmax) and rpo.losses
called on them. Imported by test_trl_integration.py and its multi-rank worker (needs trl and peft)."""
from __future__ import annotations

import torch

VOCAB = 64
PAIRS = 8
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
MAX_POSITIONS = 64
# A chat template made of the tokenizer's own BOS / EOS (the word-level vocabulary has no room for more): each turn
# is <s> content </s>. TRL and rpo's tokenisation then agree token for token on conversational rows.
CHAT_TEMPLATE = ("{% for message in messages %}<s> {{ message['content'] }} </s>{% endfor %}"
                 "{% if add_generation_prompt %}<s> {% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, **{f"t{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def chat_tokenizer():
    """`tiny_tokenizer` with CHAT_TEMPLATE."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, dtype=torch.float64):
    """A 2-layer LLaMA (untied head, dropout-free), float64 by default so that comparisons hold to 1e-6."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                         initializer_range=0.3, tie_word_embeddings=False, pad_token_id=1, bos_token_id=2,
                         eos_token_id=3)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def preference_dataset(pairs: int = PAIRS, seed: int = 0):
    """`pairs` rows of (prompt, chosen, rejected) word strings of different lengths; prompts differ (so the
    embedding weights are not uniform), two prompts share their first words."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(f"t{int(i)}" for i in torch.randint(4, VOCAB, (n,), generator=g))  # noqa: E731
    rows = [{"prompt": words(3 + i % 4), "chosen": " " + words(2 + i % 3), "rejected": " " + words(4 - i % 3)}
            for i in range(pairs)]
    rows[1]["prompt"] = rows[0]["prompt"] + " t5"
    return Dataset.from_list(rows)


def conversational_dataset(pairs: int = PAIRS, seed: int = 0) -> list:
    """`preference_dataset`'s rows as messages: a user prompt, an assistant answer."""
    return [{"prompt": [{"role": "user", "content": row["prompt"]}],
             "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]}
            for row in preference_dataset(pairs, seed)]


def dpo_config(output_dir, **overrides):
    """A DPOConfig for quick deterministic CPU runs (no checkpoints, logs every step, plain SGD)."""
    from trl import DPOConfig

    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=PAIRS, max_steps=1, learning_rate=1e-2,
                    optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                    gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                    use_cpu=True, seed=0, dataloader_drop_last=False, disable_tqdm=True, beta=0.1,
                    dataset_num_proc=None, bf16=False, fp16=False)
    settings.update(overrides)
    return DPOConfig(**settings)


def sequence_logps(model, batch) -> tuple:
    """(per-sequence log-probs [2B], completion lengths [2B]) from the plain forward: float64 log-softmax of the
    logits at position t-1 gathered at token t, summed over the completion tokens. Independent of TRL's fused
    LM head."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(
        -1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].double()
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


def reference_loss(loss, policy, reference, batch, embeddings=None, process_group=None):
    """rpo.losses on the independent log-probs of `policy` (with grad) and `reference` (a model or None)."""
    logps, lengths = sequence_logps(policy, batch)
    pairs = logps.shape[0] // 2
    inputs = {"policy_chosen_logps": logps[:pairs], "policy_rejected_logps": logps[pairs:],
              "chosen_lengths": lengths[:pairs], "rejected_lengths": lengths[pairs:]}
    if loss.needs_reference:
        with torch.no_grad():
            ref_logps, _ = sequence_logps(reference, batch)
        inputs["reference_chosen_logps"], inputs["reference_rejected_logps"] = ref_logps[:pairs], ref_logps[pairs:]
    if loss.needs_embeddings:
        inputs["chosen_embeddings"] = inputs["rejected_embeddings"] = embeddings
    if process_group is not None:
        inputs["process_group"] = process_group
    return loss(**inputs)


def gradients(model) -> dict:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()
            if param.grad is not None}
