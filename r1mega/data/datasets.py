"""Prompt datasets from JSONL and Parquet files.

A row is an object with ``prompt`` (string, required), ``kind`` (task type, default ``math``;
``task`` is accepted as a synonym), optional ``metadata``, and the reference the rewards check:
either a ``reference`` object, or its fields at top level (``answer``; ``tests`` + ``entry_point``;
``numbers`` + ``target``; ``items`` + ``forbidden`` ...). A malformed row raises
:class:`BadRowError` naming file and line (``data.on_bad_row: error``) or is skipped and counted
in ``stats`` (``skip``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from r1mega.errors import UserFileError, UserValueError


@dataclass
class PromptRecord:
    prompt: str
    kind: str
    reference: dict
    metadata: dict = field(default_factory=dict)


class BadRowError(UserValueError):
    """A malformed data row; the message names file and line."""


# What each task kind's reward needs in the reference; checked at load time, so a broken row
# fails before training rather than scoring 0 forever.
REQUIRED_FIELDS = {
    "math": ("answer",), "arithmetic": ("answer",), "code": ("tests",),
    "countdown": ("numbers", "target"), "river_crossing": ("items",),
    "reasoning_gym": ("dataset", "entry"),
}
_NOT_REFERENCE = {"prompt", "kind", "task", "metadata", "reference", "id"}


def row_to_record(row, where: str) -> PromptRecord:
    if not isinstance(row, dict):
        raise BadRowError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRowError(f"{where}: 'prompt' must be a non-empty string (got {prompt!r:.60}).")
    kind = row.get("kind", row.get("task", "math"))
    if not isinstance(kind, str):
        raise BadRowError(f"{where}: 'kind' must be a string, got {kind!r:.60}.")
    if "reference" in row and row["reference"] is not None:
        reference = row["reference"]
        if not isinstance(reference, dict):
            raise BadRowError(f"{where}: 'reference' must be an object, got {reference!r:.60}.")
    else:
        reference = {k: v for k, v in row.items() if k not in _NOT_REFERENCE}
    missing = [f for f in REQUIRED_FIELDS.get(kind, ()) if reference.get(f) in (None, "")]
    if kind == "code" and missing == ["tests"] and reference.get("stdio"):
        missing = []  # standard-input tasks carry cases instead of test code
    if missing:
        raise BadRowError(f"{where}: kind '{kind}' needs {missing} (top level or in "
                          f"'reference'); the row has {sorted(reference)}.")
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BadRowError(f"{where}: 'metadata' must be an object, got {metadata!r:.60}.")
    if "id" in row:
        metadata = {**metadata, "id": row["id"]}
    return PromptRecord(prompt, kind, reference, metadata)


def _rows_jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except ValueError as exc:
                yield where, BadRowError(f"{where}: not valid JSON ({exc}).")


def _rows_parquet(path: str):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i + 1}", row


def read_rows(path: str, key: str = "data.source"):
    """(where, row) per row of a .jsonl/.json or .parquet file; a line that is not JSON comes as
    (where, BadRowError) so that the caller's bad-row policy decides."""
    if path.endswith(".parquet"):
        return _rows_parquet(path)
    if path.endswith((".jsonl", ".json")):
        return _rows_jsonl(path)
    raise UserValueError(f"{key}='{path}': expected a .jsonl or .parquet file (or .json, one object a line).")


def load_prompt_file(path: str, on_bad_row: str = "error", stats: dict | None = None,
                     key: str = "data.source") -> list:
    """All records of a .jsonl/.json (one object per line) or .parquet file; ``key`` names the
    config key that gave ``path`` in errors."""
    if on_bad_row not in ("error", "skip"):
        raise UserValueError(f"data.on_bad_row='{on_bad_row}': use 'error' or 'skip'.")
    if not os.path.exists(path):
        raise UserFileError(f"{key}='{path}' does not exist; give a .jsonl/.parquet path, "
                            f"or builtin:<task> / reasoning_gym:<name> for generated prompts.")
    rows = read_rows(path, key=key)
    stats = stats if stats is not None else {}
    stats.setdefault("bad_rows", 0)
    stats.setdefault("bad_row_errors", [])
    records = []
    for where, row in rows:
        try:
            if isinstance(row, BadRowError):
                raise row
            records.append(row_to_record(row, where))
        except BadRowError as exc:
            if on_bad_row == "error":
                raise BadRowError(f"{exc} Fix the row, or set data.on_bad_row=skip to skip and "
                                  "count such rows.") from None
            stats["bad_rows"] += 1
            if len(stats["bad_row_errors"]) < 20:
                stats["bad_row_errors"].append(str(exc))
    if not records:
        raise UserValueError(f"{key}='{path}' holds no usable rows "
                         f"({stats['bad_rows']} malformed).")
    return records
