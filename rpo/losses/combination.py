"""Weighted sums of losses: "rpo+0.2*sft" or, from YAML, a list of (name, weight[, options]) terms.

loss = Σ_k w_k · loss_k. Metrics: `loss/<term>` (each term's unweighted loss) plus every term's own metrics under
their names; when two terms report the same metric name, the later term's copy is named `<term>/<metric>`.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from rpo.losses.base import LossConfigError, LossOutput
from rpo.losses.registry import Loss, instantiate, option_names, resolve_entry

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


def _normalise_terms(terms: Sequence[Any]) -> List[Tuple[str, float, Dict[str, Any]]]:
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
        self.couples_rows = any(loss.couples_rows for _, _, loss in self.terms)
        self.is_global = any(loss.is_global for _, _, loss in self.terms)

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


def _spec_text(terms: Sequence[Tuple[str, float, Any]]) -> str:
    return "+".join(name if weight == 1.0 else f"{weight:g}*{name}" for name, weight, _ in terms)


def build_combination(terms: Sequence[Any], options: Mapping[str, Any]) -> Loss:
    normalised = _normalise_terms(terms)
    names = [name for name, _, _ in normalised]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise LossConfigError(f"loss combination {_spec_text(normalised)!r}: term {', '.join(duplicates)} appears "
                              f"more than once; merge the weights")
    entries = []
    for name in names:
        if is_combination(name):
            raise LossConfigError(f"loss combination term {name!r} is itself a combination; flatten it")
        entries.append(resolve_entry(name))

    # Per-term options: `NAME={...}`; every other option goes to each term that accepts it.
    per_term = {key: value for key, value in options.items() if key in names}
    shared = {key: value for key, value in options.items() if key not in names}
    accepted = [option_names(entry.factory) for entry in entries]
    orphans = [key for key in shared if all(names_ is not None and key not in names_ for names_ in accepted)]
    if orphans:
        described = "; ".join(f"{name}: {', '.join(sorted(a)) if a is not None else 'any'}"
                              for name, a in zip(names, accepted))
        raise LossConfigError(f"loss combination {_spec_text(normalised)!r}: no term has option "
                              f"{', '.join(map(repr, orphans))}. Term options: {described}. Pass NAME={{...}} to "
                              f"give options to one term.")
    built = []
    for (name, weight, term_options), entry, names_ in zip(normalised, entries, accepted):
        merged = {key: value for key, value in shared.items() if names_ is None or key in names_}
        extra = per_term.get(name, {})
        if not isinstance(extra, Mapping):
            raise LossConfigError(f"loss combination: options for term {name!r} must be a mapping, got {extra!r}")
        merged.update(term_options)
        merged.update(extra)
        built.append((name, weight, instantiate(entry, merged)))
    fn = WeightedSum(built)
    loss = Loss(_spec_text(normalised), fn, {name: term.options for name, _, term in built})
    loss.terms = fn.terms
    return loss
