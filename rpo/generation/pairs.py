"""Preference rows from scored samples: paired (best vs worst of a prompt) or unpaired (a score threshold).

A sample enters a row only when it *ended* (the model produced its end-of-sequence token) and was scored. A
cut-off sample is never written as training data: the trainer renders every response as a finished turn (the chat
template's end-of-turn token follows it), so a cut-off text would teach the model to end where it was cut. Such
samples stay in samples.jsonl (``ended: false``) and are counted. So is an ended sample with an empty text
(``empty``: the end token came first), which the trainer's data loader rejects as a bad row.

Paired: per prompt, among its usable samples, the highest score is chosen and the lowest rejected (the lowest
sample index among equal scores); a prompt gives no pair when it has fewer than two usable samples
(ended, non-empty, scored: ``too_few_usable``) or when best − worst is 0 or below ``min_gap`` (``tied``). Unpaired: every usable sample,
labelled desirable above ``threshold`` and undesirable below it; a score equal to the threshold is dropped
(``at_threshold``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence


def _usable(sample: dict) -> bool:
    """Ended, non-empty and scored: what may be written as a training response."""
    return (bool(sample["ended"]) and bool(sample["text"].strip()) and sample["score"] is not None
            and math.isfinite(sample["score"]))


def _message(text: str) -> list:
    return [{"role": "assistant", "content": text}]


def _base_counts(samples: Sequence[dict]) -> dict:
    return {"prompts": len({s["prompt_index"] for s in samples}), "samples": len(samples),
            "ended": sum(1 for s in samples if s["ended"]), "cut_off": sum(1 for s in samples if not s["ended"]),
            "empty": sum(1 for s in samples if s["ended"] and not s["text"].strip()),
            "unscored": sum(1 for s in samples if s["score"] is None or not math.isfinite(s["score"]))}


def build_pairs(samples: Sequence[dict], prompts: Sequence, source_rows: Sequence[int],
                min_gap: float = 0.0) -> tuple[list[dict], dict]:
    """(rows, counts). ``samples``: dicts with prompt_index, sample_index, text, score (None = unscored), ended."""
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    by_prompt = defaultdict(list)
    for sample in samples:
        by_prompt[sample["prompt_index"]].append(sample)
    rows, tied, too_few = [], 0, 0
    for index in sorted(by_prompt):
        group = sorted(by_prompt[index], key=lambda s: s["sample_index"])
        usable = [s for s in group if _usable(s)]
        if len(usable) < 2:
            too_few += 1
            continue
        best = max(usable, key=lambda s: (s["score"], -s["sample_index"]))
        worst = min(usable, key=lambda s: (s["score"], s["sample_index"]))
        gap = best["score"] - worst["score"]
        if not gap > 0 or gap < min_gap:
            tied += 1
            continue
        rows.append({"prompt": prompts[index], "chosen": _message(best["text"]), "rejected": _message(worst["text"]),
                     "chosen_score": best["score"], "rejected_score": worst["score"],
                     "chosen_sample": best["sample_index"], "rejected_sample": worst["sample_index"],
                     "prompt_index": index, "source_row": source_rows[index],
                     "scores": [s["score"] for s in group], "ended": [bool(s["ended"]) for s in group]})
    counts = {**_base_counts(samples), "written": len(rows), "tied": tied, "too_few_usable": too_few,
              "min_gap": min_gap}
    return rows, counts


def build_unpaired(samples: Sequence[dict], prompts: Sequence, source_rows: Sequence[int],
                   threshold: float = 0.0) -> tuple[list[dict], dict]:
    """(rows, counts): every usable sample labelled by ``threshold`` (see the module docstring)."""
    rows, at_threshold = [], 0
    for sample in sorted(samples, key=lambda s: (s["prompt_index"], s["sample_index"])):
        if not _usable(sample):
            continue
        if sample["score"] == threshold:
            at_threshold += 1
            continue
        rows.append({"prompt": prompts[sample["prompt_index"]], "completion": _message(sample["text"]),
                     "label": sample["score"] > threshold, "score": sample["score"],
                     "prompt_index": sample["prompt_index"], "sample_index": sample["sample_index"],
                     "source_row": source_rows[sample["prompt_index"]]})
    desirable = sum(1 for r in rows if r["label"])
    counts = {**_base_counts(samples), "written": len(rows), "desirable": desirable,
              "undesirable": len(rows) - desirable, "at_threshold": at_threshold, "threshold": threshold}
    return rows, counts
