"""Say exactly what is wrong with a corpus file: `file:line: problem`.

`datasets` reports a bad local file as a long traceback (a `UnicodeDecodeError` for a binary
file named `.txt`, an `ArrowInvalid` for one malformed JSON line) and a null or numeric text
field only when it is tokenized. When loading fails, `locate` re-reads the files with the
standard library and returns the first problem with its file and line, which data.py raises as
`ConfigError("data.path", ...)`. It runs only after a failure, so it costs nothing otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _text_problem(path: Path) -> str | None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = data[exc.start]
        return f"{path}:{_line_of(data, exc.start)}: not UTF-8 text (byte 0x{byte:02x}); binary?"
    return None


def _field_problem(obj, key: str) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if key not in obj:
        return f"no {key!r} field (data.text_key)"
    value = obj[key]
    if not isinstance(value, str):
        kind = "null" if value is None else f"{type(value).__name__} {value!r:.40}"
        return f"{key!r} is {kind}, not a string"
    return None


def _jsonl_problem(path: Path, key: str) -> str | None:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"{path}:{_line_of(data, exc.start)}: not UTF-8 text; binary?"
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            return f"{path}:{n}: malformed JSON ({exc.msg} at column {exc.colno})"
        why = _field_problem(obj, key)
        if why:
            return f"{path}:{n}: {why}"
    return None


def _json_problem(path: Path, key: str) -> str | None:
    """A .json file is either one JSON document (a list of records) or JSON lines."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.lstrip().startswith("["):
        return _jsonl_problem(path, key)
    try:
        records = json.loads(text)
    except ValueError as exc:
        return f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
    for i, obj in enumerate(records):
        why = _field_problem(obj, key)
        if why:
            return f"{path}: record {i}: {why}"
    return None


def _parquet_problem(path: Path, key: str) -> str | None:
    import pyarrow.parquet as pq  # optional dependency (the train (datasets) extra)

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the answer
        return f"{path}: not a readable parquet file ({type(exc).__name__})"
    if key not in schema.names:
        return f"{path}: no {key!r} column (data.text_key; columns: {', '.join(schema.names)})"
    return None


def locate(files: list[Path], builder: str, text_key: str) -> str | None:
    """The first problem in `files` read as `builder` ("text" | "json" | "parquet")."""
    for path in files:
        if builder == "text":
            why = _text_problem(path)
        elif builder == "parquet":
            why = _parquet_problem(path, text_key)
        elif path.suffix.lower() == ".json":
            why = _json_problem(path, text_key)
        else:
            why = _jsonl_problem(path, text_key)
        if why:
            return why
    return None
