"""Loading rows: local files (JSONL, JSON, CSV, Parquet) or hub datasets, and column mapping.

JSON Lines go through pyarrow's JSON reader (columnar, no Python object per row);
a malformed line is still reported with its file and line number.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import signal
import string
import sys
import tempfile
import traceback
import unicodedata
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from datasets import Dataset, concatenate_datasets
from datasets.table import InMemoryTable
from numpy.typing import ArrayLike

from finetune.data.conversations import (
    LAYOUT_FIELDS,
    as_messages,
    conversation_problems,
    judged_conversations,
    layout_fields,
    prompt_completion_conversations,
    recipe_layout,
    table_layout,
)
from finetune.errors import DataError, FinetuneError, RecipeError, WorkerKilled, did_you_mean
from finetune.files import sha256_file
from finetune.models.references import package_path

if TYPE_CHECKING:
    import pyarrow as pa

    from finetune.recipe.schema import DataSection, Recipe

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gz")


def _suffix(path: Path) -> str:
    """The format suffix, looking through .gz (HumanEval ships as .jsonl.gz)."""
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else path.suffix.lower()


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _open_csv_text(path: Path) -> io.TextIOBase:
    """A CSV/TSV file as text for Python's csv module (through .gz too; a byte-order mark skipped)."""
    opener: Callable[..., Any] = gzip.open if path.suffix.lower() == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")


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


def read_input_rows(path: Path | None, source: str) -> tuple[list[dict], Origins]:
    """`predict`'s and `detect`'s input as row objects, with where each row is: JSON Lines (a file, or stdin where
    `path` is None; a message about row N names its line, blank lines skipped), or a file in any layout training
    reads, by its suffix (CSV/TSV, a JSON list, Parquet: they were refused as malformed JSON lines)."""
    suffix = None if path is None else _suffix(path)
    if path is not None and suffix == ".json" and (records := _read_json(path)) is not None:
        # The objects as they are (through a table, each would gain every other row's keys as nulls).
        return records, Origins.of(Source(source, path, "records"), len(records))
    if path is not None and suffix in (".csv", ".tsv", ".parquet"):
        table, origin = load_source(str(path), source, text_columns=ALL_COLUMNS)  # every value as written
        return table.to_list(), Origins.of(origin, len(table))
    numbered = list(numbered_jsonl(sys.stdin if path is None else _lines(path), source))
    origin = Source(source, path, "lines", lines=tuple(number for number, _ in numbered))
    return [row for _, row in numbered], Origins.of(origin, len(numbered))


def parse_jsonl(lines: Iterable[str | bytes], source: str) -> list[dict]:
    """JSON Lines (a file's or stdin's) as row objects; a bad line is named as source:line."""
    return list(iter_jsonl(lines, source))


def iter_jsonl(lines: Iterable[str | bytes], source: str) -> Iterator[dict]:
    for _, row in numbered_jsonl(lines, source):
        yield row


# A \uD800-\uDFFF escape: JSON allows one alone, but a lone UTF-16 half is no character, and every later step
# that encodes the text (pyarrow, the tokenizer, the outputs) fails far from the line.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: object, place: str = "") -> str | None:
    """Where (`key`, `key.0`, ...) the first string holding a lone surrogate is, with it; None when none does."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{place or 'a key'}: {value[exc.start]!r}"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        if isinstance(value, dict):
            found = _lone_surrogate(key, place)  # a key holding one
            if found:
                return found
        found = _lone_surrogate(inner, f"{place}.{key}" if place else str(key))
        if found:
            return found
    return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return row


class _DuplicateKey(ValueError):
    pass


def numbered_jsonl(lines: Iterable[str | bytes], source: str, unique_keys: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, row object) of each non-blank line; a bad line is named as source:line. With `unique_keys`,
    an object giving a key twice is refused too (plain JSON lets the last one win silently); the check costs a
    third more parsing time, so only the pass that names a bad line of a data file makes it."""
    hook = _unique_keys if unique_keys else None
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            raw = line
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8_line(source, number, raw, exc) from None
        if number == 1:  # a byte-order mark some editors write first: training data's reader skips it too
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            # Without its line break: a line cut short would be reported at column 1 of the "next line".
            row = json.loads(line.rstrip("\r\n"), object_pairs_hook=hook)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{number}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
        except _DuplicateKey as exc:
            raise DataError(f"{source}:{number}: key {exc.args[0]!r} is given twice in one object") from None
        if not isinstance(row, dict):
            raise DataError(f"{source}:{number}: each line must be a JSON object, got {type(row).__name__}")
        if "\\u" in line and _SURROGATE_ESCAPE.search(line):
            found = _lone_surrogate(row)
            if found:
                raise DataError(
                    f"{source}:{number}: a lone surrogate (half of a UTF-16 pair, from a \\u escape) is not text, "
                    f"at {found}; fix the text or remove it"
                )
        yield number, row


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
        # raises for a bad line; pyarrow refuses a key given twice, so this pass names that line too
        clash = _first_type_clash(numbered_jsonl(_lines(path), str(path), unique_keys=True), "line")
        if clash:
            raise TableClash(f"{path}: rows do not form a table: {clash}") from None
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
        if exc.msg == "Extra data":
            if text.lstrip().startswith("["):  # one list, then something after it (JSON Lines start with objects)
                raise DataError(
                    f"{path}:{exc.lineno}: text after the end of the JSON document (column {exc.colno}); a .json file "
                    "holds one list of objects (or JSON Lines: one object a line)"
                ) from None
            return None  # JSON Lines saved with a .json suffix
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines)")
    return data


def _rows_to_dataset(rows: list[dict], source: str, word: str = "line") -> Dataset:
    import pyarrow as pa

    try:
        return _dataset(pa.Table.from_pylist(rows), Path(source))
    except Exception as exc:  # mixed types in one column, etc.
        clash = _first_type_clash(enumerate(rows, start=1), word)
        raise TableClash(f"{source}: rows do not form a table: {clash or exc}") from None


class TableClash(DataError):
    """A JSON file whose values change kind within a column (exit 3)."""


_KIND_NAMES: dict[type, str] = {str: "text", list: "a list", dict: "an object"}


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return _KIND_NAMES.get(type(value), type(value).__name__)


def _first_type_clash(rows: Iterable[tuple[int, dict]], word: str) -> str | None:
    """`column 'label' is text on line 1 but a number on line 7`: the first column whose values change kind,
    numbered as the file numbers its rows (`word`: line, or record for a JSON list)."""
    first: dict[str, tuple[str, int]] = {}
    at = "on" if word == "line" else "in"
    for number, row in rows:
        for column, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            seen = first.setdefault(column, (kind, number))
            if seen[0] != kind:
                return f"column {column!r} is {seen[0]} {at} {word} {seen[1]} but {kind} {at} {word} {number}"
            for place, inner in _inner_kinds(column, value):
                seen = first.setdefault(place, (inner, number))
                if seen[0] != inner:
                    return f"{place} is {seen[0]} {at} {word} {seen[1]} but {inner} {at} {word} {number}"
    return None


def _inner_kinds(column: str, value: object) -> Iterator[tuple[str, str]]:
    """The kinds inside an object (SQuAD's `answers`) or a list of objects (conversation turns), each named by its
    key: a `content` that is text in one turn and a number in another, or an `answers.text` that is a list on one
    line and text on another, is named by its line, like a top-level column (pyarrow's words named neither); and
    the items of a list (a multi-label row's labels: text beside a number was "Expected bytes, got a 'int' object")."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if inner is not None:
                yield f"column {column!r} (its {key!r})", _kind(inner)
            if isinstance(inner, list):  # SQuAD's answers.answer_start: ["12"] on one line, [12] on another
                for item in inner:
                    if item is not None:
                        yield f"column {column!r} (its {key!r} items)", _kind(item)
    if isinstance(value, list):
        for item in value:
            if item is not None:
                yield f"column {column!r} (its items)", _kind(item)
            if isinstance(item, dict):
                for key, inner in item.items():
                    if inner is not None:
                        yield f"column {column!r} (its objects' {key!r})", _kind(inner)


# `text_columns` naming every column of a CSV/TSV file: predict's input comes back as it was written.
ALL_COLUMNS = ("*",)


def _load_file(path: Path, text_columns: Sequence[str] = ()) -> tuple[Dataset, str]:
    """The file's rows, and how it numbers them (a `Source` layout). `text_columns` of a CSV/TSV file are read as
    the text they are (a column of numbers that a task reads as text stays text)."""
    suffix = _suffix(path)
    if suffix == ".jsonl":
        return _load_jsonl(path), "lines"
    if suffix == ".json":
        rows = _read_json(path)
        if rows is None:
            return _load_jsonl(path), "lines"
        return _rows_to_dataset(rows, str(path), "record"), "records"
    if suffix not in (".csv", ".tsv", ".parquet"):
        raise DataError(
            f"{path}: unknown data file type {suffix or '(no extension)'!r}; "
            "use .jsonl, .json, .csv, .tsv or .parquet (optionally .gz)"
        )
    import pandas as pd

    separator = _CSV_SEPARATORS.get(suffix, ",")
    quoting = _quoting(path, separator) if suffix != ".parquet" else csv.QUOTE_MINIMAL

    def read_csv(**more: Any) -> pd.DataFrame:
        # index_col=False: rows with more fields than the header are not read as an index column in front (pandas'
        # default: every column then shifted one to the right, silently); the extra fields are checked apart.
        return pd.read_csv(
            path,
            sep=separator,
            quoting=quoting,
            keep_default_na=False,
            index_col=False,
            dtype=str if text_columns == ALL_COLUMNS else dict.fromkeys(text_columns, str),  # unknown names: ignored
            **more,
        )

    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always", pd.errors.ParserWarning)
                frame = read_csv()
        header = [] if suffix == ".parquet" else _header(path, separator, quoting)
        if suffix != ".parquet" and any(issubclass(w.category, pd.errors.ParserWarning) for w in said):
            _check_extra_fields(path, separator, quoting, len(header))
    except pd.errors.ParserError:
        # A value opened by a quotation mark that nothing closes: the python engine below reads up to the mark and
        # stops, silently (pandas' own error names it only when no other row's error comes first).
        unclosed = _unclosed_quote(path, separator, quoting)
        if unclosed is not None:
            raise unclosed from None
        # A row further down with more fields than the header: named at its line where they hold values; empty
        # ones (some rows closed by a separator) are dropped, which loses nothing.
        header = _header(path, separator, quoting)
        _check_extra_fields(path, separator, quoting, len(header))
        try:
            frame = read_csv(engine="python", on_bad_lines=lambda fields: fields[: len(header)])
        except Exception as exc:
            raise DataError(f"{path}: cannot read {suffix[1:].upper()} file: {exc}") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read {suffix[1:].upper()} file: {exc}") from None
    twice = sorted({name for name in header if name.strip() and header.count(name) > 1})  # (blank: trailing commas)
    if twice:  # pandas reads a second `body` as `body.1`: the mapping then silently read the first one alone
        raise DataError(
            f"{path}: the header names column(s) {', '.join(map(repr, twice))} more than once; give each column "
            "its own name"
        )
    import pyarrow as pa

    table = _dataset(pa.Table.from_pandas(frame, preserve_index=False), path)
    return table, "rows" if suffix == ".parquet" else "csv"


_CSV_SEPARATORS = {".csv": ",", ".tsv": "\t"}


def _check_extra_fields(path: Path, separator: str, quoting: Literal[0, 3], width: int) -> None:
    """A row with more fields than the header is refused at its line, unless the extra fields are empty (a
    separator closing every line, as spreadsheet exports write): which column a value belongs to is unknowable."""
    with _open_csv_text(path) as text:
        records = csv.reader(text, delimiter=separator, quoting=quoting)
        next(records, None)
        start = records.line_num + 1  # the line a record starts on (a quoted value may span several)
        for record in records:
            if len(record) > width and any(value.strip() for value in record[width:]):
                row_names = (
                    " (if each row's first field is a row name, as R's write.table writes, give it a name in the "
                    "header)"
                    if len(record) == width + 1 and start == 2
                    else ""
                )
                fix = (
                    f"quote a value holding {separator!r}"
                    if quoting == csv.QUOTE_MINIMAL
                    else "a value cannot hold a tab where the file's quotation marks are text (as here: some are not "
                    "whole quoted values)"
                )
                raise DataError(
                    f"{path}:{start}: {len(record)} fields where the header names {width} columns "
                    f"(extra: {record[width:][:3]!r}); {fix}, or name every column" + row_names
                )
            start = records.line_num + 1


def _unclosed_quote(path: Path, separator: str, quoting: Literal[0, 3]) -> DataError | None:
    """A quotation mark that opens a value no later mark closes (every line after it would be that one value),
    named at the line the value starts on; None where every quoted value closes. Read leniently, as pandas reads
    (`"great" movie` is text), the last record runs to the end of the file; it is the unclosed one where it does
    not parse strictly on its own."""
    if quoting == csv.QUOTE_NONE:
        return None
    try:
        with _open_csv_text(path) as text:
            records = csv.reader(text, delimiter=separator, quoting=quoting)
            start = begins = 1
            for _ in records:
                start, begins = begins, records.line_num + 1
        with _open_csv_text(path) as text:
            tail = "".join(itertools.islice(text, start - 1, None))
        for _ in csv.reader(io.StringIO(tail), delimiter=separator, quoting=quoting, strict=True):
            pass
    except csv.Error as exc:
        if "unexpected end of data" not in str(exc):
            return None  # another malformation, which the readers name
        return DataError(
            f"{path}:{start}: a quotation mark opens a value here that nothing later closes, so every line after it "
            'would be read as part of that value; close it, or write a quotation mark inside a quoted value as two ("")'
        )
    return None


def _not_utf8(path: Path) -> DataError:
    """The first line of a file that is not UTF-8, named as the JSON Lines reader names it."""
    for number, line in enumerate(_lines(path), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _not_utf8_line(path, number, line, exc)
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _not_utf8_line(source: str | Path, number: int, line: bytes, exc: UnicodeDecodeError) -> DataError:
    """A line that is not UTF-8, named at its place, as every reader of lines says it."""
    return DataError(
        f"{source}:{number}: not UTF-8 text (byte {exc.start} of the line: {line[exc.start : exc.start + 1]!r}); "
        "save the file as UTF-8"
    )


def _header(path: Path, separator: str, quoting: int) -> list[str]:
    """A CSV/TSV file's column names as written (pandas renames a repeated one)."""
    import pandas as pd

    first = pd.read_csv(path, sep=separator, quoting=quoting, header=None, nrows=1, dtype=str, keep_default_na=False)
    return [str(name) for name in first.iloc[0].tolist()] if len(first) else []


def _quoting(path: Path, separator: str) -> Literal[0, 3]:
    """How a CSV/TSV file quotes. CSV: as CSV does. TSV: as pandas and Python's csv module write it (a text holding
    a quotation mark, a tab or a line break quoted whole, its marks doubled) where the whole file reads so, strictly;
    otherwise the file's quotation marks are text (TSV itself has no quoting): read as CSV-quoted, a text opening
    with one (`"Great" movie`, `"12 inch`) lost its marks, or ran on over the next lines and swallowed their rows.
    (A line-by-line check took a quoted value holding a tab or a line break for marks that are text.)"""
    if separator != "\t":
        return csv.QUOTE_MINIMAL
    try:
        with _open_csv_text(path) as text:
            for _ in csv.reader(text, delimiter="\t", quoting=csv.QUOTE_MINIMAL, strict=True):
                pass
    except csv.Error:
        return csv.QUOTE_NONE
    except (UnicodeDecodeError, OSError, EOFError, zlib.error):  # the read itself names the line or the file
        return csv.QUOTE_MINIMAL
    return csv.QUOTE_MINIMAL


def _load_hub(spec: str) -> Dataset:
    from datasets import load_dataset

    name, _, split = spec.partition(":")
    try:
        return load_dataset(name, split=split or "train")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{spec}: not a local file, and loading it as a hub dataset failed: {first}") from None


# --------------------------------------------------------------------------- where each row came from


@dataclass(frozen=True)
class Source:
    """One data file (or hub dataset) as the recipe names it, and how messages number its records.

    `layout`: "lines" (JSON Lines: the line a row is on), "csv" (CSV/TSV: the line a record starts on),
    "records" (a JSON list: the record's 1-based index) or "rows" (Parquet, a hub dataset: the 1-based row).
    """

    name: str  # as the recipe wrote it
    path: Path | None  # None: a hub dataset, or stdin
    layout: str
    separator: str = ","  # CSV/TSV
    lines: tuple[int, ...] | None = None  # each record's line, where the reader counted them (stdin: no file to reread)
    # (field, the file's column) for each field data.columns maps to another column: messages name the column the
    # user sees in the file (a knowledge base's retriever reads its questions as the field `query`).
    columns: tuple[tuple[str, str], ...] = ()

    def place(self, record: int) -> str:
        """`file:line`, `file: record N` or `file: row N` for the source's 0-based `record`."""
        if self.lines is not None and record < len(self.lines):
            return f"{self.name}:{self.lines[record]}"
        if self.layout in ("lines", "csv") and self.path is not None:
            starts = _record_lines(self.path, self.layout, self.separator)
            if record < len(starts):
                return f"{self.name}:{starts[record]}"
        word = "record" if self.layout == "records" else "row"
        return f"{self.name}: {word} {record + 1}"


def _record_lines(path: Path, layout: str, separator: str) -> np.ndarray:
    stat = path.stat()
    return _record_lines_cached(path.resolve(), stat.st_size, stat.st_mtime_ns, layout, separator)


@functools.lru_cache(maxsize=16)
def _record_lines_cached(path: Path, size: int, mtime_ns: int, layout: str, separator: str) -> np.ndarray:
    """The line each record of a file starts on (read only when a message needs one: blank lines are skipped by
    the readers, and a quoted CSV field may span lines, so a row's index is not its line)."""
    if layout == "lines":
        return np.array([number for number, line in enumerate(_lines(path), start=1) if line.strip()], np.int64)
    text = io.StringIO(_read_text(path), newline="")
    reader = csv.reader(text, delimiter=separator, quoting=_quoting(path, separator))  # as _load_file read it
    starts, end = [], 0
    for record in reader:
        if record:  # pandas skips blank lines too
            starts.append(end + 1)
        end = reader.line_num
    return np.array(starts[1:], np.int64)  # the first record is the header


@dataclass(frozen=True)
class Origins:
    """Where each row of a split came from: its source and its record there (0-based), so every message about a
    row names the user's file and the file's own line, whatever splitting, sampling or filtering did since."""

    sources: tuple[Source, ...]
    source: np.ndarray  # per row: index into `sources`
    record: np.ndarray  # per row: the record in that source

    @classmethod
    def of(cls, source: Source, rows: int) -> Origins:
        return cls((source,), np.zeros(rows, np.int32), np.arange(rows, dtype=np.int64))

    @classmethod
    def concat(cls, parts: Sequence[Origins]) -> Origins:
        sources: list[Source] = []
        ids, records = [], []
        for part in parts:
            ids.append(part.source + len(sources))
            records.append(part.record)
            sources.extend(part.sources)
        return cls(tuple(sources), np.concatenate(ids), np.concatenate(records))

    def __len__(self) -> int:
        return len(self.record)

    def take(self, indices: ArrayLike) -> Origins:
        indices = np.asarray(indices, dtype=np.int64)
        return Origins(self.sources, self.source[indices], self.record[indices])

    def place(self, row: int) -> str:
        """The row's place in its file (`row` counts from 0 in this split)."""
        return self.sources[int(self.source[row])].place(int(self.record[row]))

    def explain(self, error: DataError, split: str) -> DataError:
        """A task's `split: row N: ...` (N counting this split's rows from 1), or the `(rows N, M, ...)` of
        data.overflow: error, with the file's own places instead of the split's row numbers."""
        mention = RowMention.read(error, split)
        if mention is None or not all(1 <= n <= len(self) for n in mention.numbers):
            return error
        first = mention.numbers[0] - 1
        if mention.one:
            place = self.place(first)
            # Rows named by their own file (predict's and detect's input, `SOURCE: row N`): `SOURCE:LINE`, not
            # `SOURCE: SOURCE:LINE`; a split of the recipe keeps its name before its file's (`data.train: f:3`).
            lead = "" if place.startswith(f"{split}:") else f"{split}: "
            return DataError(f"{lead}{place}: {self._columns_named(mention.after, first)}")
        places = "; ".join(self.place(n - 1) for n in mention.numbers)
        return DataError(f"{split}: {self._columns_named(f'{mention.before}({places}{mention.after}', first)}")

    def _columns_named(self, text: str, row: int) -> str:
        """`text` with each field data.columns maps named as the row's file names its column."""
        for name, column in self.sources[int(self.source[row])].columns:
            text = text.replace(f"field {name!r}", f"column {column!r}")
        return text


@dataclass(frozen=True)
class RowMention:
    """Where a message names rows of a split by number: `split: row N: AFTER` (one) or `split: BEFORE(rows N, M,
    ...AFTER` (several). The one reader of that format, for `Origins.explain` and `renumbered`."""

    numbers: tuple[int, ...]
    one: bool
    before: str = ""
    after: str = ""

    @classmethod
    def read(cls, error: DataError, split: str) -> RowMention | None:
        text, head = str(error), f"{split}: "
        if not text.startswith(head):
            return None
        rest = text[len(head) :]
        if one := re.match(r"row (\d+): ", rest):
            return cls((int(one[1]),), True, after=rest[one.end() :])
        if several := re.search(r"\(rows (\d+(?:, \d+)*)", rest):
            numbers = tuple(int(n) for n in several[1].split(", "))
            return cls(numbers, False, rest[: several.start()], rest[several.end() :])
        return None

    def said(self, split: str, numbers: Sequence[int]) -> str:
        """The message again, naming `numbers` in place of its own."""
        if self.one:
            return f"{split}: row {numbers[0]}: {self.after}"
        return f"{split}: {self.before}(rows {', '.join(map(str, numbers))}{self.after}"


def renumbered(error: DataError, split: str, numbers: Sequence[int]) -> DataError:
    """A `split: row N: ...` or `(rows N, M, ...)` error about rows made from a split's rows (KTO's thumbs from
    its pairs), with the numbers of the rows they were made from (`numbers[N - 1]`, 1-based), which
    `Origins.explain` then names by their place in the file."""
    mention = RowMention.read(error, split)
    if mention is None:
        return error
    sources = (numbers[n - 1] if 1 <= n <= len(numbers) else n for n in mention.numbers)
    return DataError(mention.said(split, list(dict.fromkeys(sources))))


def _columns_are(names: Iterable[str], pairs_unread: bool = False) -> str:
    """The file's columns, quoted (a name with spaces shows them); one column whose name holds another separator
    is a file split on it, read with the wrong one."""
    names = sorted(names)
    said = f"columns are: {', '.join(map(repr, names))}"
    mixed = [sep for sep in (";", "\t", "|") if len(names) == 1 and sep in names[0]]
    if mixed:
        said += (
            f" (one column whose name holds {mixed[0]!r}: a .csv file is read split on ',' and a .tsv file on tabs; "
            "save the file with one of those)"
        )
    elif pairs_unread and {"chosen", "rejected"} <= set(names):
        said += " (preference pairs: read under train.objective dpo, orpo or kto)"
    elif "paragraphs" in names:
        said += (
            " (SQuAD's nested layout, articles of paragraphs of questions: give one row per question, with its "
            "question, context and answers)"
        )
    return said


def missing_file(path: Path, item: str) -> str:
    """Why a data file named is not one to read: not there, or a directory (both were "file not found")."""
    return f"{item} is a directory, not a data file" if path.is_dir() else f"file not found: {item}"


def local_data_path(spec: str, key: str) -> Path:
    """A data spec as a path; `pkg:MODULE/PATH` names a file shipped inside an installed package."""
    if spec.startswith("pkg:"):
        return package_path(spec, key)
    return Path(spec).expanduser()


def load_source(item: str, key: str, text_columns: Sequence[str] = ()) -> tuple[Dataset, Source]:
    """The rows of one file or hub dataset, and the `Source` that names their places in messages."""
    path = local_data_path(item, key)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"{key}: {missing_file(path, item)}")
        table, layout = _load_file(path, text_columns)
        source = Source(item, path, layout, _CSV_SEPARATORS.get(_suffix(path), ","))
    else:
        table, source = _load_hub(item), Source(item, None, "rows")
    if len(table) == 0:
        raise DataError(f"{key}: {item} has no rows" if key != item else f"{item}: the file has no rows")
    return table, source


def load_table(spec: str | list[str], key: str, text_columns: Sequence[str] = ()) -> Dataset:
    """Rows from one or more files or a hub dataset. `key` (data.train, data.eval) names the source in errors;
    `text_columns` of a CSV/TSV file are read as written (`_load_file`)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    parts = [load_source(item, key, text_columns)[0] for item in specs]
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
            hashes[item] = HUB_DATASET
    return hashes


# What the manifest records for a data source that is no local file (a hub dataset): it has no bytes to hash.
HUB_DATASET = "hub dataset"


# The recipe keys naming the data files a run reads: train, eval, and the corpus retrieval searches.
DATA_FILE_KEYS = ("train", "eval", "knowledge_base")


def data_file_hashes(data: DataSection, keys: Sequence[str] = DATA_FILE_KEYS) -> dict[str, str]:
    """SHA-256 of each local data file the recipe's data section names under `keys` (manifest.json, a sweep's and an
    exact resume's identity): the knowledge base counts like the rows, since retrieval, the contexts a reader trains
    on and a retriever's mined negatives all come from it."""
    hashes = {}
    for key in keys:
        hashes.update(file_hashes(getattr(data, key)))
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
    # A column feeds one field (resolve's data rules refuse two mappings of one column). An explicit mapping claims
    # its column first, so `positive_id: id` is not undone by the task's own optional `id` field reading it.
    claimed = {column: name for name, column in columns.items()}
    wanted = {}
    for name in (*required, *optional):
        column = columns.get(name, name)
        if column in present and claimed.get(column, name) == name:
            wanted[column] = name
        elif name in required and column in present:
            raise DataError(
                f"{key}: field {name!r} reads column {column!r}, which data.columns.{claimed[column]} gives to field "
                f"{claimed[column]!r}; map {name!r} to another column"
            )
        elif name in required:
            hint = f" (mapped by data.columns.{name})" if name in columns else ""
            pairs = "chosen" not in (*required, *optional)  # pairs in a file the recipe does not read them from
            raise DataError(
                f"{key}: column {column!r} for field {name!r}{hint} not found; {_columns_are(present, pairs)}"
            )
        elif name in columns:
            raise DataError(f"{key}: column {column!r} (data.columns.{name}) not found; {_columns_are(present)}")
    table = table.select_columns(list(wanted))
    renames = {c: n for c, n in wanted.items() if c != n}
    return table.rename_columns(renames) if renames else table


def checked_texts(values: list, split: str, field: str, first_row: int = 1, turns_read: bool = False) -> list[str]:
    """`values` as a list of texts; anything else is named by its row number (counted from `first_row`).
    `turns_read`: the caller reads conversations too, so a value of turns is pointed at the `messages` field."""
    for number, value in enumerate(values, start=first_row):
        if value is None:
            raise DataError(f"{split}: row {number}: field {field!r} must be text, got no value (missing or null)")
        if not isinstance(value, str):
            turns = turns_read and isinstance(value, list) and all(isinstance(t, dict) and "role" in t for t in value)
            raise DataError(
                f"{split}: row {number}: field {field!r} must be text, got {type(value).__name__} {value!r}"
                + ("; turns of a conversation are read as a 'messages' field" if turns and value else "")
            )
    return list(values)


# A filled data.template longer than this is refused before any row is filled (about 250,000 tokens: beyond any
# data.max_length a LoRA run trains with). Template bombs (`{text}` repeated, `{text:>999999999}`) stop here.
MAX_PROMPT_CHARS = 1 << 20


def template_fields(template: str) -> list[tuple[str, str]]:
    """(field, format spec) of each replacement field of data.template; a malformed template is a RecipeError."""
    try:
        return [(name, spec or "") for _, name, spec, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise RecipeError(f"data.template: not a valid format string ({exc})") from None


def _template_column(name: str) -> str:
    return re.split(r"[.\[]", name, maxsplit=1)[0]


def template_problems(template: str) -> list[str]:
    """What is wrong with data.template before any row is read: its syntax, positional fields, fields inside a
    format spec, and widths or precisions that would make every prompt gigantic."""
    try:
        fields = template_fields(template)
    except RecipeError as exc:
        return [str(exc)]
    problems: list[str] = []
    for name, spec in fields:
        column = _template_column(name)
        if not column or column.isdigit():
            problem = f"data.template: use column names in braces, e.g. {{product}}, not {{{name}}}"
        elif "{" in spec or "}" in spec:
            problem = f"data.template: {{{name}:{spec}}}: a format spec cannot hold another field"
        elif _spec_width(spec) > MAX_PROMPT_CHARS:
            problem = (
                f"data.template: {{{name}:{spec}}} asks for {_spec_width(spec):,} characters in every prompt; "
                f"a filled prompt may have at most {MAX_PROMPT_CHARS:,}"
            )
        else:
            continue
        if problem not in problems:
            problems.append(problem)
    return problems


def _spec_width(spec: str) -> int:
    """The largest width or precision a format spec asks for (0: none)."""
    return max((int(n) for n in re.findall(r"\d+", spec)), default=0)


def _longest_text(table: Dataset, column: str) -> int:
    """The longest value of a column as text (0 where it cannot be told, e.g. nested values)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = table.data.column(column)
    try:
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            values = pc.cast(values, pa.string())
        return int(pc.max(pc.utf8_length(values)).as_py() or 0)
    except (pa.ArrowException, ValueError, TypeError):
        return 0


def _check_filled_size(table: Dataset, template: str, fields: list[tuple[str, str]], key: str) -> None:
    """Refuse (exit 2) a template whose filled prompts could exceed MAX_PROMPT_CHARS, before filling any."""
    literal = sum(len(text) for text, *_ in string.Formatter().parse(template))
    uses: dict[str, list[int]] = {}
    for name, spec in fields:
        uses.setdefault(_template_column(name), []).append(_spec_width(spec))
    longest = {column: _longest_text(table, column) for column in uses}
    size = literal + sum(max(width, longest[column]) for column, widths in uses.items() for width in widths)
    if size > MAX_PROMPT_CHARS:
        parts = ", ".join(
            f"{{{column}}} {len(widths)} time{'s' if len(widths) > 1 else ''} (longest value {longest[column]:,})"
            for column, widths in uses.items()
        )
        raise RecipeError(
            f"data.template: filled with the rows of {key}, a prompt could reach {size:,} characters ({parts}); "
            f"a filled prompt may have at most {MAX_PROMPT_CHARS:,}: shorten the template"
        )


def apply_template(table: Dataset, template: str, key: str, place: Callable[[int], str] | None = None) -> Dataset:
    """Add a `prompt` column built from `data.template` (a Python format string over the file's columns).

    The template is checked before any row is filled (template_problems, and the longest prompt it could make
    from these rows); `place(i)` names row i in messages (default: `row i+1`)."""
    problems = template_problems(template)
    if problems:
        raise RecipeError(problems[0])
    fields = template_fields(template)
    place = place or (lambda index: f"row {index + 1}")
    columns = []
    for name, _ in fields:
        column = _template_column(name)
        if column not in table.column_names:
            raise DataError(
                f"{key}: data.template uses column {column!r}, which is not in the file; "
                f"{_columns_are(table.column_names)}"
            )
        columns.append(column)
    _check_filled_size(table, template, fields, key)
    prompts = []
    for index, row in enumerate(table):
        empty = [c for c in columns if row[c] is None]
        if empty:
            raise DataError(f"{key}: {place(index)}: column {empty[0]!r} is empty, and data.template needs it")
        try:
            prompts.append(template.format_map(row))
        except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
            raise DataError(f"{key}: {place(index)}: data.template cannot be filled: {exc}") from None
    if "prompt" in table.column_names:
        table = table.remove_columns("prompt")
    return table.add_column("prompt", prompts)


# --------------------------------------------------------------------------- a recipe's rows, checked

# Fields every task reads as text. A CSV/TSV column mapped to one is read as text (a column of numbers a task
# reads as text stays text); in every other file a value of another kind is refused, naming its place.
TEXT_FIELDS = ("text", "text_pair", "prompt", "completion", "question", "context", "answer", "chosen", "rejected")
# Fields that name something: a CSV/TSV column mapped to one (or a classification label) is read as written, so
# "007", "07" and "7" stay three names; pandas would read all three as the number 7 and merge them silently.
NAME_FIELDS = ("id", "positive_id", "task_id", "entry_point")

EXPECTED = {
    "text": "text",
    "single": "a class name (text or an integer)",
    "multi": "class names (a list, text or an integer)",
}


def _wrong(value: object, expected: str, required: bool) -> bool:
    """Whether `value` is not what a field of kind `expected` holds."""
    if value is None:
        return required and expected != "multi"
    if expected == "text":
        return not isinstance(value, str)
    if isinstance(value, (float, dict)):
        return True
    if expected == "single" and isinstance(value, list):
        return True
    return expected == "single" and isinstance(value, str) and not value.strip()


def is_class_name(value: object) -> bool:
    """One label as a single-label classification column holds it (EXPECTED["single"]): what training reads."""
    return not _wrong(value, "single", required=True)


def _described(value: object) -> str:
    if value is None:
        return "no value (missing or null)"
    if isinstance(value, str) and not value.strip():
        return "an empty text"
    shown = repr(value)
    return f"{_kind(value)} ({shown[:60]}{'...' if len(shown) > 60 else ''})"


def _csv_value(text: str) -> object:
    """A CSV cell as pandas reads it in a column of its kind: an integer, a number, or text."""
    if re.fullmatch(r"\s*[+-]?\d+\s*", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _raw_values(source: Source, column: str) -> Iterator[tuple[int, object]]:
    """(record, value) of one column as the file itself holds it (before a reader made one type of the column)."""
    assert source.path is not None
    if source.layout == "lines":
        for record, (_, row) in enumerate(numbered_jsonl(_lines(source.path), source.name)):
            yield record, row.get(column)
    elif source.layout == "records":
        yield from enumerate(row.get(column) for row in _read_json(source.path) or [])
    elif source.layout == "csv":
        reader = csv.DictReader(io.StringIO(_read_text(source.path), newline=""), delimiter=source.separator)
        for record, row in enumerate(reader):  # DictReader skips blank lines, as pandas does
            value = row.get(column)
            yield record, None if value is None else _csv_value(value)


def label_key(label: object) -> str:
    """How classification labels compare, everywhere (the model's classes, the report's balance, the eval split's
    strata): as text, so 3 in one file and "3" in another are one class, without the spaces around it, which are a
    file's formatting ("sports " from a CSV cell), not another class, and in Unicode's composed form (NFC): "café"
    typed with a combining accent is the same word, which two identical-looking classes split."""
    return unicodedata.normalize("NFC", str(label).strip())


def _label_kind(values: pa.ChunkedArray, data: Any) -> str:
    """single or multi: as classification decides it (data.multi_label, data.label_separator, list labels)."""
    import pyarrow as pa

    multi = getattr(data, "multi_label", None)
    if multi is None:
        multi = getattr(data, "label_separator", None) is not None or pa.types.is_list(values.type)
    return "multi" if multi else "single"


def check_fields(
    table: Dataset, source: Source, key: str, columns: dict[str, str], required: Sequence[str], data: Any = None
) -> None:
    """Each field against the type its task reads: a text field holds text (a required one in every row); with
    `data` (classification's data section), the label holds a class name (text or an integer; a list where
    several labels per text). The first offending row is named by its place in the file, with its column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for field_name in table.column_names:
        values = table.data.column(field_name)
        if field_name in TEXT_FIELDS:
            expected = "text"
            suspect = not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type))
        elif field_name == "label" and data is not None:
            expected = _label_kind(values, data)
            suspect = pa.types.is_floating(values.type) or pa.types.is_struct(values.type)
            # A list of labels where the recipe says one label per text (data.multi_label: false).
            suspect = suspect or (expected == "single" and pa.types.is_list(values.type))
            if expected == "single" and (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                suspect = suspect or bool(pc.any(pc.equal(pc.utf8_trim_whitespace(values), "")).as_py())
        else:
            continue
        required_here = field_name in required
        suspect = suspect or (required_here and values.null_count > 0)
        if not suspect:
            continue
        column = columns.get(field_name, field_name)
        found = None
        if source.path is not None and source.layout != "rows":  # the file's own values, before a reader typed them
            found = next(((r, v) for r, v in _raw_values(source, column) if _wrong(v, expected, required_here)), None)
        if found is None:
            found = next(((r, v) for r, v in enumerate(values.to_pylist()) if _wrong(v, expected, required_here)), None)
        if found is None:
            continue
        typed = f" (the column's type is {values.type})" if source.layout == "rows" and found[1] is not None else ""
        raise _type_error(key, source, column, field_name, expected, *found, typed)


def _type_error(
    key: str, source: Source, column: str, field_name: str, expected: str, record: int, value: object, typed: str = ""
) -> DataError:
    name = f"column {column!r}" + (f" (data.columns.{field_name})" if column != field_name else "")
    return DataError(
        f"{key}: {source.place(record)}: {name} must be {EXPECTED[expected]}, got {_described(value)}{typed}"
    )


def _refuse_mixed_layouts(
    table: Dataset, source: Source, key: str, required: Sequence[str], columns: Mapping[str, str]
) -> None:
    """data.format auto read the task's fields (the file has them all) from a file that also holds conversations:
    its first conversation without them was refused as a row without the task's field. Both layouts named, each at
    its line. (Rows holding both, as some exports write every row, are read by the task's fields, as before.)"""
    own = columns.get(required[0], required[0]) if required else None
    if own is None or own not in table.column_names:  # the mapping names what is missing
        return
    fields_of_task = table[own][:]
    for layout, fields in LAYOUT_FIELDS.items():
        column = fields[0][0]  # a conversation's own column (Alpaca's instruction may well sit beside a prompt)
        if layout == "alpaca" or column not in table.column_names:
            continue
        values = table[column][:]
        conversation = next(
            (i for i, (v, own) in enumerate(zip(values, fields_of_task)) if v is not None and own is None), None
        )
        task_row = next((i for i, v in enumerate(fields_of_task) if v is not None), None)
        if conversation is not None and task_row is not None:
            raise DataError(
                f"{key}: the rows mix conversations ({layout}, {source.place(conversation)}) and the task's own fields "
                f"({', '.join(required)}, {source.place(task_row)}); give each layout its own file, or set data.format"
            )


def _first_row(item: str, key: str) -> dict[str, Any]:
    """A JSON file's first row (a file whose rows form no table)."""
    path = local_data_path(item, key)
    records = _read_json(path) if _suffix(path) == ".json" else None
    if records is not None:
        return dict(records[0]) if records and isinstance(records[0], dict) else {}
    for _, row in numbered_jsonl(_lines(path), item):
        return row
    return {}


def _holds_turns(row: dict[str, Any], data: Any, judged: tuple[str, str]) -> bool:
    """Whether a row's prompt or answers are lists of turns (conversations in TRL's layouts: a prompt and its
    completion, or preference pairs)."""
    fields = (judged[0], "chosen", "rejected", judged[1])
    values = [row.get(data.columns.get(field, field)) for field in fields]
    # A list of texts (several reference answers) is not a conversation.
    return any(isinstance(value, list) and any(isinstance(t, dict) for t in value) for value in values)


def _first_typed_clash(
    item: str, key: str, columns: dict[str, str], fields: Sequence[str], required: Sequence[str], data: Any
) -> DataError | None:
    """For a JSON file whose rows do not form a table: the first value of a task field that is not of the kind the
    task reads (a clash in a column no field uses, or between two kinds a field accepts, stays the reader's)."""
    path = local_data_path(item, key)
    layout = "records" if _suffix(path) == ".json" and _read_json(path) is not None else "lines"
    source = Source(item, path, layout)
    for field_name in fields:
        column = columns.get(field_name, field_name)
        values = list(_raw_values(source, column))
        if field_name in TEXT_FIELDS:
            expected = "text"
        elif field_name == "label" and data is not None:
            multi = getattr(data, "multi_label", None)
            if multi is None:
                multi = getattr(data, "label_separator", None) is not None or any(
                    isinstance(v, list) for _, v in values
                )
            expected = "multi" if multi else "single"
        else:
            continue
        found = next(((r, v) for r, v in values if _wrong(v, expected, field_name in required)), None)
        if found is not None:
            return _type_error(key, source, column, field_name, expected, *found)
    return None


def _arrow_kind(data_type: pa.DataType) -> str:
    import pyarrow as pa

    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "text"
    if pa.types.is_boolean(data_type):
        return "a boolean"
    if pa.types.is_integer(data_type) or pa.types.is_floating(data_type):
        return "a number"
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return "a list"
    if pa.types.is_struct(data_type):
        return "an object"
    return str(data_type)


def _common_type(types: list[pa.DataType]) -> pa.DataType | None:
    """One type for a field that several files give: theirs when they agree; a number where integers meet
    fractions; text where text meets integers (labels compare as text); None when they cannot meet."""
    import pyarrow as pa

    known = [t for t in types if not pa.types.is_null(t)]
    if not known:
        return types[0]
    if all(t == known[0] for t in known):
        return known[0]
    kinds = {_arrow_kind(t) for t in known}
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in known):
        return pa.float64()
    if kinds <= {"text", "a number", "a boolean"} and not any(pa.types.is_floating(t) for t in known):
        return pa.large_string() if any(pa.types.is_large_string(t) for t in known) else pa.string()
    return None


def _combine(parts: list[Dataset], names: list[str], key: str) -> Dataset:
    """The rows of several files as one table: the same task fields in each, one type per field."""
    import hashlib

    import pyarrow as pa

    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for name, table in zip(names[1:], parts[1:]):
        if set(table.column_names) != set(first.column_names):
            raise DataError(
                f"{key}: {name} gives the fields {', '.join(sorted(table.column_names))} but {names[0]} gives "
                f"{', '.join(sorted(first.column_names))}; every file needs a column for the same fields"
            )
    tables = [table.with_format("arrow")[:].select(first.column_names).replace_schema_metadata(None) for table in parts]
    for column in first.column_names:
        types = [t.schema.field(column).type for t in tables]
        common = _common_type(types)
        if common is None:
            i = next(i for i, t in enumerate(types) if _arrow_kind(t) != _arrow_kind(types[0]))
            raise DataError(
                f"{key}: field {column!r} is {_arrow_kind(types[0])} in {names[0]} but {_arrow_kind(types[i])} in "
                f"{names[i]}; give it one type in every file"
            )
        for index, table in enumerate(tables):
            if table.schema.field(column).type != common:
                position = table.schema.get_field_index(column)
                tables[index] = table.set_column(position, column, table.column(column).cast(common))
    fingerprint = hashlib.sha256("".join(p._fingerprint for p in parts).encode()).hexdigest()[:32]
    return Dataset(InMemoryTable(pa.concat_tables(tables)), fingerprint=fingerprint)


def _whole_number_labels(table: Dataset, column: str) -> Dataset:
    """A CSV/TSV label column read as written (`NAME_FIELDS`), made numbers again where every label is a whole
    number written plainly ("0" .. "10"): the classes, their order (2 before 10) and the predictions stay what the
    file meant and what earlier versions made of it; one label such as "007" or "01" keeps them all text, so no
    two written labels become one class."""
    from datasets import Value

    if column not in table.column_names:
        return table
    labels = table[column]
    if not labels or not all(isinstance(x, str) and _PLAIN_WHOLE_NUMBER.fullmatch(x) for x in labels):
        return table
    return table.cast_column(column, Value("int64"))


_PLAIN_WHOLE_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)")


def read_split(
    spec: str | list[str],
    key: str,
    recipe: Recipe,
    required: Sequence[str],
    optional: Sequence[str],
    classify: bool = False,
    conversations: bool = False,
    judged: tuple[str, str] | None = None,
) -> tuple[Dataset, Origins]:
    """One split's files as the task's fields, with where each row came from. File by file: read (a bad line
    named as file:line), the template filled, the columns mapped, every field's type checked; then the files
    joined (JSON Lines, JSON, CSV/TSV and Parquet may be mixed). `conversations` (generation tasks): a file in a
    conversation layout becomes checked `messages` rows (data/conversations.py); `judged` (the task's prompt and
    answer fields): under a preference objective, pairs or thumbs written as conversations do too."""
    data = recipe.data
    items = [spec] if isinstance(spec, str) else list(spec)
    as_written = (*TEXT_FIELDS, *NAME_FIELDS, *(("label",) if classify else ()))
    text_columns = [data.columns.get(f, f) for f in (*required, *optional) if f in as_written]
    parts, origins = [], []
    for item in items:
        try:
            table, source = load_source(item, key, text_columns)
        except TableClash as exc:
            first = _first_row(item, key)
            if conversations and (
                table_layout(data, list(first), data.columns, required) is not None
                or (judged is not None and _holds_turns(first, data, judged))
            ):
                raise  # conversations: the reader's own words name the clash (the task's fields are not read)
            fields = (*required, *optional)
            typed = _first_typed_clash(item, key, data.columns, fields, required, data if classify else None)
            if typed is not None:
                raise typed from exc
            raise
        if classify and source.layout == "csv":
            table = _whole_number_labels(table, data.columns.get("label", "label"))
        if judged is not None and recipe_layout(data) in (None, "prompt"):
            # Prompt and answer fields holding turns (TRL's conversational layouts): pairs or thumbs under a
            # preference objective, else a prompt and the assistant turn that completes it.
            if recipe.train.learns_from_judgements:
                turns, held = judged_conversations(table, data.columns, *judged, key, source.place), "preference pairs"
            else:
                turns = prompt_completion_conversations(table, data.columns, *judged, key, source.place)
                held = "a prompt and its completion"
            if turns is not None:
                problems = conversation_problems(recipe, conversations=True)  # as for the layouts below
                if problems:
                    raise RecipeError(f"{key} ({item}): the rows are conversations ({held})", problems)
                parts.append(turns)
                origins.append(Origins.of(source, len(table)))
                continue
        layout = table_layout(data, table.column_names, data.columns, required) if conversations else None
        if conversations and layout is None and recipe_layout(data) is None:
            _refuse_mixed_layouts(table, source, key, required, data.columns)
        if layout is not None:
            problems = conversation_problems(recipe, conversations=True)  # the recipe did not say: the file did
            if problems:
                raise RecipeError(f"{key} ({item}): the rows are conversations ({layout})", problems)
            # Pairs beside a `messages` prompt (TRL names a pair's prompt `prompt`) are read as conversations.
            pairs = layout == "messages" and {"chosen", "rejected"} <= set(table.column_names)
            table = map_columns(table, data.columns, *layout_fields(layout), key=f"{key} ({item})")
            try:
                parts.append(as_messages(table, layout, key, source.place))
            except DataError as exc:
                if not pairs:
                    raise
                raise DataError(
                    f"{exc} (its 'chosen' and 'rejected' answers are read as a pair beside a 'prompt' column, text "
                    "or turns: rename 'messages' to 'prompt')"
                ) from None
            origins.append(Origins.of(source, len(table)))
            continue
        if data.template is not None:
            table = apply_template(table, data.template, key, source.place)
        table = map_columns(table, data.columns, required, optional, key=f"{key} ({item})")
        check_fields(table, source, key, data.columns, required, data if classify else None)
        source = replace(source, columns=tuple((f, c) for f, c in data.columns.items() if f != c))
        parts.append(table)
        origins.append(Origins.of(source, len(table)))
    return _combine(parts, items, key), Origins.concat(origins)


# Below this many rows, starting worker processes costs more than tokenising in one.
PARALLEL_MIN_ROWS = 20_000
MAP_BATCH_ROWS = 1000


def available_cores() -> int:
    """The cores this process may run on (its scheduler affinity: a container's or taskset's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Set while map_batches starts its worker processes: each dies with this one. Without it a kill -9 (an
# out-of-memory kill, a scheduler's) left them holding ~400 MB each, for good.
_WORKERS_PARENT: int | None = None


def _die_with_parent() -> None:
    global _WORKERS_PARENT
    parent, _WORKERS_PARENT = _WORKERS_PARENT, None  # this process's own children are not the map's workers
    if parent is None:
        return
    # The parent decides what a stop signal does (it kills its workers): Ctrl-C, sent to the terminal's whole process
    # group, is not a worker's to act on (each printed a KeyboardInterrupt traceback); SIGTERM ends one at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above: nothing will signal this process
        os._exit(1)


os.register_at_fork(after_in_child=_die_with_parent)


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
    if workers == 1:
        return _map(rows, function, output, fingerprint, description)
    # Each worker tokenises on one thread; the tokenizer's own thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if output is not None:
        return _map_in_workers(rows, function, workers, fingerprint, description, output)
    with tempfile.TemporaryDirectory(prefix="finetune-features-") as scratch:
        mapped = _map_in_workers(rows, function, workers, fingerprint, description, Path(scratch) / "features.arrow")
        return concatenate_datasets([Dataset.from_file(f["filename"], in_memory=True) for f in mapped.cache_files])


def _map(
    rows: Dataset,
    function: Callable[[dict[str, Any], list[int]], dict[str, Any]],
    output: Path | None,
    fingerprint: str,
    description: str | None,
) -> Dataset:
    return rows.map(
        function,
        batched=True,
        batch_size=MAP_BATCH_ROWS,
        with_indices=True,
        remove_columns=rows.column_names,
        keep_in_memory=output is None,
        cache_file_name=str(output) if output else None,
        new_fingerprint=fingerprint,
        desc=description,
    )


def _map_in_workers(
    rows: Dataset,
    function: Callable[[dict[str, Any], list[int]], dict[str, Any]],
    workers: int,
    fingerprint: str,
    description: str,
    output: Path,
) -> Dataset:
    """map_batches over contiguous shards, one forked process each, into `output`'s shard files. finetune's own
    processes, not `datasets`' pool: a stop (Ctrl-C, SIGTERM, to this process or its group) kills them and the
    command ends with the signal's exit code, where the pool's and its manager's clean-up hung or ended in an
    internal error. A failing row's error (a DataError naming it) comes back from its worker; the first shard's first."""
    import multiprocessing
    import multiprocessing.connection

    from datasets.utils.tqdm import tqdm

    global _WORKERS_PARENT
    context = multiprocessing.get_context("fork")
    done = context.Value("q", 0)
    parts, processes, replies = [], [], []
    offset = 0
    _WORKERS_PARENT = os.getpid()
    try:
        for index in range(workers):
            shard = rows.shard(workers, index, contiguous=True)
            part = output.with_name(f"{output.stem}-{index:05d}-of-{workers:05d}{output.suffix}")
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_map_shard,
                args=(shard, function, offset, part, f"{fingerprint}-{index}-of-{workers}", done, send),
                daemon=True,
            )
            process.start()
            send.close()
            parts.append(part)
            processes.append(process)
            replies.append(receive)
            offset += len(shard)
    except BaseException:
        _stop(processes, parts)
        raise
    finally:
        _WORKERS_PARENT = None
    answers: dict[int, BaseException | None] = {}
    try:
        with tqdm(total=len(rows), desc=f"{description} (workers={workers})", unit=" examples") as bar:
            while len(answers) < workers:
                # Each answer read as soon as it comes: a worker blocks in send() until a large error (a long row
                # quoted) is read, and reading only after every worker had ended waited for it for ever.
                pending = [replies[i] for i in range(workers) if i not in answers]
                for ready in multiprocessing.connection.wait(pending, timeout=0.2):
                    index = replies.index(ready)  # type: ignore[arg-type]
                    try:
                        answers[index] = replies[index].recv()
                    except EOFError:  # the worker ended without answering (killed): its exit code says how
                        answers[index] = _ended(processes[index], description)
                bar.update(done.value - bar.n)
            bar.update(done.value - bar.n)
        for process in processes:
            process.join()
        # The first shard's error first, whichever worker met its error sooner: the same message every time.
        error = next((answers[i] for i in range(workers) if answers[i] is not None), None)
        if error is not None:
            raise error
    except BaseException:
        _stop(processes, parts)
        raise
    finally:
        for reply in replies:
            reply.close()
    return concatenate_datasets([Dataset.from_file(str(part)) for part in parts])


def _ended(process: Any, description: str) -> BaseException:
    """Why a worker ended without answering."""
    process.join()
    if process.exitcode is not None and process.exitcode < 0:
        signum = -process.exitcode
        why = (
            " (the out-of-memory killer, often: data.num_workers=1 tokenises in this process, with less memory)"
            if signum == signal.SIGKILL
            else ""
        )
        return WorkerKilled(f"{description}: a worker process was killed by {signal.Signals(signum).name}{why}", signum)
    return RuntimeError(f"{description}: a worker process ended with exit code {process.exitcode}")


def _map_shard(
    shard: Dataset,
    function: Callable[[dict[str, Any], list[int]], dict[str, Any]],
    offset: int,
    part: Path,
    fingerprint: str,
    done: Any,
    send: Any,
) -> None:
    """One worker of _map_in_workers: its shard into `part`, row numbers counted from the whole table's start; sends
    None, or the error that stopped it."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # the parent shows one bar for all workers

    def shifted(batch: dict[str, Any], indices: list[int]) -> dict[str, Any]:
        out = function(batch, [offset + i for i in indices])
        with done.get_lock():
            done.value += len(indices)
        return out

    try:
        _map(shard, shifted, part, fingerprint, None)
        send.send(None)
    except BaseException as error:  # every error goes to the parent, which raises it
        if not isinstance(error, FinetuneError):  # a bug's traceback, for --debug: the worker's own
            error.add_note("".join(traceback.format_exception(error)))
        try:
            send.send(error)
        except Exception:  # an error that does not pickle: its words
            send.send(RuntimeError(f"{type(error).__name__}: {error}"))


def _stop(processes: list[Any], parts: list[Path]) -> None:
    """Kill the workers still running and remove what they wrote (their shard files)."""
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join()
    for part in parts:
        part.unlink(missing_ok=True)


# Retrieval features: each row's positive passage. Rows sharing one must not meet in a batch (training/loop.py).
POSITIVE_COLUMN = "positive_input_ids"


def shared_positives(features: Dataset) -> list[bytes] | None:
    """Per row, a digest of its positive passage's tokens, where some rows share one; None otherwise."""
    if POSITIVE_COLUMN not in features.column_names:
        return None
    keys = [
        hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()
        for batch in features.select_columns([POSITIVE_COLUMN]).iter(batch_size=MAP_BATCH_ROWS)
        for ids in batch[POSITIVE_COLUMN]
    ]
    return keys if len(set(keys)) < len(keys) else None


def token_lengths(features: Dataset) -> np.ndarray:
    """Tokens per row of a features table, read from Arrow's list offsets (no row becomes a Python list)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    # Preference features hold a pair (or a row and its KL sequence): their first sequence stands for the row.
    column = next(name for name in features.column_names if name.endswith("input_ids"))
    chunks = features.data.column(column).chunks  # per chunk: a memory-mapped table is never copied whole
    value_type = features.data.column(column).type.value_type
    if pa.types.is_list(value_type) or pa.types.is_large_list(value_type):
        # A group of sequences per row (a reranker's query with its candidates): its longest one sets the row's
        # padded width, which is what length grouping must sort by (the group's size is the same for every row).
        parts = []
        for chunk in chunks:
            counts = pc.list_value_length(chunk).fill_null(0).to_numpy(zero_copy_only=False)
            inner = pc.list_value_length(pc.list_flatten(chunk)).to_numpy(zero_copy_only=False)
            longest = np.zeros(len(counts), dtype=np.int64)
            filled = counts > 0
            if filled.any():
                starts = (np.cumsum(counts) - counts)[filled]
                longest[filled] = np.maximum.reduceat(inner, starts)
            parts.append(longest)
    else:
        parts = [pc.list_value_length(chunk).to_numpy(zero_copy_only=False) for chunk in chunks]
    lengths = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if features._indices is not None:  # a selection of the table's rows
        lengths = lengths[features._indices.column(0).to_numpy()]
    return lengths


def draw_eval_split(
    labels: LabelCodes | None, rows: int, fraction: float, seed: int, stratify: bool | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(training rows, eval rows, how they were drawn) for data.eval_split, a pure function of the seed.

    Stratified by label (`labels`: single-label classification; None otherwise) when every class has two rows or
    more: each class gives the eval split its share of rows, rounded by largest remainder, and keeps at least one
    training row. Otherwise random (the permutation `datasets` draws for the same seed); in classification the rows
    of a class with a single row stay in training, where the model can learn it.
    """
    held_out = math.ceil(fraction * rows)
    if rows - held_out < 1:
        most = (rows - 1) / rows if rows > 1 else 0
        fix = f"use data.eval_split <= {math.floor(most * 1000) / 1000:g}" if most >= 0.001 else "add rows"
        raise DataError(
            f"data.eval_split: {fraction:g} of the {rows} training row(s) holds out {held_out} for evaluation and "
            f"leaves {rows - held_out} to train on; {fix}, or give an eval file (data.eval)"
        )
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {"fraction": fraction, "seed": seed, "rows": rows}
    lone: list[str] = []
    if labels is None and stratify is True:
        raise DataError("data.stratify: only single-label classification is stratified by label; remove it")
    if labels is not None:
        counts = np.bincount(labels.codes, minlength=len(labels.names))
        lone = sorted(labels.names[k] for k in np.flatnonzero(counts == 1))
        if stratify is True and lone:
            raise DataError(
                f"data.stratify: a stratified split needs two rows of every class; {len(lone)} class(es) have one: "
                f"{', '.join(map(repr, lone))}"
            )
        if stratify is not False and not lone:
            train, held = _stratified(labels.codes, counts, held_out, rng)
            info.update(method="stratified", note=f"stratified by label over {int((counts > 0).sum())} classes")
            return train, held, {**info, "train_rows": len(train), "eval_rows": len(held)}
    permutation = rng.permutation(rows)
    if labels is not None and lone:  # a class with one row cannot be both learnt and evaluated: it stays in training
        single = (counts == 1)[labels.codes][permutation]
        permutation = np.concatenate([permutation[~single], permutation[single]])
        others = int((~single).sum())
        if others == 0:
            raise DataError(
                f"data.eval_split: every class of the {rows} training row(s) has a single row, which stays in "
                "training (a class cannot be both learnt and evaluated from one row); give an eval file (data.eval) "
                "or more rows of each class"
            )
        if held_out > others and stratify is not False:  # a random draw would reach the single rows
            train, held = _stratified(labels.codes, counts, held_out, rng)
            note = (
                f"stratified among the classes with two rows or more, {len(held)} of the {held_out} rows asked held "
                f"out: {len(lone)} class(es) have a single row ({', '.join(lone)}), kept in training"
            )
            info.update(method="stratified", note=note)
            return train, held, {**info, "train_rows": len(train), "eval_rows": len(held)}
    held, train = permutation[:held_out], permutation[held_out:]
    if labels is None:
        note = "random"
    elif stratify is False:
        note = "random (data.stratify: false)"
    else:
        note = f"random, not stratified: {len(lone)} class(es) have a single row ({', '.join(lone)}), kept in training"
    info.update(method="random", note=note)
    return train, held, {**info, "train_rows": len(train), "eval_rows": len(held)}


def _stratified(
    codes: np.ndarray, counts: np.ndarray, held_out: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    classes = np.flatnonzero(counts)
    quota = counts[classes] * held_out / len(codes)
    take = np.minimum(np.floor(quota).astype(np.int64), counts[classes] - 1)
    order = np.lexsort((rng.random(len(classes)), -(quota - np.floor(quota))))  # largest remainder first
    left = held_out - int(take.sum())
    while left > 0:
        room = [k for k in order if take[k] < counts[classes[k]] - 1]
        if not room:
            break
        for k in room[:left]:
            take[k] += 1
        left = held_out - int(take.sum())
    rows_of = np.split(np.argsort(codes, kind="stable"), np.cumsum(counts)[:-1])
    chosen = [rng.permutation(rows_of[c])[: take[k]] for k, c in enumerate(classes)]
    held = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(codes)), held), held


@dataclass(frozen=True)
class LabelCodes:
    """A label column as one code per row and the class names (as classes compare: text), read column-wise."""

    codes: np.ndarray
    names: list[str]


def single_labels(rows: Dataset, data: Any) -> LabelCodes | None:
    """Classification's labels, or None where a text has several (or there are none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "label" not in rows.column_names:
        return None
    values = rows.data.column("label") if rows._indices is None else rows.with_format("arrow")[:].column("label")
    if _label_kind(values, data) == "multi":
        return None
    if pa.types.is_boolean(values.type):  # as str() names them, the way classification compares labels
        values = pa.chunked_array([pc.if_else(values, "True", "False")])
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = pc.cast(values, pa.string())
    encoded = pc.fill_null(values, "").combine_chunks().dictionary_encode()
    # The distinct texts named as classification compares labels (label_key), those it merges given one code: the
    # rows are encoded by Arrow, only the few distinct labels go through Python.
    names = [label_key(text) for text in encoded.dictionary.to_pylist()]
    at = {name: index for index, name in enumerate(dict.fromkeys(names))}
    classes, code = list(at), np.array([at[name] for name in names], dtype=np.int64)
    return LabelCodes(code[encoded.indices.to_numpy(zero_copy_only=False)], classes)


@dataclass
class SplitRows:
    """A recipe's training and eval rows as the task's fields, where each came from, and how data.eval_split drew
    them (None: an eval file)."""

    train: Dataset
    eval: Dataset
    origins: dict[str, Origins]  # by split key: data.train, data.eval
    eval_split: dict[str, Any] | None = None

    def select(self, split: str, indices: ArrayLike) -> None:
        """Keep only these rows of a split (and their origins)."""
        indices = np.asarray(indices, dtype=np.int64)
        if split == "data.train":
            self.train = self.train.select(indices, keep_in_memory=True)
        else:
            self.eval = self.eval.select(indices, keep_in_memory=True)
        self.origins[split] = self.origins[split].take(indices)


def read_splits(
    recipe: Recipe,
    required: Sequence[str],
    optional: Sequence[str],
    classify: bool,
    conversations: bool = False,
    judged: tuple[str, str] | None = None,
) -> SplitRows:
    """The rows a recipe trains and evaluates on (data.train, data.eval or data.eval_split, the sample limits),
    as the task's fields, each field's type checked, each row's place in its file kept."""
    data = recipe.data
    train, train_origins = read_split(
        data.train, "data.train", recipe, required, optional, classify, conversations, judged
    )
    if data.eval is not None:
        eval_rows, eval_origins = read_split(
            data.eval, "data.eval", recipe, required, optional, classify, conversations, judged
        )
        rows = SplitRows(train, eval_rows, {"data.train": train_origins, "data.eval": eval_origins})
    else:
        assert data.eval_split is not None  # the rules require data.eval or data.eval_split
        labels = single_labels(train, data) if classify else None
        stratify = data.stratify
        kept, held, drawn = draw_eval_split(labels, len(train), data.eval_split, recipe.train.seed, stratify)
        rows = SplitRows(train, train, {"data.train": train_origins, "data.eval": train_origins}, drawn)
        rows.select("data.eval", held)
        rows.select("data.train", kept)
    if data.max_train_samples:
        rows.select("data.train", range(min(len(rows.train), data.max_train_samples)))
    if data.max_eval_samples:
        rows.select("data.eval", range(min(len(rows.eval), data.max_eval_samples)))
    return rows


def check_eval_labels(rows: SplitRows, data: Any) -> list[str]:
    """Single-label classification: eval labels that no training row has. Those data.labels lists are returned
    (the model has them as classes, never trained: the data report warns); any other is refused (exit 3), named
    with its rows, since nothing could ever predict it."""
    train_labels, eval_labels = single_labels(rows.train, data), single_labels(rows.eval, data)
    if train_labels is None or eval_labels is None:
        return []
    trained = {train_labels.names[c] for c in np.unique(train_labels.codes)}
    listed = None if data.labels is None else {label_key(label) for label in data.labels}
    missing = [(eval_labels.names[c], c) for c in np.unique(eval_labels.codes) if eval_labels.names[c] not in trained]
    refused = [(label, code) for label, code in missing if listed is None or label not in listed]
    if refused:
        origins = rows.origins["data.eval"]
        shown = []
        alike = {str(name).strip().casefold(): name for name in sorted(trained, key=str)}
        for label, code in refused:
            where = np.flatnonzero(eval_labels.codes == code)
            twin = alike.get(str(label).strip().casefold())  # the same class written otherwise ("SPORTS", "sports ")
            shown.append(
                f"{label!r}: {len(where)} row(s), first at {origins.place(int(where[0]))}"
                + (f" (training has {twin!r}, which differs only in case or spaces)" if twin is not None else "")
            )
        if listed is None:
            fix = "give data.train rows of these classes, or list every class in data.labels to evaluate them untrained"
        else:
            fix = "they are not in data.labels either; add them there or remove those rows"
        raise DataError(f"data.eval: label(s) that no training row has ({'; '.join(shown)}); {fix}")
    return sorted(label for label, _ in missing)


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


class TooLong(DataError):
    """Rows longer than data.max_length under `data.overflow: error`, named by their numbers (`rows`: 0-based), so
    that a caller reading two sequences per row (preference pairs) names the rows of both at once."""

    def __init__(self, split: str, rows: ArrayLike, max_length: int, what: str = "example"):
        self.split, self.rows, self.max_length, self.what = split, np.unique(np.asarray(rows)), max_length, what
        count, shown = self.rows.size, ", ".join(str(i + 1) for i in self.rows[:5])
        super().__init__(
            f"{split}: {count} {what}{'s exceed' if count > 1 else ' exceeds'} data.max_length={max_length} tokens "
            f"(rows {shown}{', ...' if count > 5 else ''}); raise max_length or set data.overflow to truncate or drop"
        )

    def __reduce__(self) -> tuple[type, tuple]:  # raised in a worker process, it crosses back to the parent whole
        return (TooLong, (self.split, self.rows, self.max_length, self.what))


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
        raise TooLong(split, too_long, max_length, what)
    if policy == "drop":
        report.dropped = int(too_long.size)
        keep = np.flatnonzero(lengths <= max_length)
    else:
        report.truncated = int(too_long.size)
        keep = np.arange(lengths.size)
    if not keep.size:
        raise DataError(f"{split}: every row was dropped by data.overflow=drop (max_length={max_length})")
    return keep, report
