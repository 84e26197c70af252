"""Loading rows: local files (JSONL, JSON, CSV, Parquet) or hub datasets, and column mapping.

JSON Lines go through pyarrow's JSON reader (columnar, no Python object per row);
a malformed line is still reported with its file and line number.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset, concatenate_datasets
from datasets.table import InMemoryTable
from numpy.typing import ArrayLike

from finetune.errors import DataError, did_you_mean
from finetune.files import sha256_file
from finetune.models.references import package_path

if TYPE_CHECKING:
    import pyarrow as pa

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gz")


def _suffix(path: Path) -> str:
    """The format suffix, looking through .gz (HumanEval ships as .jsonl.gz)."""
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else path.suffix.lower()


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 text; a wrong encoding or a broken .gz is a data error naming the place."""
    with _open_binary(path) as handle:
        data = _read_bytes(handle, path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte offset {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "save the file as UTF-8"
        ) from exc


def _read_bytes(handle: io.BufferedIOBase, path: Path) -> bytes:
    try:
        return handle.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable gzip file ({exc})") from exc


def read_jsonl(path: Path) -> list[dict]:
    """A small JSON Lines file (predictions, logs) as row objects; a bad line is named as file:line."""
    return list(iter_jsonl(_lines(path), str(path)))


def parse_jsonl(lines: Iterable[str | bytes], source: str) -> list[dict]:
    """JSON Lines (a file's or stdin's) as row objects; a bad line is named as source:line."""
    return list(iter_jsonl(lines, source))


def iter_jsonl(lines: Iterable[str | bytes], source: str) -> Iterator[dict]:
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{source}:{number}: not UTF-8 text (byte {exc.start} of the line: "
                    f"{line[exc.start : exc.start + 1]!r}); save the file as UTF-8"
                ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{number}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{source}:{number}: each line must be a JSON object, got {type(row).__name__}")
        yield row


def _lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes, streamed (through .gz too); a broken .gz is a data error."""
    with _open_binary(path) as handle:
        try:
            yield from handle
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{path}: not a readable gzip file ({exc})") from None


# pyarrow reads JSON in blocks and refuses a line longer than one; 16 MiB fits any sane row.
JSONL_BLOCK_BYTES = 16 << 20


def _load_jsonl(path: Path) -> Dataset:
    """JSON Lines through pyarrow's reader: columnar from the start, no Python object per row.

    pyarrow's errors do not say which line; on any failure one streaming pass over
    the lines names the line (malformed JSON, not UTF-8, not an object, a column
    changing type). If that pass finds nothing wrong, the rows are read in Python.
    """
    import pyarrow as pa
    import pyarrow.json as pa_json

    try:
        with pa.input_stream(str(path), compression="gzip" if path.suffix.lower() == ".gz" else None) as stream:
            table = pa_json.read_json(stream, read_options=pa_json.ReadOptions(block_size=JSONL_BLOCK_BYTES))
        table.validate(full=True)  # the reader does not check that strings are UTF-8; this does
    except (pa.ArrowException, UnicodeDecodeError, OSError, EOFError, zlib.error):
        clash = _first_type_clash(iter_jsonl(_lines(path), str(path)))  # raises for a bad line
        if clash:
            raise DataError(f"{path}: rows do not form a table: {clash}") from None
        return _rows_to_dataset(read_jsonl(path), str(path))
    return _dataset(table, path)


def _dataset(table: pa.Table, path: Path) -> Dataset:
    # The file's content hash as the fingerprint: otherwise `datasets` fingerprints a table by pickling all of it.
    return Dataset(InMemoryTable(table), fingerprint=content_hash(path)[:32])


@functools.lru_cache(maxsize=64)
def _content_hash(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def content_hash(path: Path) -> str:
    """SHA-256 of a data file, computed once per process for an unchanged file (loading, manifest and cache key)."""
    stat = path.stat()
    return _content_hash(path.resolve(), stat.st_size, stat.st_mtime_ns)


def _read_json(path: Path) -> list[dict] | None:
    """A JSON document's rows; None when the file is JSON Lines saved with a .json suffix."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved with a .json suffix
            return None
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines)")
    return data


def _rows_to_dataset(rows: list[dict], source: str) -> Dataset:
    import pyarrow as pa

    try:
        return _dataset(pa.Table.from_pylist(rows), Path(source))
    except Exception as exc:  # mixed types in one column, etc.
        raise DataError(f"{source}: rows do not form a table: {_first_type_clash(rows) or exc}") from None


_KIND_NAMES: dict[type, str] = {str: "text", list: "a list", dict: "an object"}


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return _KIND_NAMES.get(type(value), type(value).__name__)


def _first_type_clash(rows: Iterable[dict]) -> str | None:
    """`column 'label' is text in row 1 but a number in row 7`: the first column whose values change kind."""
    first: dict[str, tuple[str, int]] = {}
    for number, row in enumerate(rows, start=1):
        for column, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            seen = first.setdefault(column, (kind, number))
            if seen[0] != kind:
                return f"column {column!r} is {seen[0]} in row {seen[1]} but {kind} in row {number}"
    return None


def _load_file(path: Path) -> Dataset:
    suffix = _suffix(path)
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix == ".json":
        rows = _read_json(path)
        return _load_jsonl(path) if rows is None else _rows_to_dataset(rows, str(path))
    if suffix not in (".csv", ".tsv", ".parquet"):
        raise DataError(
            f"{path}: unknown data file type {suffix or '(no extension)'!r}; "
            "use .jsonl, .json, .csv, .tsv or .parquet (optionally .gz)"
        )
    import pandas as pd

    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read {suffix[1:].upper()} file: {exc}") from None
    import pyarrow as pa

    return _dataset(pa.Table.from_pandas(frame, preserve_index=False), path)


def _load_hub(spec: str) -> Dataset:
    from datasets import load_dataset

    name, _, split = spec.partition(":")
    try:
        return load_dataset(name, split=split or "train")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{spec}: not a local file, and loading it as a hub dataset failed: {first}") from None


def local_data_path(spec: str, key: str) -> Path:
    """A data spec as a path; `pkg:MODULE/PATH` names a file shipped inside an installed package."""
    if spec.startswith("pkg:"):
        return package_path(spec, key)
    return Path(spec).expanduser()


def load_table(spec: str | list[str], key: str) -> Dataset:
    """Rows from one or more files or a hub dataset. `key` (data.train, data.eval) names the source in errors."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    parts = []
    for item in specs:
        path = local_data_path(item, key)
        if path.suffix.lower() in FILE_SUFFIXES or path.exists():
            if not path.is_file():
                raise DataError(f"{key}: file not found: {item}")
            table = _load_file(path)
        else:
            table = _load_hub(item)
        if len(table) == 0:
            raise DataError(f"{key}: {item} has no rows")
        parts.append(table)
    columns = set(parts[0].column_names)
    for item, table in zip(specs[1:], parts[1:]):
        if set(table.column_names) != columns:
            raise DataError(f"{key}: {item} has columns {sorted(table.column_names)}, expected {sorted(columns)}")
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def file_hashes(spec: str | list[str] | None) -> dict[str, str]:
    """SHA-256 of each local data file (for the manifest and exact resume)."""
    specs = [] if spec is None else [spec] if isinstance(spec, str) else spec
    hashes = {}
    for item in specs:
        path = local_data_path(item, "data")
        if path.is_file():
            hashes[item] = content_hash(path)
        else:
            hashes[item] = "hub dataset"
    return hashes


def map_columns(
    table: Dataset, columns: dict[str, str], required: Sequence[str], optional: Sequence[str], key: str
) -> Dataset:
    """Rename the file's columns to the task's field names; keep only those fields."""
    unknown_fields = [f for f in columns if f not in (*required, *optional)]
    if unknown_fields:
        names = ", ".join(f"{f!r}{did_you_mean(f, (*required, *optional))}" for f in unknown_fields)
        raise DataError(
            f"data.columns: {names} is not a field of this task (fields: {', '.join((*required, *optional))})"
        )
    present = set(table.column_names)
    wanted = {}
    for name in (*required, *optional):
        column = columns.get(name, name)
        if column in present:
            wanted[column] = name
        elif name in required:
            hint = f" (mapped by data.columns.{name})" if name in columns else ""
            raise DataError(
                f"{key}: column {column!r} for field {name!r}{hint} not found; columns are: {', '.join(sorted(present))}"
            )
        elif name in columns:
            raise DataError(
                f"{key}: column {column!r} (data.columns.{name}) not found; columns are: {', '.join(sorted(present))}"
            )
    table = table.select_columns(list(wanted))
    renames = {c: n for c, n in wanted.items() if c != n}
    return table.rename_columns(renames) if renames else table


def checked_texts(values: list, split: str, field: str, first_row: int = 1) -> list[str]:
    """`values` as a list of texts; anything else is named by its row number (counted from `first_row`)."""
    for number, value in enumerate(values, start=first_row):
        if not isinstance(value, str):
            raise DataError(
                f"{split}: row {number}: field {field!r} must be text, got {type(value).__name__} {value!r}"
            )
    return list(values)


def apply_template(table: Dataset, template: str, key: str) -> Dataset:
    """Add a `prompt` column built from `data.template` (a Python format string over the file's columns)."""
    import string

    try:
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise DataError(f"data.template: not a valid format string ({exc})") from None
    columns = []
    for name in names:
        column = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not column or column.isdigit():
            raise DataError(f"data.template: use column names in braces, e.g. {{product}}, not {{{name}}}")
        if column not in table.column_names:
            raise DataError(
                f"{key}: data.template uses column {column!r}, which is not in the file; "
                f"columns are: {', '.join(sorted(table.column_names))}"
            )
        columns.append(column)
    prompts = []
    for number, row in enumerate(table, start=1):
        empty = [c for c in columns if row[c] is None]
        if empty:
            raise DataError(f"{key}: row {number}: column {empty[0]!r} is empty, and data.template needs it")
        try:
            prompts.append(template.format_map(row))
        except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
            raise DataError(f"{key}: row {number}: data.template cannot be filled: {exc}") from None
    if "prompt" in table.column_names:
        table = table.remove_columns("prompt")
    return table.add_column("prompt", prompts)


# Below this many rows, starting worker processes costs more than tokenising in one.
PARALLEL_MIN_ROWS = 20_000
MAP_BATCH_ROWS = 1000


def available_cores() -> int:
    """The cores this process may run on (its scheduler affinity: a container's or taskset's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def map_batches(
    rows: Dataset,
    function: Callable[[dict[str, Any], list[int]], dict[str, Any]],
    workers: int | None,
    fingerprint: str,
    description: str,
    output: Path | None = None,
) -> Dataset:
    """`Dataset.map(function, batched=True, with_indices=True)` over `rows`, into the Arrow file `output` (with
    several workers, one file per worker beside it) or into memory; in worker processes when the data is large
    enough to pay for them. `function(batch, indices)` gets the row indices for error messages."""
    workers = available_cores() if workers is None else workers
    workers = workers if len(rows) >= PARALLEL_MIN_ROWS else 1
    if workers > 1:
        # Each worker tokenises on one thread; the tokenizer's own thread pool would oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    environ = os.environ
    try:
        return rows.map(
            function,
            batched=True,
            batch_size=MAP_BATCH_ROWS,
            with_indices=True,
            remove_columns=rows.column_names,
            keep_in_memory=output is None,
            cache_file_name=str(output) if output else None,
            num_proc=workers if workers > 1 else None,
            new_fingerprint=fingerprint,
            desc=description,
        )
    finally:
        # `datasets` replaces os.environ with a copy when it starts workers; whatever holds the original (a
        # console reading COLUMNS, a test's monkeypatch) would no longer see the process environment.
        os.environ = environ


def token_lengths(features: Dataset) -> np.ndarray:
    """Tokens per row of a features table, read from Arrow's list offsets (no row becomes a Python list)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(features.data.column("input_ids")).to_numpy()
    if features._indices is not None:  # a selection of the table's rows
        lengths = lengths[features._indices.column(0).to_numpy()]
    return lengths


def split_for_eval(table: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    parts = table.train_test_split(test_size=fraction, seed=seed, shuffle=True, keep_in_memory=True)
    if len(parts["train"]) == 0 or len(parts["test"]) == 0:
        raise DataError(f"data.eval_split: {fraction} of {len(table)} rows leaves an empty train or eval set")
    return parts["train"], parts["test"]


@dataclass
class LengthReport:
    """Token-length statistics of one split, and what `data.overflow` did about long examples."""

    split: str
    rows: int
    max_length: int
    percentiles: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_lengths(cls, split: str, lengths: ArrayLike, max_length: int) -> LengthReport:
        lengths = np.asarray(lengths)
        percentiles = {}
        if lengths.size:
            for q in (50, 90, 95, 99):
                percentiles[f"p{q}"] = int(np.percentile(lengths, q))
            percentiles["max"] = int(lengths.max())
        return cls(split=split, rows=int(lengths.size), max_length=max_length, percentiles=percentiles)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "max_length": self.max_length,
            "token_length": self.percentiles,
            "truncated": self.truncated,
            "dropped": self.dropped,
            **({"notes": self.notes} if self.notes else {}),
        }


def apply_overflow(
    lengths: ArrayLike, max_length: int, policy: str, split: str, what: str = "example"
) -> tuple[np.ndarray, LengthReport]:
    """Indices of rows to keep under `data.overflow`, and the length report.

    `lengths` are the untruncated token lengths. `error` names the first rows
    that are too long so the user can find them.
    """
    lengths = np.asarray(lengths)
    report = LengthReport.from_lengths(split, lengths, max_length)
    too_long = np.flatnonzero(lengths > max_length)
    if too_long.size and policy == "error":
        shown = ", ".join(str(i + 1) for i in too_long[:5])
        raise DataError(
            f"{split}: {too_long.size} {what}s exceed data.max_length={max_length} tokens (rows {shown}"
            f"{', ...' if too_long.size > 5 else ''}); raise max_length or set data.overflow to truncate or drop"
        )
    if policy == "drop":
        report.dropped = int(too_long.size)
        keep = np.flatnonzero(lengths <= max_length)
    else:
        report.truncated = int(too_long.size)
        keep = np.arange(lengths.size)
    if not keep.size:
        raise DataError(f"{split}: every row was dropped by data.overflow=drop (max_length={max_length})")
    return keep, report
