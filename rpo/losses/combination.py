"""Weighted sums of losses: "rpo+0.2*sft" or, from YAML, a list of (name, weight[, options]) terms.

loss = Σ_k w_k · loss_k. Metrics: `loss/<term>` (each term's unweighted loss) plus every term's own metrics under
their names; when two terms report the same metric name, the later term's copy is named `<term>/<metric>`.
This module parses a combination, shares the options out to its terms and sums the built terms;
rpo.losses.build builds each term.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from rpo.losses.base import LossConfigError, LossOutput
from rpo.losses.registry import Loss, option_names

# "+" separates terms, except inside a float exponent such as 1e+3.
_TERM_SPLIT = re.compile(r"(?<![0-9][eE])\+")
_TERM = re.compile(r"\s*(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[^*\s][^*]*?)\s*")
_WEIGHT_PREFIX = re.compile(r"\s*[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?\s*\*")


def is_combination(spec: str) -> bool:
    return "+" in spec or bool(_WEIGHT_PREFIX.match(spec))


def parse_combination(spec: str) -> List[Tuple[str, float]]:
    """"rpo+0.2*sft" -> [("rpo", 1.0), ("sft", 0.2)]."""
    terms = []
    for part in _TERM_SPLIT.split(spec):
        match = _TERM.fullmatch(part)
        if not match:
            raise LossConfigError(f"cannot parse loss combination {spec!r} at term {part.strip()!r}: write terms as "
                                  f"NAME or WEIGHT*NAME joined by '+', e.g. 'rpo+0.2*sft'")
        terms.append((match["name"], float(match["weight"]) if match["weight"] else 1.0))
    return terms


def normalise_terms(terms: Sequence[Any]) -> List[Tuple[str, float, Dict[str, Any]]]:
    """Accept (name, weight), (name, weight, options) and {"name", "weight", "options"} terms."""
    normalised = []
    for index, term in enumerate(terms):
        if isinstance(term, Mapping):
            unknown = set(term) - {"name", "weight", "options"}
            if "name" not in term or unknown:
                raise LossConfigError(f"loss combination term {index}: expected keys name, weight (default 1), "
                                      f"options (default {{}}), got {dict(term)!r}")
            name, weight, options = term["name"], term.get("weight", 1.0), term.get("options") or {}
        elif isinstance(term, (list, tuple)) and len(term) in (2, 3):
            name, weight = term[0], term[1]
            options = term[2] if len(term) == 3 else {}
        else:
            raise LossConfigError(f"loss combination term {index}: expected [name, weight] or [name, weight, "
                                  f"options], got {term!r}")
        if not isinstance(name, str) or not name.strip():
            raise LossConfigError(f"loss combination term {index}: the name must be a string, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise LossConfigError(f"loss combination term {index} ({name}): the weight must be a number, got "
                                  f"{weight!r}")
        if not isinstance(options, Mapping):
            raise LossConfigError(f"loss combination term {index} ({name}): options must be a mapping, got "
                                  f"{options!r}")
        normalised.append((name.strip(), float(weight), dict(options)))
    if not normalised:
        raise LossConfigError("a loss combination needs at least one term")
    return normalised


class WeightedSum:
    """The callable of a combined `Loss`: Σ_k w_k · loss_k with merged metrics."""

    def __init__(self, terms: Sequence[Tuple[str, float, Loss]]):
        self.terms = tuple(terms)
        self.requires = frozenset().union(*(loss.requires for _, _, loss in self.terms))
        self.optional = frozenset().union(*(loss.optional for _, _, loss in self.terms)) - self.requires
        self.is_global = any(loss.is_global for _, _, loss in self.terms)
        self.needs_pairs = any(loss.needs_pairs for _, _, loss in self.terms)

    def __call__(self, **batch: Any) -> LossOutput:
        total = global_total = None
        metrics: Dict[str, torch.Tensor] = {}
        for name, weight, loss in self.terms:
            output = loss._evaluate(batch)  # the combined Loss already checked the batch once
            total = weight * output.loss if total is None else total + weight * output.loss
            if output.global_loss is not None:
                weighted = weight * output.global_loss
                global_total = weighted if global_total is None else global_total + weighted
            metrics[f"loss/{name}"] = output.loss.detach()
            for key, value in output.metrics.items():
                metrics[key if key not in metrics else f"{name}/{key}"] = value
        return LossOutput(loss=total, metrics=metrics, global_loss=global_total)


def spec_text(terms: Sequence[Tuple[str, float, Any]]) -> str:
    return "+".join(name if weight == 1.0 else f"{weight:g}*{name}" for name, weight, _ in terms)


def check_terms(terms: Sequence[Tuple[str, float, Any]]) -> None:
    """Each term once, none itself a combination."""
    names = [name for name, _, _ in terms]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise LossConfigError(f"loss combination {spec_text(terms)!r}: term {', '.join(duplicates)} appears "
                              f"more than once; merge the weights")
    for name in names:
        if is_combination(name):
            raise LossConfigError(f"loss combination term {name!r} is itself a combination; flatten it")


def share_options(terms: Sequence[Tuple[str, float, Mapping[str, Any]]], factories: Sequence[Any],
                  options: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Each term's options: `NAME={...}` goes to the term NAME only, every other option to each term whose factory
    accepts it (an option no term accepts is an error), and a term's own options (from a YAML list) win."""
    names = [name for name, _, _ in terms]
    per_term = {key: value for key, value in options.items() if key in names}
    shared = {key: value for key, value in options.items() if key not in names}
    accepted = [option_names(factory) for factory in factories]
    orphans = [key for key in shared if all(names_ is not None and key not in names_ for names_ in accepted)]
    if orphans:
        described = "; ".join(f"{name}: {', '.join(sorted(a)) if a is not None else 'any'}"
                              for name, a in zip(names, accepted))
        raise LossConfigError(f"loss combination {spec_text(terms)!r}: no term has option "
                              f"{', '.join(map(repr, orphans))}. Term options: {described}. Pass NAME={{...}} to "
                              f"give options to one term.", option=orphans[0])
    out = []
    for (name, _, term_options), names_ in zip(terms, accepted):
        merged = {key: value for key, value in shared.items() if names_ is None or key in names_}
        extra = per_term.get(name, {})
        if not isinstance(extra, Mapping):
            raise LossConfigError(f"loss combination: options for term {name!r} must be a mapping, got {extra!r}")
        merged.update(term_options)
        merged.update(extra)
        out.append(merged)
    return out


def combine(built: Sequence[Tuple[str, float, Loss]]) -> Loss:
    """The combined Loss of built terms. Its `options` are those on which every term that takes them agrees."""
    agreed: Dict[str, Any] = {}
    conflicting = set()
    for _, _, term in built:
        for key, value in term.options.items():
            if key in agreed and agreed[key] != value:
                conflicting.add(key)
            agreed.setdefault(key, value)
    return Loss(spec_text(built), WeightedSum(built), {k: v for k, v in agreed.items() if k not in conflicting},
                terms=built)
