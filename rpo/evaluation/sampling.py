"""K samples per prompt from a causal LM, batched through Hugging Face ``generate`` (KV cache), seeded per sample.

Every sample (prompt i, sample k) draws its tokens from its own random stream, seeded by (seed, i, k): a sample
does not depend on which batch, rank or run produced it, so a sharded run equals a single-process one and an
interrupted run can be resumed. Sampling is done by a logits processor (:class:`SeededSampler`) inside greedy
``generate``: it draws the token from the model's distribution (temperature, nucleus ``top_p``) by inverse CDF
with the sample's own uniform draw, records log π(token) of the model at temperature 1 (what training scores),
and leaves only that token for ``generate`` to pick.

A sample *ended* when the model produced an end-of-sequence token (kept in ``token_ids``) within
``max_new_tokens``; otherwise it was cut off. ``logp`` sums log π over ``token_ids``.

Batches (:func:`plan_batches`) keep a prompt's samples together, longest prompts first, in a fixed order: batch
b goes to rank b mod world size, and every batch is computed the same whatever the number of ranks.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from rpo.evaluation.generation import prompt_token_ids

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    token_ids: list  # generated tokens, with the end-of-sequence token when the sample ended
    text: str  # the decoded response (special tokens skipped, stripped)
    ended: bool  # the model ended it (an end-of-sequence token) within max_new_tokens
    logp: float  # sum of log pi(token) over token_ids, the model at temperature 1

    def to_dict(self) -> dict:
        return asdict(self)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The random stream of one sample: a stable 63-bit hash of (seed, prompt, sample)."""
    digest = hashlib.sha256(f"rpo-sample:{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededSampler:
    """A ``generate`` logits processor: draws each row's next token from its own generator (see module doc)."""

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = list(generators), float(temperature), float(top_p)
        self.step_logps: list[torch.Tensor] = []  # [rows] float64 per step
        self.step_tokens: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.detach().to(torch.float64).cpu()
        log_probs = torch.log_softmax(logits, dim=-1)
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        if self.temperature == 0:
            tokens = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            if self.top_p < 1.0:
                sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
                before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
                sorted_probs = torch.where(before < self.top_p, sorted_probs, torch.zeros_like(sorted_probs))
                cdf = sorted_probs.cumsum(dim=-1)
                picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).clamp_max(cdf.shape[-1] - 1)
                tokens = order.gather(-1, picked).squeeze(-1)
            else:
                cdf = probs.cumsum(dim=-1)
                tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).clamp_max(
                    cdf.shape[-1] - 1).squeeze(-1)
                # A token of probability 0 is never drawn (searchsorted could land on one only at equal cdf values).
                tokens = torch.where(probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) > 0, tokens,
                                     probs.argmax(dim=-1))
        self.step_tokens.append(tokens)
        self.step_logps.append(log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, tokens.to(scores.device).unsqueeze(-1), 0.0)
        return forced


def end_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the tokenizer has no end-of-sequence token: a sample's end cannot be told from a cut")
    return sorted(ids)


def plan_batches(prompt_lengths: Sequence[int], samples_per_prompt: int, batch_size: int) -> list[list[tuple]]:
    """Batches of (prompt index, sample index) units: longest prompts first (ties by index), a prompt's samples in
    order, ``batch_size`` units each (the last may be smaller). The same for any number of ranks."""
    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"samples_per_prompt and batch_size must be >= 1, got {samples_per_prompt}, {batch_size}")
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    units = [(i, k) for i in order for k in range(samples_per_prompt)]
    return [units[start:start + batch_size] for start in range(0, len(units), batch_size)]


@torch.no_grad()
def sample_batch(model: torch.nn.Module, tokenizer: Any, units: Sequence[tuple], encoded: dict, *,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 end_ids: Optional[Sequence[int]] = None) -> list[Sample]:
    """One batch of samples: ``units`` are (prompt index, sample index), ``encoded`` maps a prompt index to its
    token ids (:func:`rpo.evaluation.prompt_token_ids`)."""
    from transformers import GenerationConfig, LogitsProcessorList

    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1; got {temperature}, {top_p}, "
                         f"{max_new_tokens}")
    end_ids = list(end_ids) if end_ids is not None else end_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    device = next(model.parameters()).device
    width = max(len(encoded[p]) for p, _ in units)
    input_ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(units), width), dtype=torch.long)
    for row, (p, _) in enumerate(units):  # left padding: every prompt ends where generation starts
        ids = encoded[p]
        input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    generators = [torch.Generator().manual_seed(sample_seed(seed, p, k)) for p, k in units]
    sampler = SeededSampler(generators, temperature, top_p)
    # Greedy over the sampler's one allowed token; nothing else may touch the logits (no penalties, no top-k).
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                              eos_token_id=end_ids, repetition_penalty=1.0, no_repeat_ngram_size=0)
    was_training = model.training
    model.eval()
    try:
        model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       generation_config=config, logits_processor=LogitsProcessorList([sampler]))
    finally:
        model.train(was_training)
    tokens = torch.stack(sampler.step_tokens, dim=1)  # [rows, steps]: the sampler's draws, before any padding
    logps = torch.stack(sampler.step_logps, dim=1)
    ends = set(end_ids)
    samples = []
    for row, (p, k) in enumerate(units):
        drawn = tokens[row].tolist()
        stop = next((t for t, token in enumerate(drawn) if token in ends), None)
        kept = drawn if stop is None else drawn[:stop + 1]
        text_ids = kept if stop is None else kept[:-1]
        samples.append(Sample(prompt_index=int(p), sample_index=int(k), token_ids=kept,
                              text=tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                              ended=stop is not None, logp=float(logps[row, :len(kept)].sum())))
    return samples


def encode_prompts(tokenizer: Any, prompts: Sequence[list], max_prompt_length: int) -> dict:
    return {i: prompt_token_ids(tokenizer, prompt, max_prompt_length) for i, prompt in enumerate(prompts)}


def sample_responses(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[list], *, samples_per_prompt: int,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                     max_prompt_length: int = 256, batch_size: int = 16, progress: bool = False,
                     batches: Optional[Iterable[list]] = None,
                     on_batch: Optional[Callable[[list], None]] = None) -> list[Sample]:
    """``samples_per_prompt`` samples of every prompt (a list of messages), sorted by (prompt, sample).

    ``batches``: the units to sample (default: all of :func:`plan_batches`); ``on_batch(samples)`` is called after
    each batch (the generation command writes and scores there)."""
    encoded = encode_prompts(tokenizer, prompts, max_prompt_length)
    if batches is None:
        batches = plan_batches([len(encoded[i]) for i in range(len(prompts))], samples_per_prompt, batch_size)
    batches = list(batches)
    end_ids = end_token_ids(tokenizer, model)
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="sampling", unit="batch", dynamic_ncols=True)
    samples: list[Sample] = []
    for units in iterator:
        batch = sample_batch(model, tokenizer, units, encoded, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, end_ids=end_ids)
        if on_batch is not None:
            on_batch(batch)
        samples += batch
    return sorted(samples, key=lambda s: (s.prompt_index, s.sample_index))


def sample_sequences(encoded: dict, samples: Sequence[Sample]) -> list[tuple[list, list]]:
    """(input ids, response mask) of every sample: the prompt's ids then the generated ones, for scoring the
    samples with :func:`rpo.evaluation.sequence_logprobs` (the reference's log-probs of the policy's samples)."""
    out = []
    for sample in samples:
        prompt = list(encoded[sample.prompt_index])
        out.append((prompt + list(sample.token_ids), [False] * len(prompt) + [True] * len(sample.token_ids)))
    return out
