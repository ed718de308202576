"""The loss registry: `register_loss`, `available_losses`, how a registered name, plugin file or module attribute
is found (`resolve_entry`), and the built `Loss` object.

A *factory* (a function or a class) is registered under a name; `instantiate(entry, options)` validates the
options against the factory's signature, calls it, and wraps the returned callable in a `Loss` that checks the
batch keywords, runs the loss and normalises its `LossOutput`. Turning a spec and options into a `Loss` (names,
combinations, the defaults that depend on the run) is `rpo.losses.build`'s job.

Names `resolve_entry` finds, in this order:
  1. a registered name: "rpo";
  2. a plugin file: "path/to/my_losses.py" (imports it once; its `register_loss` calls register its losses; it must
     register exactly one unless a name is picked) or "path/to/my_losses.py:name";
  3. a module attribute: "my_pkg.losses:my_loss" (imports my_pkg.losses; my_loss is a factory defined there or a
     name it registered).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple, Union

import torch

from rpo.losses.base import (BATCH_KEYWORDS, CHOSEN_KEYWORDS, EMBEDDING_KEYWORDS, KL_KEYWORDS, LENGTH_KEYWORDS,
                             REFERENCE_KEYWORDS, REJECTED_KEYWORDS, LossConfigError, LossInputError, LossOutput)

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
FILE_SPEC = re.compile(r"(?P<path>.+\.py)(?::(?P<attr>[A-Za-z0-9_][A-Za-z0-9_.\-]*))?")
_MODULE_SPEC = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z0-9_][A-Za-z0-9_.\-]*)")


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., Any]

    @property
    def origin(self) -> str:
        return f"{getattr(self.factory, '__module__', '?')}.{getattr(self.factory, '__qualname__', repr(self.factory))}"

    @property
    def identity(self) -> Tuple[str, str]:
        """(qualified name, source file): the same factory imported twice (as a module and as a plugin file, or
        after a reload) has the same identity, so registering it again is not a conflict."""
        try:
            source = str(Path(inspect.getsourcefile(self.factory)).resolve())
        except (TypeError, OSError):
            source = getattr(self.factory, "__module__", "?")
        return getattr(self.factory, "__qualname__", repr(self.factory)), source


REGISTRY: Dict[str, _Entry] = {}
_PLUGIN_FILES: Dict[Path, Tuple[Any, Tuple[str, ...]]] = {}  # resolved path -> (module, names it registered)


# --- registration ------------------------------------------------------------------------------------------------

def register_loss(name: str, *, override: bool = False):
    """Decorator registering a loss factory under `name`.

    The factory (function or class) is called with the loss's options and returns a callable that takes the batch
    keywords and returns a `LossOutput`. The callable may declare `requires` / `optional` (batch keyword names),
    `is_global`, `needs_pairs` and `options` attributes (see `Loss`); without them `requires` / `optional` are
    read from its keyword parameters (without / with a default) and `is_global` / `needs_pairs` are False.

    Registering a different factory under a taken name raises unless `override=True`; re-registering the same
    factory (same qualified name in the same source file, e.g. on a reload, or a plugin file that was also
    imported as a module) replaces the entry silently.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise LossConfigError(f"invalid loss name {name!r}: use letters, digits, '_', '-' and '.' (no '+', '*', ':', "
                              f"'/' or spaces: those are part of the combination and plugin syntax)")

    def decorator(factory):
        if not callable(factory):
            raise LossConfigError(f"register_loss({name!r}) decorates a function or class, got {factory!r}")
        entry = _Entry(name, factory)
        existing = REGISTRY.get(name)
        if existing is not None and existing.identity != entry.identity and not override:
            raise LossConfigError(f"loss name {name!r} is already registered by {existing.origin}; choose another "
                                  f"name or pass register_loss({name!r}, override=True)")
        REGISTRY[name] = entry
        return factory

    return decorator


def available_losses() -> list:
    """Sorted names of the registered losses (built-ins and the plugins imported so far)."""
    return sorted(REGISTRY)


# --- options -----------------------------------------------------------------------------------------------------

def _signature(obj) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return None


def option_names(factory) -> Optional[FrozenSet[str]]:
    """The option names a factory accepts, or None when it takes **kwargs (accepts any)."""
    signature = _signature(factory)
    if signature is None or any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return frozenset(p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                p.KEYWORD_ONLY))


def _describe_options(factory) -> str:
    signature = _signature(factory)
    if signature is None:
        return "(unknown)"
    parts = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in signature.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return ", ".join(parts) if parts else "(none)"


def _type_hints(factory) -> Dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations only disable the type checks, never the loss
        return {}


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce_option(loss: str, option: str, value: Any, hint: Any) -> Any:
    """Check `value` against the factory's annotation; strings (from a CLI) are converted to bool/int/float."""
    if hint is None or hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) != 1:
            return value
        hint, origin, args = non_none[0], typing.get_origin(non_none[0]), typing.get_args(non_none[0])
    bad = LossConfigError(f"loss {loss!r}: option {option} expects {getattr(hint, '__name__', hint)}, "
                          f"got {value!r}", option=option)
    if origin is typing.Literal:
        if value not in args:
            raise LossConfigError(f"loss {loss!r}: option {option} must be one of "
                                  f"{', '.join(repr(a) for a in args)}; got {value!r}", option=option)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if hint in (int, float):
        accepted = (int,) if hint is int else (int, float)  # an int option takes no float, a float one takes ints
        if isinstance(value, accepted) and not isinstance(value, bool):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str and not isinstance(value, str):
        raise bad
    return value


def _check_options(loss: str, factory, options: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Validate option names (from the signature) and types (from annotations).

    Returns (the options to call the factory with, all options including the factory's defaults).
    """
    accepted = option_names(factory)
    signature = _signature(factory)
    if accepted is not None:
        unknown = [key for key in options if key not in accepted]
        if unknown:
            hints = sorted({m for key in unknown for m in difflib.get_close_matches(key, accepted, n=1)})
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise LossConfigError(f"loss {loss!r} has no option {', '.join(map(repr, unknown))}{hint}; its options "
                                  f"are: {_describe_options(factory)}", option=unknown[0])
    all_options: Dict[str, Any] = {}
    if signature is not None:
        for p in signature.parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                if p.default is p.empty and p.name not in options:
                    raise LossConfigError(f"loss {loss!r} needs option {p.name!r}; its options are: "
                                          f"{_describe_options(factory)}", option=p.name)
                if p.default is not p.empty:
                    all_options[p.name] = p.default
            elif p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
                raise LossConfigError(f"loss {loss!r}: factory {factory!r} has a required positional-only "
                                      f"parameter {p.name!r}; options are passed by keyword")
    hints = _type_hints(factory)
    given = {key: _coerce_option(loss, key, value, hints.get(key)) for key, value in options.items()}
    all_options.update(given)
    return given, all_options


# --- the built loss ----------------------------------------------------------------------------------------------

def _declared_keywords(loss: str, fn) -> Tuple[FrozenSet[str], FrozenSet[str], Optional[FrozenSet[str]]]:
    """(requires, optional, parameters passed to fn or None for all) of a loss callable."""
    signature = _signature(fn)
    takes_all = signature is None or any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    named = {} if signature is None else {
        p.name: p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if signature is not None:
        positional_only = [p.name for p in signature.parameters.values()
                           if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)]
        if positional_only:
            raise LossConfigError(f"loss {loss!r}: the loss callable must take the batch by keyword, but "
                                  f"{', '.join(positional_only)} is positional-only")
    requires = getattr(fn, "requires", None)
    optional = getattr(fn, "optional", None)
    requires = frozenset(requires) if requires is not None else frozenset(
        n for n, p in named.items() if p.default is p.empty)
    optional = frozenset(optional) if optional is not None else frozenset(
        n for n, p in named.items() if p.default is not p.empty)
    passed = None if takes_all else frozenset(named)
    if passed is not None and not requires <= passed:
        raise LossConfigError(f"loss {loss!r} requires {', '.join(sorted(requires - passed))} but its callable "
                              f"does not accept them")
    return requires, optional - requires, passed


def _check_batch(loss: str, batch: Mapping[str, Any]) -> None:
    """Shapes of the known batch keywords: chosen rows [M], rejected rows [N], embeddings [rows, D], lengths > 0."""
    widths = {}
    for group, rows_name in ((CHOSEN_KEYWORDS, "M"), (REJECTED_KEYWORDS, "N"), (KL_KEYWORDS, "K")):
        first = None
        for key in group:
            if key not in batch:
                continue
            value = batch[key]
            if not isinstance(value, torch.Tensor):
                raise LossInputError(f"loss {loss!r}: batch keyword {key!r} must be a tensor, got "
                                     f"{type(value).__name__}")
            shape = f"[{rows_name}, D]" if key in EMBEDDING_KEYWORDS else f"[{rows_name}]"
            if value.dim() != (2 if key in EMBEDDING_KEYWORDS else 1):
                raise LossInputError(f"loss {loss!r}: batch keyword {key!r} must have shape {shape}, got "
                                     f"{tuple(value.shape)}")
            if key not in LENGTH_KEYWORDS and not value.is_floating_point():
                raise LossInputError(f"loss {loss!r}: batch keyword {key!r} must be a floating-point tensor, got "
                                     f"{value.dtype}")
            if first is None:
                first = (key, value.shape[0])
            elif value.shape[0] != first[1]:
                raise LossInputError(f"loss {loss!r}: batch keyword {key!r} has {value.shape[0]} rows but "
                                     f"{first[0]!r} has {first[1]}")
            if key in EMBEDDING_KEYWORDS:
                widths[key] = value.shape[1]
            if key in LENGTH_KEYWORDS and value.numel():
                bad = (value <= 0).nonzero().flatten()
                if bad.numel():
                    row = int(bad[0])
                    raise LossInputError(f"loss {loss!r}: batch keyword {key!r} must be > 0 (completion token "
                                         f"counts); row {row} is {value[row].item()} ({bad.numel()} such rows)")
    if len(set(widths.values())) > 1:
        raise LossInputError(f"loss {loss!r}: chosen_embeddings and rejected_embeddings have different widths "
                             f"({widths['chosen_embeddings']} vs {widths['rejected_embeddings']})")


def _normalise_output(loss: str, output: Any) -> LossOutput:
    if not isinstance(output, LossOutput):
        raise LossInputError(f"loss {loss!r} returned {type(output).__name__}; a loss callable must return "
                             f"rpo.losses.LossOutput(loss=..., metrics={{...}})")
    value = output.loss
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise LossInputError(f"loss {loss!r}: LossOutput.loss must be a 0-dim floating-point tensor, got {shape}")
    metrics = {}
    for key, metric in (output.metrics or {}).items():
        if not isinstance(key, str):
            raise LossInputError(f"loss {loss!r}: metric names must be strings, got {key!r}")
        if isinstance(metric, torch.Tensor):
            if metric.numel() != 1:
                raise LossInputError(f"loss {loss!r}: metric {key!r} must be a scalar, got shape "
                                     f"{tuple(metric.shape)}")
            metrics[key] = metric.detach().to(device=value.device, dtype=torch.float32).reshape(())
        elif isinstance(metric, (int, float)):
            metrics[key] = torch.tensor(float(metric), dtype=torch.float32, device=value.device)
        else:
            raise LossInputError(f"loss {loss!r}: metric {key!r} must be a number or a 0-dim tensor, got "
                                 f"{type(metric).__name__}")
    global_loss = output.global_loss
    if global_loss is not None and not (isinstance(global_loss, torch.Tensor) and global_loss.dim() == 0
                                        and global_loss.is_floating_point()):
        shape = tuple(global_loss.shape) if isinstance(global_loss, torch.Tensor) else type(global_loss).__name__
        raise LossInputError(f"loss {loss!r}: LossOutput.global_loss must be None or a 0-dim floating-point "
                             f"tensor, got {shape}")
    return LossOutput(loss=value, metrics=metrics, global_loss=global_loss)


class Loss:
    """A built loss: call it with the batch keywords; returns a `LossOutput` with float32 0-dim metrics.

    What an entry point reads (it never looks inside a loss):
      name             how it was asked for ("rpo", "rpo+0.2*sft", "my_pkg.losses:my_loss", ...)
      terms            its (name, weight, Loss) terms: a combination's, or ((name, 1.0, self),) for a single loss,
                       so one loop reads the options of either
      options          every option with the value it trains with (the factory's defaults and what the loss
                       resolved, e.g. the weight normalisation of a global contrast); for a combination, the
                       options on which all the terms that take them agree (per-term values: `terms`)
      option(name)     one option's value, for a single loss or a combination whose terms agree on it
      requires         batch keywords it needs (a missing one raises `LossInputError` naming it)
      optional         batch keywords it uses when given (e.g. KTO's kl_* log-probs, process_group)
      is_global        True when it contrasts over the process group passed as `process_group` (also for a
                       combination with such a term); its `LossOutput.global_loss` is then the global part, and a
                       trainer scoring a step in several micro-batches must score all of them first
                       (rpo.distributed.TwoPassContrast)
      needs_pairs      True when it is defined on (chosen_i, rejected_i) pairs of one prompt only
      needs_reference  True when it needs reference-model log-probs
      needs_embeddings True when it needs the prompt embeddings (chosen_embeddings, rejected_embeddings)
      uses_kl_pairs    True when it takes KTO's mismatched-pair log-probs
    """

    def __init__(self, name: str, fn: Callable[..., LossOutput], options: Mapping[str, Any],
                 terms: Optional[Sequence[Tuple[str, float, "Loss"]]] = None):
        self.name = name
        self._fn = fn
        self._terms = tuple(terms) if terms else ((name, 1.0, self),)
        resolved = getattr(fn, "options", None)
        self.options = {**options, **(dict(resolved) if isinstance(resolved, Mapping) else {})}
        self.requires, self.optional, self._passed = _declared_keywords(name, fn)
        self.is_global = bool(getattr(fn, "is_global", False))
        self.needs_pairs = bool(getattr(fn, "needs_pairs", False))

    @property
    def terms(self) -> Tuple[Tuple[str, float, "Loss"], ...]:
        return self._terms

    def option(self, key: str) -> Any:
        """The value of option `key`: a LossConfigError when no term takes it or the terms disagree."""
        values = {name: term.options[key] for name, _, term in self.terms if key in term.options}
        if not values:
            raise LossConfigError(f"loss {self.name!r} has no option {key!r}", option=key)
        distinct = {repr(value) for value in values.values()}
        if len(distinct) > 1:
            described = ", ".join(f"{name}: {value!r}" for name, value in values.items())
            raise LossConfigError(f"loss {self.name!r}: its terms set option {key!r} differently ({described}); "
                                  f"read it per term from loss.terms", option=key)
        return next(iter(values.values()))

    def describe(self) -> Dict[str, Any]:
        """{"loss": name, "terms": [{"name", "weight", "options"}]}: what a run trained with, as plain data."""
        return {"loss": self.name, "terms": [{"name": name, "weight": weight, "options": dict(term.options)}
                                             for name, weight, term in self.terms]}

    @property
    def needs_embeddings(self) -> bool:
        return bool(self.requires & EMBEDDING_KEYWORDS)

    @property
    def needs_reference(self) -> bool:
        return bool(self.requires & REFERENCE_KEYWORDS)

    @property
    def uses_kl_pairs(self) -> bool:
        """True when it takes the policy and reference log-probs of mismatched (prompt, completion) pairs
        (KTO's reference point z; rpo.data.kto_pairs builds them)."""
        return frozenset(KL_KEYWORDS) <= self.optional | self.requires

    @property
    def accepted_keywords(self) -> FrozenSet[str]:
        return frozenset(BATCH_KEYWORDS) | self.requires | self.optional

    def __call__(self, **batch: Any) -> LossOutput:
        unknown = sorted(set(batch) - self.accepted_keywords)
        if unknown:
            raise LossInputError(f"loss {self.name!r}: unknown batch keyword(s) {', '.join(map(repr, unknown))}; "
                                 f"valid: {', '.join(sorted(self.accepted_keywords))}")
        present = {key: value for key, value in batch.items() if value is not None}
        _check_batch(self.name, present)
        return self._evaluate(present)

    def _evaluate(self, present: Mapping[str, Any]) -> LossOutput:
        """Run on an already checked batch (None values removed): missing keywords, call, normalise."""
        missing = sorted(self.requires - set(present))
        if missing:
            raise LossInputError(f"loss {self.name!r} needs batch keyword(s) {', '.join(map(repr, missing))} "
                                 f"(missing or None); it requires: {', '.join(sorted(self.requires))}")
        arguments = dict(present) if self._passed is None else {
            key: value for key, value in present.items() if key in self._passed}
        return _normalise_output(self.name, self._fn(**arguments))

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"Loss({self.name!r}{', ' if options else ''}{options})"


# --- resolution --------------------------------------------------------------------------------------------------

def _unknown_name_error(spec: str) -> LossConfigError:
    close = difflib.get_close_matches(spec, list(REGISTRY), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return LossConfigError(
        f"unknown loss {spec!r}.{hint} Registered losses: {', '.join(available_losses())}. Other forms: "
        f"'pkg.module:factory', 'path/to/plugin.py' or 'path/to/plugin.py:name', and weighted combinations such as "
        f"'rpo+0.2*sft'.")


def _import_plugin_file(path_text: str) -> Tuple[Any, Tuple[str, ...]]:
    """Import a plugin file once (cached by resolved path); return (module, names registered by it)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise LossConfigError(f"loss plugin file {path_text!r} not found (relative paths are resolved against the "
                              f"working directory {os.getcwd()})")
    key = path.resolve()
    if key in _PLUGIN_FILES:
        return _PLUGIN_FILES[key]
    digest = hashlib.sha1(str(key).encode()).hexdigest()[:10]
    module_name = f"rpo_loss_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', key.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, key)
    module = importlib.util.module_from_spec(spec)
    before = set(REGISTRY)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up while it executes
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise LossConfigError(f"importing loss plugin file {str(path)!r} failed: {type(error).__name__}: {error}") \
            from error
    names = tuple(sorted(name for name, entry in REGISTRY.items()
                         if name not in before or getattr(entry.factory, "__module__", None) == module_name))
    _PLUGIN_FILES[key] = (module, names)
    return module, names


def _entry_from_module(module, attr: str, origin: str, registered_there: Sequence[str]) -> _Entry:
    obj = getattr(module, attr, None)
    if obj is not None and callable(obj):
        for entry in REGISTRY.values():
            if entry.factory is obj:
                return entry
        return _Entry(f"{origin}:{attr}", obj)
    if attr in REGISTRY:
        return REGISTRY[attr]
    raise LossConfigError(f"{origin!r} has no loss factory or registered loss named {attr!r}; it registers: "
                          f"{', '.join(registered_there) or '(none)'}")


def _module_registered(module_name: str) -> list:
    return sorted(name for name, entry in REGISTRY.items()
                  if getattr(entry.factory, "__module__", "") == module_name)


def resolve_entry(spec: str) -> _Entry:
    """Resolve a single (non-combination) loss spec to its registry entry (see the module docstring)."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    file_match = FILE_SPEC.fullmatch(spec)
    if file_match:
        module, names = _import_plugin_file(file_match["path"])
        attr = file_match["attr"]
        if attr is not None:
            return _entry_from_module(module, attr, file_match["path"], names)
        if len(names) != 1:
            raise LossConfigError(
                f"loss plugin file {file_match['path']!r} registers {len(names)} losses "
                f"({', '.join(names) or 'none: decorate a factory with @register_loss(name)'})"
                + (f"; pick one with '{file_match['path']}:NAME'" if names else ""))
        return REGISTRY[names[0]]
    module_match = _MODULE_SPEC.fullmatch(spec)
    if module_match:
        try:
            module = importlib.import_module(module_match["module"])
        except ImportError as error:
            raise LossConfigError(f"loss {spec!r}: cannot import module {module_match['module']!r} ({error})") \
                from error
        return _entry_from_module(module, module_match["attr"], module_match["module"],
                                  _module_registered(module.__name__))
    raise _unknown_name_error(spec)


def instantiate(entry: _Entry, options: Mapping[str, Any]) -> Loss:
    given, all_options = _check_options(entry.name, entry.factory, options)
    try:
        fn = entry.factory(**given)
    except LossConfigError:
        raise
    except (TypeError, ValueError) as error:  # a user factory's own option checks: one error type for callers
        raise LossConfigError(f"loss {entry.name!r}: {error}") from error
    if not callable(fn):
        raise LossConfigError(f"loss {entry.name!r}: its factory returned {type(fn).__name__}, not a callable")
    return Loss(entry.name, fn, all_options)
