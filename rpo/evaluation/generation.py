"""Answers of a model for a file of prompts: greedy by default (the paper samples at temperature 0).

Prompts are rendered exactly as in training (:func:`rpo.data.render_sequence_texts`: the chat template with the
generation prompt, or the plain-text form for tokenizers without one) and truncated from the left to
``max_prompt_length`` tokens.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class PromptRow:
    prompt: list  # {role, content} messages
    baseline: str | None  # a reference answer to judge against (e.g. the data set's chosen response)
    source_row: int


def _response_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        texts = [m.get("content") for m in value if m.get("role", "assistant") == "assistant"]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{where}: expected assistant messages with string 'content'")
        return "\n\n".join(texts)
    raise ValueError(f"{where}: expected a string or a list of assistant messages, got {type(value).__name__}")


def _prompt_messages(value: Any, where: str) -> list:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: the prompt is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"{where}: expected a string or a non-empty list of {{role, content}} messages, "
                     f"got {type(value).__name__}")


def load_prompt_file(path: str | Path, baseline_field: str | None = "chosen") -> list[PromptRow]:
    """Prompts from a .txt file (one per line) or a .jsonl/.json file of objects with a ``prompt`` field.

    ``prompt`` is a string or a list of {role, content} messages. ``baseline_field`` (default ``chosen``, as in
    the preference data sets) holds an optional reference answer per row: a string or assistant messages.
    Errors name the file, the row and the field; blank lines of a .txt file are skipped and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    rows: list[PromptRow] = []
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        blank = 0
        for number, line in enumerate(lines):
            if not line.strip():
                blank += 1
                continue
            rows.append(PromptRow([{"role": "user", "content": line}], None, number))
        if blank:
            logger.info("%s: skipped %d blank lines", path, blank)
    elif path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                records = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON: {err}") from err
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of objects with a 'prompt' field")
            numbered = list(enumerate(records))
        else:
            numbered = []
            for number, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    numbered.append((len(numbered), json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number + 1}: not valid JSON: {err}") from err
        for index, record in numbered:
            where = f"{path}: row {index}"
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected an object with a 'prompt' field, got {type(record).__name__}")
            if "prompt" not in record:
                raise ValueError(f"{where}: missing field 'prompt'")
            prompt = _prompt_messages(record["prompt"], f"{where}, field 'prompt'")
            baseline = None
            if baseline_field and record.get(baseline_field) is not None:
                baseline = _response_text(record[baseline_field], f"{where}, field {baseline_field!r}")
            rows.append(PromptRow(prompt, baseline, index))
    else:
        raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r}; use .txt, .jsonl or .json")
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def prompt_token_ids(tokenizer: Any, prompt: list, max_prompt_length: int) -> list[int]:
    """Token ids of a prompt as training renders it, truncated from the left."""
    from rpo.data.tokenization import has_chat_template, render_sequence_texts

    prompt_text, _ = render_sequence_texts(tokenizer, prompt, [])
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if not has_chat_template(tokenizer) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids[-max_prompt_length:]


@torch.no_grad()
def generate_responses(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[list], *,
                       max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                       max_prompt_length: int = 256, batch_size: int = 8, seed: int = 0,
                       progress: bool = False) -> list[str]:
    """One answer per prompt (a list of messages). temperature 0 = greedy decoding."""
    from transformers import GenerationConfig

    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; cannot batch generation")
    sampling = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=pad_id,
                              eos_token_id=tokenizer.eos_token_id,
                              **({"temperature": temperature, "top_p": top_p} if sampling else {}))
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    encoded = [prompt_token_ids(tokenizer, prompt, max_prompt_length) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating", unit="batch")
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            width = max(len(encoded[i]) for i in batch)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)
            for row, i in enumerate(batch):
                answers[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers
