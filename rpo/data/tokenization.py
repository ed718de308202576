"""Tokenising normalised preference rows: chat template, truncation, response masks.

Each sequence is prompt tokens followed by response tokens. The prompt is rendered with the tokenizer's chat
template (with the generation prompt), the response is what the template adds for the assistant turn(s); a
tokenizer without a chat template gets plain concatenation (see :func:`render_sequence_texts`). The prompt is
truncated from the left to ``max_prompt_length`` (the end of the conversation is kept), then the response from
the right so that prompt + response fit in ``max_length``. Truncated rows are counted, never dropped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets

from .formats import PAIRED, UNPAIRED, LoadReport, PreferenceDataset, messages_to_text
from rpo.progress import StageProgress, datasets_progress_bars
from rpo.manifest import read_manifest

logger = logging.getLogger(__name__)

RESPONSE_FIELDS = {PAIRED: ("chosen", "rejected"), UNPAIRED: ("completion",)}
_FORMAT_VERSION = 1


@dataclass
class TokenizeReport:
    rows: int
    sequences: int
    prompts_truncated: int  # rows whose prompt lost tokens on the left
    responses_truncated: int  # sequences whose response lost tokens on the right
    rows_truncated: int  # rows with any truncation
    chat_template: bool
    max_prompt_length: int
    max_length: int

    def summary(self) -> str:
        how = "chat template" if self.chat_template else "plain concatenation (tokenizer has no chat template)"
        return (f"tokenised {self.rows} rows / {self.sequences} sequences with {how}, max prompt "
                f"{self.max_prompt_length}, max length {self.max_length}: truncated rows {self.rows_truncated} "
                f"(prompts cut on the left {self.prompts_truncated}, responses cut on the right "
                f"{self.responses_truncated} sequences)")


class TokenizedPreferenceDataset:
    """Tokenised rows in ``rows`` (a ``datasets.Dataset``).

    Columns: the normalised ones (prompt, chosen/rejected or completion/label, source_row), ``prompt_length``,
    ``prompt_truncated`` and, per response field F (chosen, rejected | completion): ``F_input_ids`` (prompt +
    response token ids), ``F_loss_mask`` (True on response tokens), ``F_truncated``.
    """

    def __init__(self, rows: datasets.Dataset, kind: str, pad_token_id: int, report: TokenizeReport,
                 load_report: LoadReport | None = None):
        self.rows, self.kind, self.pad_token_id = rows, kind, pad_token_id
        self.report, self.load_report = report, load_report

    @property
    def paired(self) -> bool:
        return self.kind == PAIRED

    @property
    def response_fields(self) -> tuple[str, ...]:
        return RESPONSE_FIELDS[self.kind]

    def __len__(self) -> int:
        return len(self.rows)

    def sequence(self, index: int, response: str | None = None) -> tuple[list[int], list[bool]]:
        """(input_ids, loss_mask) of one row's sequence; ``response`` is chosen/rejected (paired) or completion."""
        response = response or self.response_fields[0]
        if response not in self.response_fields:
            raise ValueError(f"response must be one of {self.response_fields}, got {response!r}")
        row = self.rows[index]
        return row[f"{response}_input_ids"], row[f"{response}_loss_mask"]

    def save_to_disk(self, path: str | os.PathLike) -> None:
        """Save rows (``datasets`` format) and metadata; the prompt-embedding cache can live in path/embeddings."""
        path = Path(path)
        self.rows.save_to_disk(str(path / "rows"))
        meta = {"format_version": _FORMAT_VERSION, "kind": self.kind, "pad_token_id": self.pad_token_id,
                "report": asdict(self.report)}
        (path / "rpo_tokenized.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load_from_disk(cls, path: str | os.PathLike) -> TokenizedPreferenceDataset:
        path = Path(path)
        meta_path = path / "rpo_tokenized.json"
        meta = read_manifest(meta_path, version_key="format_version", version=_FORMAT_VERSION, label=str(meta_path),
                             missing=f"{path}: no rpo_tokenized.json; not a folder written by save_to_disk")
        return cls(datasets.load_from_disk(str(path / "rows")), meta["kind"], meta["pad_token_id"],
                   TokenizeReport(**meta["report"]))


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_sequence_texts(tokenizer: Any, prompt: list[Mapping[str, str]],
                          responses: Sequence[list[Mapping[str, str]]]) -> tuple[str, list[str]]:
    """(prompt text, one text per response); prompt text + response text is the whole sequence.

    With a chat template: the prompt rendered with the generation prompt; each response is the rest of the
    template applied to prompt + response (the shared prefix is taken, as some templates render the generation
    prompt differently from a finished turn). Without one: the message contents joined by a blank line
    (:func:`messages_to_text`), the prompt followed by a blank line; BOS/EOS are added at tokenisation.
    """
    if not has_chat_template(tokenizer):
        return messages_to_text(prompt) + "\n\n", [messages_to_text(response) for response in responses]
    prompt_text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    full_texts = [tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
                  for response in responses]
    shared = os.path.commonprefix([prompt_text, *full_texts])
    return shared, [text[len(shared):] for text in full_texts]


def _fingerprint(rows: datasets.Dataset, tokenizer: Any, max_prompt_length: int, max_length: int) -> str:
    # Given explicitly so `datasets` need not hash the tokenizer object.
    key = json.dumps([_FORMAT_VERSION, rows._fingerprint, getattr(tokenizer, "name_or_path", ""),
                      getattr(tokenizer, "chat_template", None), len(tokenizer), max_prompt_length, max_length],
                     default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def count_truncated_rows(rows: datasets.Dataset, kind: str) -> int:
    """Rows of tokenised ``rows`` whose prompt or any response was truncated."""
    flags = [list(rows["prompt_truncated"])] + [list(rows[f"{name}_truncated"]) for name in RESPONSE_FIELDS[kind]]
    return sum(any(row_flags) for row_flags in zip(*flags))


def tokenize_preference_dataset(dataset: PreferenceDataset, tokenizer: Any, *, max_prompt_length: int = 256,
                                max_length: int = 512, num_proc: int | None = None,
                                progress: bool = True) -> TokenizedPreferenceDataset:
    """Tokenise a :class:`PreferenceDataset` (defaults: the paper's 256 prompt / 512 total tokens).

    ``progress``: a progress bar (``datasets``'); False: none, a log line at least every 30 s instead (the
    trainer passes True on rank 0 only).
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if max_length <= max_prompt_length:
        raise ValueError(f"max_length ({max_length}) must exceed max_prompt_length ({max_prompt_length}) so "
                         f"every response keeps at least one token")
    fields = RESPONSE_FIELDS[dataset.kind]
    use_template = has_chat_template(tokenizer)
    bos = [] if use_template or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if use_template or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    source = dataset.report.source
    # Without a bar: log lines from inside the map; with num_proc, each worker logs its own share of the rows.
    workers = num_proc or 1
    log_progress = None if progress else StageProgress(
        f"tokenising {source}" + (f" (one of {workers} workers)" if workers > 1 else ""),
        -(-len(dataset.rows) // workers), progress=False, logger=logger)

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        prompt_texts, response_texts = [], []
        for j, index in enumerate(indices):
            try:
                prompt_text, texts = render_sequence_texts(tokenizer, batch["prompt"][j],
                                                           [batch[name][j] for name in fields])
            except Exception as error:  # jinja errors of a template that rejects this conversation
                raise ValueError(f"{source}: row {batch['source_row'][j]} (loaded row {index}): the tokenizer's "
                                 f"chat template failed: {error}") from error
            prompt_texts.append(prompt_text)
            response_texts.extend(texts)
        prompt_ids = tokenizer(prompt_texts, add_special_tokens=False, verbose=False)["input_ids"]
        response_ids = tokenizer(response_texts, add_special_tokens=False, verbose=False)["input_ids"]
        out: dict[str, list] = {"prompt_length": [], "prompt_truncated": []}
        for name in fields:
            out.update({f"{name}_input_ids": [], f"{name}_loss_mask": [], f"{name}_truncated": []})
        for j, index in enumerate(indices):
            prompt = bos + prompt_ids[j]
            if not prompt:
                raise ValueError(f"{source}: row {batch['source_row'][j]} (loaded row {index}): the prompt "
                                 f"tokenises to zero tokens")
            out["prompt_truncated"].append(len(prompt) > max_prompt_length)
            prompt = prompt[-max_prompt_length:]
            out["prompt_length"].append(len(prompt))
            for k, name in enumerate(fields):
                response = response_ids[j * len(fields) + k] + eos
                if not response:
                    raise ValueError(f"{source}: row {batch['source_row'][j]} (loaded row {index}): the {name} "
                                     f"response tokenises to zero tokens")
                budget = max_length - len(prompt)
                out[f"{name}_truncated"].append(len(response) > budget)
                response = response[:budget]
                out[f"{name}_input_ids"].append(prompt + response)
                out[f"{name}_loss_mask"].append([False] * len(prompt) + [True] * len(response))
        if log_progress is not None:
            log_progress.update(len(indices))
        return out

    with datasets_progress_bars(progress):
        rows = dataset.rows.map(tokenize_batch, batched=True, with_indices=True, num_proc=num_proc,
                                new_fingerprint=_fingerprint(dataset.rows, tokenizer, max_prompt_length, max_length),
                                desc=f"tokenising {source}")
    report = TokenizeReport(rows=len(rows), sequences=len(rows) * len(fields),
                            prompts_truncated=sum(rows["prompt_truncated"]),
                            responses_truncated=sum(sum(rows[f"{name}_truncated"]) for name in fields),
                            rows_truncated=count_truncated_rows(rows, dataset.kind), chat_template=use_template,
                            max_prompt_length=max_prompt_length, max_length=max_length)
    logger.info("%s: %s", source, report.summary())
    pad_token_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return TokenizedPreferenceDataset(rows, dataset.kind, pad_token_id, report, dataset.report)
