"""One place turns a loss spec and options into a `Loss`: `resolve_loss` (every entry point: the trainer,
rpo-eval, RPOTrainer, the benchmarks) and `build_loss` (the Python API).

A spec is a registered name, a plugin ("path.py[:name]", "pkg.module:factory"; rpo.losses.registry) or a weighted
combination ("rpo+0.2*sft", or a list of (name, weight[, options]) terms; rpo.losses.combination). Every term's
options are checked once, by its factory. What depends on the run, and nothing else, is resolved here:

- unpaired data (`paired=False`): a term that takes `tau` and was given none gets UNPAIRED_TAU (the paper's 0.75;
  paired data keeps the loss's own default, 0.5), and a term defined on pairs only (`needs_pairs`: dpo, ipo,
  simpo, rpo-z, diagonal weighting) is refused;
- `default_beta`: a β from another configuration (TRL's DPOConfig.beta) for every term that takes a beta and was
  given none.

Defaults that depend on another option of the same loss (the weight normalisation of a global contrast, the
diagonal's α) are the loss's own (rpo.losses.contrast_matrix) and appear in `Loss.options`. No default depends
on how the run is laid out (data- or tensor-parallel sizes, micro-batches, world size).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from rpo.losses.base import LossConfigError
from rpo.losses.combination import (check_terms, combine, is_combination, normalise_terms, parse_combination,
                                   share_options)
from rpo.losses.registry import FILE_SPEC, REGISTRY, Loss, instantiate, option_names, resolve_entry

# τ of the prompt-similarity weights for unpaired data when none is given (the paper's suggestion).
UNPAIRED_TAU = 0.75

Spec = Union[str, Sequence[Any]]


def _terms(spec: Spec) -> Tuple[List[Tuple[str, float, Dict[str, Any]]], bool]:
    """(terms, whether the spec is a single loss)."""
    if isinstance(spec, (list, tuple)):
        return normalise_terms(spec), False
    if not isinstance(spec, str) or not spec.strip():
        raise LossConfigError(f"expected a loss name (a string) or a list of (name, weight) terms, got {spec!r}")
    spec = spec.strip()
    if spec not in REGISTRY and not FILE_SPEC.fullmatch(spec) and is_combination(spec):
        return [(name, weight, {}) for name, weight in parse_combination(spec)], False
    return [(spec, 1.0, {})], True


def _run_defaults(factory, options: Mapping[str, Any], paired: bool,
                  default_beta: Optional[float]) -> Dict[str, Any]:
    accepted = option_names(factory) or frozenset()  # a **kwargs factory: its defaults are its own
    options = dict(options)
    if not paired and "tau" in accepted and "tau" not in options:
        options["tau"] = UNPAIRED_TAU
    if default_beta is not None and "beta" in accepted and "beta" not in options:
        options["beta"] = default_beta
    return options


def resolve_loss(spec: Spec, options: Optional[Mapping[str, Any]] = None, *, paired: bool = True,
                 default_beta: Optional[float] = None) -> Loss:
    """The loss of a run: `spec` with `options` (for a combination, shared out as `build_loss` says) and the run's
    defaults (the module docstring). Raises LossConfigError naming the loss and, where there is one, the option.

    paired:        False for unpaired data (prompt, completion, label)
    default_beta:  a β from another configuration, for terms given none (None: the losses' own defaults)
    """
    terms, single = _terms(spec)
    if not single:
        check_terms(terms)
    entries = [resolve_entry(name) for name, _, _ in terms]
    options = dict(options or {})
    term_options = [options] if single else share_options(terms, [entry.factory for entry in entries], options)
    built = []
    for (name, weight, _), entry, given in zip(terms, entries, term_options):
        loss = instantiate(entry, _run_defaults(entry.factory, given, paired, default_beta))
        if not paired and loss.needs_pairs:
            raise LossConfigError(
                f"loss {name!r} needs paired data (a chosen and a rejected answer of the same prompt), but the data "
                f"is unpaired (prompt, completion, label); for unpaired data use a loss such as 'rpo' (weighting "
                f"other than 'diagonal') or 'kto'")
        built.append((name, weight, loss))
    return built[0][2] if single else combine(built)


def build_loss(spec: Spec, **options: Any) -> Loss:
    """Build a loss by name with its options, for paired data (see `resolve_loss` for the run's defaults).

    For a combination (a "a+0.2*b" string or a list of (name, weight[, options]) terms), each option goes to every
    term whose factory accepts it, and `NAME={...}` passes options to the term NAME only; an option no term
    accepts is an error.
    """
    return resolve_loss(spec, options)
