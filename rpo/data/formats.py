"""Loading preference data sets and normalising them to one schema.

Every supported layout is turned into conversational rows:

* paired:   ``prompt`` (messages), ``chosen`` and ``rejected`` (assistant messages), ``source_row`` (int);
* unpaired: ``prompt`` (messages), ``completion`` (assistant messages), ``label`` (bool), ``source_row``.

A message is ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``. Rows that cannot be normalised
raise :class:`BadRowError` naming file, row and field (strict, the default) or are skipped and counted by reason
(``skip_bad_rows=True``). See docs/data.md for the formats and options.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

PAIRED = "paired"
UNPAIRED = "unpaired"
ROLES = ("system", "user", "assistant", "tool")
TARGET_FIELDS = ("prompt", "chosen", "rejected", "completion", "label")

# Reasons a row is rejected (strict) or skipped (skip_bad_rows=True); the report counts rows per reason.
UNPARSEABLE_JSON = "unparseable_json"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_ROLE = "bad_role"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
UNPARSEABLE_TRANSCRIPT = "unparseable_transcript"
IDENTICAL_RESPONSES = "identical_responses"
BAD_ROW_REASONS = (UNPARSEABLE_JSON, MISSING_FIELD, WRONG_TYPE, BAD_ROLE, EMPTY_PROMPT, EMPTY_RESPONSE,
                   UNPARSEABLE_TRANSCRIPT, IDENTICAL_RESPONSES)

_JSON_SUFFIXES = (".jsonl", ".json")
_MESSAGES_FEATURE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_FEATURES = {
    PAIRED: datasets.Features({"prompt": _MESSAGES_FEATURE, "chosen": _MESSAGES_FEATURE,
                               "rejected": _MESSAGES_FEATURE, "source_row": datasets.Value("int64")}),
    UNPAIRED: datasets.Features({"prompt": _MESSAGES_FEATURE, "completion": _MESSAGES_FEATURE,
                                 "label": datasets.Value("bool"), "source_row": datasets.Value("int64")}),
}


class BadRowError(ValueError):
    """A row that cannot be normalised; the message names the file, the row (0-based) and the field."""

    def __init__(self, source: str, row: int, field: str, reason: str, detail: str, line: int | None = None):
        self.source, self.row, self.field, self.reason, self.detail, self.line = (
            source, row, field, reason, detail, line)
        where = f"{source}: row {row}" + (f" (line {line})" if line is not None else "")
        super().__init__(f"{where}, field '{field}': {detail} [{reason}]. Fix the row, or pass "
                         f"skip_bad_rows=True (CLI: --skip-bad-rows) to skip and count such rows.")


class EmptyDataError(ValueError):
    """A data file without a single row; the message names the file and what it holds instead."""

    def __init__(self, source: str | os.PathLike, what: str):
        self.source = str(source)
        super().__init__(f"{source}: the data file is empty ({what}): no preference rows to load")


class _RowProblem(Exception):
    """Raised while normalising one row; the loader adds the file and row number."""

    def __init__(self, field: str, reason: str, detail: str):
        super().__init__(detail)
        self.field, self.reason, self.detail = field, reason, detail


@dataclass
class LoadReport:
    """What happened to the rows of one load: read, kept, skipped by reason, and the input layouts seen."""

    source: str
    kind: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    # First few "file: row N" locations per reason, so a skipped row can be found again.
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    input_formats: Counter = field(default_factory=Counter)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        skipped = ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items())) or "none"
        formats = ", ".join(f"{name}={n}" for name, n in sorted(self.input_formats.items()))
        return (f"{self.source}: {self.kind} preference data, rows read {self.rows_read}, kept {self.rows_kept}, "
                f"skipped {self.rows_skipped} ({skipped}); input formats: {formats}")


class PreferenceDataset:
    """Normalised preference rows (a ``datasets.Dataset`` in ``rows``) plus their kind and load report."""

    def __init__(self, rows: datasets.Dataset, kind: str, report: LoadReport):
        if kind not in (PAIRED, UNPAIRED):
            raise ValueError(f"kind must be {PAIRED!r} or {UNPAIRED!r}, got {kind!r}")
        self.rows, self.kind, self.report = rows, kind, report

    @property
    def paired(self) -> bool:
        return self.kind == PAIRED

    @property
    def column_names(self) -> list[str]:
        return self.rows.column_names

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        return self.rows[key]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"PreferenceDataset(kind={self.kind!r}, rows={len(self)}, source={self.report.source!r})"


# ----------------------------------------------------------------------------------------------- column mapping

# A path segment is a key, a list index ("0"), or a list index read from another field of the same row:
# "{choice}" or "{1-choice}" (the other of two), as in OpenAI's TL;DR comparisons (summaries[choice]).
_PATH_SEGMENT = re.compile(r"\{[^{}]*\}|[^.{}]+")
_DYNAMIC_INDEX = re.compile(r"^\{(1-)?([^{}]+)\}$")


def _path_segments(path: str, target: str) -> list[str]:
    segments = _PATH_SEGMENT.findall(path)
    if not path or ".".join(segments) != path:
        raise ValueError(f"column mapping for {target!r}: cannot parse path {path!r} (expected dotted keys, list "
                         f"indices or {{field}} / {{1-field}} index references, e.g. 'summaries.{{choice}}.text')")
    for segment in segments:
        match = _DYNAMIC_INDEX.match(segment)
        if segment.startswith("{") and (match is None or not match.group(2).strip()):
            raise ValueError(f"column mapping for {target!r}: bad index reference {segment!r} in {path!r}")
    return segments


def parse_column_mapping(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Parse ``"prompt=info.post,chosen=summary_chosen,rejected=summary_rejected"`` (or validate a mapping).

    Keys are target fields (prompt, chosen, rejected, completion, label); values are dotted paths into the raw
    row. Raises ``ValueError`` naming the offending entry.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = [(str(k).strip(), str(v).strip()) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = []
        for entry in spec.split(","):
            if not entry.strip():
                continue
            if "=" not in entry:
                raise ValueError(f"column mapping entry {entry.strip()!r} has no '=' (expected target=path, "
                                 f"e.g. 'prompt=info.post')")
            target, path = entry.split("=", 1)
            items.append((target.strip(), path.strip()))
    else:
        raise TypeError(f"columns must be a 'target=path,...' string or a mapping, got {type(spec).__name__}")
    mapping: dict[str, str] = {}
    for target, path in items:
        if target not in TARGET_FIELDS:
            raise ValueError(f"column mapping: unknown target field {target!r}; expected one of {TARGET_FIELDS}")
        if target in mapping:
            raise ValueError(f"column mapping: target field {target!r} is mapped twice")
        if not path:
            raise ValueError(f"column mapping: empty path for target field {target!r}")
        _path_segments(path, target)
        mapping[target] = path
    return mapping


_MISSING = object()


def _resolve_path(row: Any, path: str, target: str) -> Any:
    """Follow ``path`` into ``row``; ``_MISSING`` when a key or index is absent."""
    value = row
    for segment in _path_segments(path, target):
        dynamic = _DYNAMIC_INDEX.match(segment)
        if dynamic:
            index = _resolve_path(row, dynamic.group(2).strip(), target)
            if index is _MISSING:
                return _MISSING
            if isinstance(index, bool) or not isinstance(index, int):
                raise _RowProblem(target, WRONG_TYPE, f"index field {dynamic.group(2)!r} of column path {path!r} "
                                                      f"is {type(index).__name__}, expected int")
            key: Any = 1 - index if dynamic.group(1) else index
        else:
            key = segment
        if isinstance(value, Mapping):
            if key not in value:
                return _MISSING
            value = value[key]
        elif isinstance(value, (list, tuple)):
            try:
                index = int(key)
            except ValueError:
                return _MISSING
            if not 0 <= index < len(value):
                return _MISSING
            value = value[index]
        else:
            return _MISSING
    return value


# ------------------------------------------------------------------------------------------- message handling

def messages_to_text(messages: Sequence[Mapping[str, str]]) -> str:
    """Render messages as one string: their contents joined by a blank line (roles dropped).

    Used for the prompt embeddings and for tokenizers without a chat template.
    """
    return "\n\n".join(message["content"] for message in messages)


# Anthropic HH-RLHF transcripts: "\n\nHuman: ...\n\nAssistant: ...". A marker starts the text or follows a blank
# line; a "Human:" elsewhere is ordinary text.
_HH_MARKER = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _is_transcript(text: str) -> bool:
    return text.lstrip().startswith("Human:") or "\n\nHuman:" in text


def parse_hh_transcript(text: str, field: str = "text") -> list[dict[str, str]]:
    """Split an HH-RLHF transcript into messages (contents stripped of surrounding whitespace)."""
    markers = list(_HH_MARKER.finditer(text))
    if not markers:
        raise _RowProblem(field, UNPARSEABLE_TRANSCRIPT, "no 'Human:'/'Assistant:' turn marker")
    preamble = text[:markers[0].start()]
    if preamble.strip():
        raise _RowProblem(field, UNPARSEABLE_TRANSCRIPT,
                          f"text before the first turn marker: {preamble.strip()[:40]!r}")
    messages = []
    for marker, following in zip(markers, markers[1:] + [None]):
        end = following.start() if following is not None else len(text)
        messages.append({"role": _HH_ROLES[marker.group(1)], "content": text[marker.end():end].strip()})
    return messages


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    """Validate a list of {role, content} messages (extra keys dropped)."""
    if not isinstance(value, (list, tuple)):
        raise _RowProblem(field, WRONG_TYPE, f"expected a string or a list of {{role, content}} messages, "
                                             f"got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _RowProblem(field, WRONG_TYPE, f"message {i} is {type(message).__name__}, expected an object "
                                                 f"with 'role' and 'content'")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise _RowProblem(field, MISSING_FIELD, f"message {i} has no {key!r}")
            if not isinstance(message[key], str):
                raise _RowProblem(field, WRONG_TYPE, f"message {i}: {key!r} is {type(message[key]).__name__}, "
                                                     f"expected str")
        if message["role"] not in ROLES:
            raise _RowProblem(field, BAD_ROLE, f"message {i} has role {message['role']!r}; expected one of {ROLES}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _is_blank(messages: list[dict[str, str]]) -> bool:
    return not any(message["content"].strip() for message in messages)


def _prompt_messages(value: Any) -> tuple[list[dict[str, str]], str]:
    """Prompt field -> (messages, input format)."""
    if isinstance(value, str):
        if _is_transcript(value):
            messages = parse_hh_transcript(value, "prompt")
            # HH-style prompts end with an empty "Assistant:" cue for the answer: not a turn.
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages.pop()
            form = "hh_transcript"
        else:
            messages, form = [{"role": "user", "content": value}], "standard"
    else:
        messages, form = _messages(value, "prompt"), "conversational"
    if _is_blank(messages):
        raise _RowProblem("prompt", EMPTY_PROMPT, "the prompt is empty")
    return messages, form


def _response_messages(value: Any, field: str) -> list[dict[str, str]]:
    messages = [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, field)
    _check_response(messages, field)
    return messages


def _check_response(messages: list[dict[str, str]], field: str) -> None:
    if _is_blank(messages):
        raise _RowProblem(field, EMPTY_RESPONSE, f"the {field} response is empty")
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise _RowProblem(field, BAD_ROLE, f"response message {i} has role {message['role']!r}; a response "
                                               f"holds assistant turns only")


def _split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[list, list, list, str]:
    """Chosen/rejected that both start with the prompt -> (prompt, chosen, rejected, input format)."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        if _is_transcript(chosen) or _is_transcript(rejected):
            for name, text in (("chosen", chosen), ("rejected", rejected)):
                if not _is_transcript(text):
                    other = "rejected" if name == "chosen" else "chosen"
                    raise _RowProblem(name, UNPARSEABLE_TRANSCRIPT,
                                      f"{other} is an HH transcript but {name} has no 'Human:' turn")
            chosen_messages = parse_hh_transcript(chosen, "chosen")
            rejected_messages = parse_hh_transcript(rejected, "rejected")
            for name, messages in (("chosen", chosen_messages), ("rejected", rejected_messages)):
                if not any(message["role"] == "assistant" for message in messages):
                    raise _RowProblem(name, UNPARSEABLE_TRANSCRIPT, "transcript has no 'Assistant:' turn")
            return (*_split_common_messages(chosen_messages, rejected_messages), "hh_transcript")
        return (*_split_common_text(chosen, rejected), "implicit_standard")
    if isinstance(chosen, str) or isinstance(rejected, str):
        name, value = ("rejected", rejected) if isinstance(chosen, str) else ("chosen", chosen)
        raise _RowProblem(name, WRONG_TYPE, f"{name} is {type(value).__name__} while the other response is "
                                            f"{'a list' if isinstance(chosen, str) else 'a string'}: both must "
                                            f"be strings or both lists of messages")
    chosen_messages, rejected_messages = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    return (*_split_common_messages(chosen_messages, rejected_messages), "implicit_conversational")


def _split_common_messages(chosen: list, rejected: list) -> tuple[list, list, list]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen == rejected:
        raise _RowProblem("rejected", IDENTICAL_RESPONSES, "chosen and rejected are identical")
    if shared == 0:
        raise _RowProblem("prompt", EMPTY_PROMPT, "chosen and rejected share no leading turns, so there is no "
                                                  "prompt to extract")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _split_common_text(chosen: str, rejected: str) -> tuple[list, list, list]:
    if chosen == rejected:
        raise _RowProblem("rejected", IDENTICAL_RESPONSES, "chosen and rejected are identical")
    shared = os.path.commonprefix([chosen, rejected])
    # Cut after the last whitespace of the shared prefix so no word is split between prompt and response.
    cut = max(shared.rfind(char) for char in (" ", "\n", "\t")) + 1
    prompt = chosen[:cut]
    if not prompt.strip():
        raise _RowProblem("prompt", EMPTY_PROMPT, "chosen and rejected share no leading text, so there is no "
                                                  "prompt to extract")
    return ([{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen[cut:]}],
            [{"role": "assistant", "content": rejected[cut:]}])


def _normalise_row(raw: Mapping[str, Any], kind: str, mapping: Mapping[str, str], has_prompt: bool
                   ) -> tuple[dict[str, Any], str]:
    """One raw row -> (normalised row, input format); raises _RowProblem."""
    if not isinstance(raw, Mapping):
        raise _RowProblem("<row>", UNPARSEABLE_JSON, f"row is {type(raw).__name__}, expected a JSON object")

    def get(target: str) -> Any:
        path = mapping.get(target, target)
        value = _resolve_path(raw, path, target)
        if value is _MISSING or value is None:
            where = f" (column path {path!r})" if path != target else ""
            raise _RowProblem(target, MISSING_FIELD, f"missing or null{where}")
        return value

    if kind == UNPAIRED:
        prompt, form = _prompt_messages(get("prompt"))
        completion = get("completion")
        if form == "hh_transcript" and isinstance(completion, str):
            completion = completion.strip()  # continues the transcript after "Assistant:" (see the paired case)
        completion = _response_messages(completion, "completion")
        label = get("label")
        if not isinstance(label, bool):
            raise _RowProblem("label", WRONG_TYPE, f"label is {type(label).__name__} {label!r}, expected a boolean")
        return {"prompt": prompt, "completion": completion, "label": label}, form

    if has_prompt:
        prompt, form = _prompt_messages(get("prompt"))
        chosen, rejected = get("chosen"), get("rejected")
        if form == "hh_transcript":
            # Responses continue the transcript after "Assistant:", so like its turns they are stripped.
            chosen, rejected = (value.strip() if isinstance(value, str) else value for value in (chosen, rejected))
        chosen = _response_messages(chosen, "chosen")
        rejected = _response_messages(rejected, "rejected")
        if chosen == rejected:
            raise _RowProblem("rejected", IDENTICAL_RESPONSES, "chosen and rejected are identical")
    else:
        prompt, chosen, rejected, form = _split_implicit_prompt(get("chosen"), get("rejected"))
        if _is_blank(prompt):
            raise _RowProblem("prompt", EMPTY_PROMPT, "the extracted prompt is empty")
        _check_response(chosen, "chosen")
        _check_response(rejected, "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, form


# -------------------------------------------------------------------------------------------------- sources

@dataclass
class _SourcePart:
    """One file (or loaded split) of a source: its name for messages, its column names and its raw rows."""

    name: str
    columns: set[str]
    rows: Iterable[tuple[int, int | None, Any]]  # (row index, line number or None, raw row or _RowProblem)


def _read_json_file(path: Path) -> _SourcePart:
    """Parse a JSON Lines file (or a JSON array) ourselves: row-level errors need the raw rows and line numbers,
    which Arrow's JSON reader (used by `datasets`) does not give for mixed-type or malformed rows."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        lines: list[str | _RowProblem] = text.splitlines()
    except UnicodeDecodeError as error:
        if raw.lstrip().startswith(b"["):  # one JSON value: nothing to skip, the file must be fixed
            raise ValueError(f"{path}: {_undecodable(raw, error)}; save the file as UTF-8") from None
        text = ""
        # JSON Lines: decode line by line, so that only the lines with undecodable bytes are bad rows.
        lines = [_decode_line(line) for line in raw.split(b"\n")]
        if lines and lines[-1] == "":
            lines.pop()
    rows: list[tuple[int, int | None, Any]] = []
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        rows = [(i, None, value) for i, value in enumerate(values)]
    else:
        for line_number, line in enumerate(lines, start=1):
            if isinstance(line, _RowProblem):
                rows.append((len(rows), line_number, line))
                continue
            if not line.strip():
                continue  # blank lines separate nothing in JSON Lines; they are not rows
            try:
                value: Any = json.loads(line)
            except json.JSONDecodeError as error:
                value = _RowProblem("<row>", UNPARSEABLE_JSON, f"invalid JSON: {error.msg} at column {error.colno}")
            rows.append((len(rows), line_number, value))
    if not rows:
        raise EmptyDataError(path, "an empty JSON array" if text.strip() else "only blank lines")
    key_counts: Counter = Counter()
    for _, _, value in rows:
        if isinstance(value, Mapping):
            key_counts.update(value.keys())
    # A column is what most rows have: a few bad rows that miss a key must not change the detected layout.
    columns = {key for key, count in key_counts.items() if 2 * count >= len(rows)}
    return _SourcePart(str(path), columns, rows)


def _undecodable(raw: bytes, error: UnicodeDecodeError) -> str:
    """Where undecodable bytes are: 'line L, column C: not UTF-8 text (byte 0xNN)'."""
    line = raw.count(b"\n", 0, error.start) + 1
    column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
    return f"line {line}, column {column}: not UTF-8 text (byte 0x{raw[error.start]:02x})"


def _decode_line(line: bytes) -> str | _RowProblem:
    line = line[:-1] if line.endswith(b"\r") else line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        return _RowProblem("<row>", UNPARSEABLE_JSON, f"not UTF-8 text: byte 0x{line[error.start]:02x} at column "
                                                      f"{error.start + 1}")


def _refuse_undecodable_text(path: Path) -> None:
    """A CSV file with bytes that are not UTF-8: one error naming the line (its rows cannot be skipped: a quoted
    field may span lines)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: {_undecodable(raw, error)}; save the file as UTF-8 (rows of a CSV file cannot be "
                         f"skipped)") from None


def _arrow_part(dataset: datasets.Dataset, name: str) -> _SourcePart:
    if len(dataset) == 0:
        raise EmptyDataError(name, f"0 rows; columns {dataset.column_names}")
    return _SourcePart(name, set(dataset.column_names), ((i, None, row) for i, row in enumerate(dataset)))


def _refuse_empty_file(path: Path) -> None:
    """A clear error for an empty file before a reader fails on it (pyarrow refuses a 0-row parquet file)."""
    if not path.is_file():
        return
    if path.stat().st_size == 0:
        raise EmptyDataError(path, "0 bytes")
    if path.suffix == ".parquet":
        import pyarrow.parquet

        metadata = pyarrow.parquet.read_metadata(path)
        if metadata.num_rows == 0:
            raise EmptyDataError(path, f"0 rows; columns {metadata.schema.names}")
    if path.suffix == ".csv":
        _refuse_undecodable_text(path)
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = list(itertools.islice((line for line in handle if line.strip()), 2))
        if len(lines) < 2:
            raise EmptyDataError(path, "a header line only" if lines else "only blank lines")


def _resolve_data_files(data_files: Any, split: str) -> list[str] | None:
    if data_files is None:
        return None
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise ValueError(f"data_files has no split {split!r} (splits: {sorted(data_files)})")
        data_files = data_files[split]
    return [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)


def _source_parts(source: str | os.PathLike, split: str, data_files: Any) -> list[_SourcePart]:
    path = Path(source).expanduser()
    files = _resolve_data_files(data_files, split)
    if path.is_file():
        files = [str(path)]
    elif path.is_dir() and files is None:
        # `datasets` resolves which files of the folder belong to the split (train.jsonl, data/test-*.parquet..).
        builder = datasets.load_dataset_builder(str(path))
        split_files = builder.config.data_files or {}
        if split not in split_files:
            raise ValueError(f"{path}: no files for split {split!r} (found splits: "
                             f"{sorted(str(s) for s in split_files)})")
        files = [str(f) for f in split_files[split]]
    elif path.is_dir():
        files = [str(f if Path(f).is_absolute() else path / f) for f in files]
    for f in files or ():
        _refuse_empty_file(Path(f))
    if files is not None and all(str(f).endswith(_JSON_SUFFIXES) and Path(f).is_file() for f in files):
        return [_read_json_file(Path(f)) for f in files]
    if files is not None and all(Path(f).is_file() for f in files):
        builder_name = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(Path(files[0]).suffix)
        if builder_name is None:
            raise ValueError(f"{files[0]}: unsupported file type (use .jsonl, .json, .parquet, .csv or .arrow)")
        return [_arrow_part(datasets.load_dataset(builder_name, data_files={split: [f]}, split=split), f)
                for f in files]
    if path.exists():
        raise ValueError(f"{path}: data_files {data_files!r} name no existing files")
    if path.suffix in (*_JSON_SUFFIXES, ".parquet", ".csv", ".arrow") or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such file or folder")
    # Not a local path: a Hub data set name (or a `datasets` builder with data_files).
    dataset = datasets.load_dataset(str(source), data_files=data_files, split=split)
    return [_arrow_part(dataset, f"{source}[{split}]")]


def _detect_layout(columns: set[str], mapping: Mapping[str, str], name: str) -> tuple[str, bool]:
    """(kind, has explicit prompt) from the fields a part provides."""
    fields = {target for target in TARGET_FIELDS if target in mapping or target in columns}
    paired = {"chosen", "rejected"} <= fields
    unpaired = {"completion", "label"} <= fields
    hint = ("expected prompt/chosen/rejected (paired), chosen/rejected with the prompt inside (implicit prompt) "
            "or prompt/completion/label (unpaired); map other column names with "
            "columns='prompt=...,chosen=...,rejected=...' (CLI: --columns)")
    if paired and unpaired:
        raise ValueError(f"{name}: ambiguous layout, it has both chosen/rejected and completion/label columns; "
                         f"pass columns= to pick the fields")
    if unpaired:
        if "prompt" not in fields:
            raise ValueError(f"{name}: unpaired data (completion/label) needs a 'prompt' column; {hint}")
        return UNPAIRED, True
    if paired:
        return PAIRED, "prompt" in fields
    raise ValueError(f"{name}: cannot detect the preference format from columns {sorted(columns)}; {hint}")


def load_preference_dataset(source: str | os.PathLike, split: str = "train", *,
                            columns: str | Mapping[str, str] | None = None, skip_bad_rows: bool = False,
                            data_files: Any = None) -> PreferenceDataset:
    """Load preference data from a .jsonl/.json/.parquet/.csv file, a folder, or a Hub data set name.

    The layout (paired, implicit-prompt paired incl. HH-RLHF transcripts, unpaired) is detected from the
    columns; ``columns`` maps other column names or nested paths (TL;DR style) onto prompt/chosen/rejected/
    completion/label. Bad rows raise :class:`BadRowError` unless ``skip_bad_rows``, which skips and counts them.
    A single file is taken as the requested split. The report is logged and kept in ``.report``.
    """
    mapping = parse_column_mapping(columns)
    parts = _source_parts(source, split, data_files)
    report = LoadReport(source=str(source))
    kept_rows: list[dict[str, Any]] = []
    for part in parts:
        kind, has_prompt = _detect_layout(part.columns, mapping, part.name)
        if report.kind and kind != report.kind:
            raise ValueError(f"{part.name}: {kind} data, but earlier files of {source} are {report.kind}")
        report.kind = kind
        for row_index, line, raw in part.rows:
            report.rows_read += 1
            try:
                if isinstance(raw, _RowProblem):
                    raise raw
                row, form = _normalise_row(raw, kind, mapping, has_prompt)
            except _RowProblem as problem:
                error = BadRowError(part.name, row_index, problem.field, problem.reason, problem.detail, line)
                if not skip_bad_rows:
                    raise error from None
                report.skipped[problem.reason] += 1
                examples = report.skipped_examples.setdefault(problem.reason, [])
                if len(examples) < 5:
                    examples.append((f"{part.name}: " if len(parts) > 1 else "") + f"row {row_index}"
                                    + (f" (line {line})" if line is not None else ""))
                logger.debug("skipping bad row: %s", error)
                continue
            row["source_row"] = row_index
            report.input_formats[form] += 1
            kept_rows.append(row)
    if not report.kind:
        raise ValueError(f"{source}: no data files found for split {split!r}")
    report.rows_kept = len(kept_rows)
    if not kept_rows:
        raise ValueError(f"{report.summary()}: no rows left")
    rows = datasets.Dataset.from_list(kept_rows, features=_FEATURES[report.kind])
    logger.info("%s", report.summary())
    if report.rows_skipped:
        logger.warning("%s: skipped %d bad rows: %s", source, report.rows_skipped, "; ".join(
            f"{reason} x{report.skipped[reason]} (e.g. {', '.join(examples)})"
            for reason, examples in sorted(report.skipped_examples.items())))
    return PreferenceDataset(rows, report.kind, report)
