"""Strict readers and shared helpers for the data loaders.

Every loader (KuaiRand, MovieLens, custom) reads its files through :func:`read_csv_strict` or
:func:`read_parquet_strict`, which turn every kind of malformed input into a :class:`DataValidationError` whose
message names the file and, where it applies, the column, the offending value and the line number:

- missing file, empty file, header-only file;
- wrong delimiter (a ``;`` file read with ``,`` collapses to one column: the message says which delimiter the file
  seems to use);
- a row with the wrong number of fields (e.g. a truncated last line): the line number;
- a header without a required column: its name;
- text in a numeric column: the column, the value and the line;
- missing / NaN / inf values where they cannot be, negative values in non-negative columns: the column and line;
- duplicate ids: the column, the value and both lines.

Line numbers count physical lines from 1 and include the header line and any empty line (which pyarrow skips);
they assume that no quoted field spans several lines (true of every file format these loaders read). A compressed
file (gzip, zip, xz, zstd) or a parquet file under a CSV name is refused naming what it is.

The module also holds the helpers every loader shares: the time-unit check, request / position assignment from
group keys and time, hour / weekday from epoch milliseconds, and the missing-value policy for side tables.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .schema import DataValidationError

log = logging.getLogger(__name__)

#: dtype names accepted in ``dtypes`` and the arrow type each is parsed as.
_ARROW_TYPES: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "str": pa.string(),
}
_NUMERIC = ("int64", "float64")
#: Delimiters tried when a file does not split on the requested one.
_CANDIDATE_SEPS = (",", ";", "\t", "|", "::", " ")
#: Sentinel values of missing categoricals (see :func:`fill_missing_categorical`).
MISSING_INT = -1
MISSING_STR = "missing"
_NON_SPACE = re.compile(rb"\S")

PathLike = str | os.PathLike


def py_scalar(x):
    """A numpy scalar as the plain Python value, so that messages show ``1`` rather than ``np.int64(1)``."""
    return x.item() if isinstance(x, np.generic) else x


# --------------------------------------------------------------------------------------------------------------
# readers


def _sep_name(sep: str) -> str:
    return {"\t": "'\\t' (tab)", " ": "' ' (space)"}.get(sep, repr(sep))


def _first_line(raw: bytes, encoding: str) -> str:
    end = raw.find(b"\n")
    line = raw if end < 0 else raw[:end]
    return line.decode(encoding, errors="replace").lstrip("\ufeff").rstrip("\r")


def _split_header(line: str, sep: str) -> list[str]:
    return [h.strip().strip('"') for h in line.split(sep)]


def _guess_sep(line: str, sep: str, want_fields: int) -> str | None:
    """The candidate delimiter that splits ``line`` into the most fields (at least ``want_fields``), if any."""
    best, best_n = None, 1
    for cand in _CANDIDATE_SEPS:
        if cand == sep:
            continue
        n = len(line.split(cand))
        if n > best_n and n >= max(2, want_fields):
            best, best_n = cand, n
    return best


def _find_bad_row(text: str, sep: str, n_fields: int, quoting: bool, first_line: int) -> tuple[int, int, str]:
    """Slow path, only after a parse error: (line number, field count, text) of the first row with the wrong width."""
    if len(sep) == 1 and quoting:
        reader = csv.reader(io.StringIO(text), delimiter=sep)
        for row in reader:
            if len(row) != n_fields and row:
                return first_line + reader.line_num - 1, len(row), sep.join(row)
    else:
        for k, line in enumerate(text.splitlines()):
            fields = line.split(sep)
            if len(fields) != n_fields and line:
                return first_line + k, len(fields), line
    return -1, -1, ""


#: Leading bytes of files that are not text: what each is.
_MAGIC = ((b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
          (b"PK\x03\x04", "a zip archive", "unzip it first"),
          (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz)"),
          (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd)"),
          (b"PAR1", "a parquet file", "name it *.parquet (the suffix picks the reader)"))


def _check_text(head: bytes, path: Path) -> None:
    """Raise naming what the file is when its first bytes say it is compressed or parquet, not delimited text."""
    for magic, what, fix in _MAGIC:
        if head.startswith(magic):
            raise DataValidationError(f"{path}: is {what}, not a delimited text file; {fix}")


def _open_error(path: Path, exc: OSError) -> DataValidationError:
    return DataValidationError(f"{path}: cannot be read ({exc.strerror or exc})")


def check_file(path: Path) -> None:
    """Raise a :class:`DataValidationError` naming ``path`` unless it is a regular file: missing, a directory, or a
    FIFO / socket / device (reading a FIFO would block until a writer comes, a device would never end)."""
    if not path.exists():
        raise DataValidationError(f"{path}: file not found")
    if path.is_dir():
        raise DataValidationError(f"{path}: is a directory, expected a file")
    if not path.is_file():
        raise DataValidationError(f"{path}: is not a regular file (a FIFO, socket or device); copy the data to a file")


def _read_bytes(path: Path) -> bytes:
    check_file(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _open_error(path, exc) from None
    _check_text(raw[:8], path)
    if _NON_SPACE.search(raw) is None:
        raise DataValidationError(f"{path}: file is empty")
    return raw


def _row_line(raw: bytes, row: int, first_data_line: int) -> int:
    """The physical line (from 1) of data row ``row`` (from 0) of delimited text ``raw`` whose first data row is
    on line ``first_data_line``: pyarrow skips empty lines, and each one before the row shifts it down a line."""
    b = np.frombuffer(raw, dtype=np.uint8)
    ends = np.flatnonzero(b == 10)
    starts = np.r_[0, ends + 1][: len(ends) + 1]
    ends = np.r_[ends, len(b)]
    length = ends - starts
    empty = (length == 0) | ((length == 1) & (b[np.minimum(starts, len(b) - 1)] == 13))
    data = np.flatnonzero(~empty[first_data_line - 1:]) + first_data_line
    return int(data[row]) if row < len(data) else row + first_data_line


def data_line(path: PathLike, row: int, header: bool = True) -> int:
    """The line number (from 1) that messages give for data row ``row`` (from 0) of a file read by
    :func:`read_table_strict`: parquet ``row + 1``; CSV (an ASCII-compatible encoding) the physical line, counting
    the header and empty lines. Reads the file again: for error messages only."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return row + 1
    try:
        raw = path.read_bytes()
    except OSError:
        return row + (2 if header else 1)
    return _row_line(raw, row, 2 if header else 1)


def _check_encoding(raw: bytes, path: Path, encoding: str) -> None:
    """Raise DataValidationError naming the file, line and byte where ``raw`` is not valid ``encoding``."""
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataValidationError(
            f"{path}: line {line} is not valid {encoding} (byte 0x{raw[e.start]:02x} at character {column}); save "
            f"the file as {encoding}, or name its encoding ([csv] encoding = \"latin-1\" in a custom mapping)"
        ) from None
    except LookupError:
        raise DataValidationError(f"{path}: unknown text encoding {encoding!r}") from None


def read_csv_strict(
    path: PathLike,
    required_columns: Sequence[str],
    dtypes: Mapping[str, str] | None = None,
    sep: str = ",",
    *,
    names: Sequence[str] | None = None,
    encoding: str = "utf-8",
    quoting: bool = True,
    nullable: Iterable[str] = (),
    nonnegative: Iterable[str] = (),
    unique: Iterable[str] = (),
    usecols: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read a delimited text file with strict checks; return a DataFrame with one row per data line.

    path: the file. required_columns: columns the header must have (with ``names``: columns ``names`` must have).
    dtypes: column -> "int64" | "float64" | "str"; other columns are typed by pyarrow's inference.
    sep: the delimiter; several characters (MovieLens-1M's ``::``) are allowed.
    names: the column names of a file without a header line (MovieLens); None = the first line is the header.
    encoding: the file's text encoding (MovieLens item tables are latin-1).
    quoting: whether '"' quotes fields (off for files whose titles hold stray quotes).
    nullable: columns that may hold empty / NaN values (returned as NaN, or None for "str"); every other column
      must be complete. Integer columns in ``nullable`` come back as float64 when they hold NaN.
    nonnegative: numeric columns whose values must be >= 0. unique: columns whose values must be unique (ids).
    usecols: keep only these columns (default: all).

    Float columns never accept +-inf. Raises DataValidationError naming the file for every problem listed in the
    module docstring.
    """
    path = Path(path)
    dtypes = dict(dtypes or {})
    for col, dt in dtypes.items():
        if dt not in _ARROW_TYPES:
            raise ValueError(f"read_csv_strict: dtype {dt!r} of column {col!r} is not one of {list(_ARROW_TYPES)}")
    raw = _read_bytes(path)
    _check_encoding(raw, path, encoding)
    header = _first_line(raw, encoding)
    fields = _split_header(header, sep)
    want = len(names) if names is not None else len(required_columns)
    if len(fields) == 1 and want > 1:
        guess = _guess_sep(header, sep, want)
        hint = f"; the file seems to use {_sep_name(guess)}" if guess else ""
        raise DataValidationError(
            f"{path}: line 1 does not split on the delimiter {_sep_name(sep)} (one field {header[:80]!r}){hint}"
        )
    if names is None:
        columns = fields
        missing = [c for c in required_columns if c not in columns]
        if missing:
            raise DataValidationError(
                f"{path}: header has no required column {missing[0]!r} (needs {list(required_columns)}; "
                f"has {columns})"
            )
        dup = sorted({c for c in columns if columns.count(c) > 1})
        if dup:
            raise DataValidationError(f"{path}: header names column {dup[0]!r} more than once")
        first_data_line = 2
    else:
        columns = list(names)
        missing = [c for c in required_columns if c not in columns]
        if missing:
            raise ValueError(f"read_csv_strict: required column {missing[0]!r} is not in names {columns}")
        first_data_line = 1

    def line_of(row: int) -> int:
        return _row_line(raw, row, first_data_line)

    if len(sep) > 1:
        # pyarrow takes a one-byte delimiter only: map the multi-character one onto the ASCII unit separator.
        if b"\x1f" in raw:
            raise DataValidationError(f"{path}: holds the control byte 0x1f, cannot re-delimit {sep!r}")
        raw = raw.replace(sep.encode(encoding), b"\x1f")
        arrow_sep = "\x1f"
    else:
        arrow_sep = sep
    newline = raw.find(b"\n")
    if names is None and (newline < 0 or _NON_SPACE.search(raw, newline + 1) is None):
        raise DataValidationError(f"{path}: has a header line but no data rows")

    bad_rows: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row.actual_columns)
        return "error"

    keep = list(usecols) if usecols is not None else None
    col_types = {c: _ARROW_TYPES[t] for c, t in dtypes.items() if c in columns}
    # the header's names as checked above (spaces around a name stripped), not pyarrow's own reading of line 1
    read_opts = pacsv.ReadOptions(encoding=encoding, column_names=columns, skip_rows=0 if names is not None else 1,
                                  block_size=1 << 24)
    parse_opts = pacsv.ParseOptions(delimiter=arrow_sep, quote_char='"' if quoting else False,
                                    invalid_row_handler=on_invalid)
    # Only an empty field is missing: pyarrow's default list also takes "NA", "null", "N/A"... as null, which
    # would turn Namibia's country code or a title "Null" into a missing value. Floats still parse "nan".
    convert_opts = pacsv.ConvertOptions(column_types=col_types, null_values=[""], strings_can_be_null=True,
                                        include_columns=keep, quoted_strings_can_be_null=True)
    try:
        table = pacsv.read_csv(io.BytesIO(raw), read_options=read_opts, parse_options=parse_opts,
                               convert_options=convert_opts)
    except pa.ArrowInvalid as exc:
        msg = str(exc)
        if bad_rows or "Expected" in msg and "columns" in msg:
            text = raw.decode(encoding, errors="replace")
            if names is None:
                text = text.split("\n", 1)[1] if "\n" in text else ""
            line, got, row = _find_bad_row(text, arrow_sep, len(columns), quoting, first_data_line)
            where = f"line {line}" if line > 0 else "a line"
            raise DataValidationError(
                f"{path}: {where} has {got} field(s), expected {len(columns)} ({row[:80]!r}; truncated or "
                f"malformed row)"
            ) from None
        if "conversion error" in msg:
            _raise_conversion_error(raw, path, read_opts, parse_opts, keep, dtypes, columns, line_of)
        raise DataValidationError(f"{path}: cannot parse: {msg}") from None
    if table.num_rows == 0:
        raise DataValidationError(f"{path}: has no data rows")
    nullable = set(nullable)
    for col in table.column_names:
        arr = table.column(col)
        if arr.null_count and col not in nullable:
            row = int(np.flatnonzero(pc.is_null(arr).to_numpy(zero_copy_only=False))[0])
            raise DataValidationError(
                f"{path}: column {col!r} has a missing value at line {line_of(row)}"
            )
    df = table.to_pandas()
    _check_values(df, str(path), nullable, nonnegative, unique, line_of)
    return df


def _raise_conversion_error(raw: bytes, path: Path, read_opts, parse_opts, keep, dtypes: Mapping[str, str],
                            columns: Sequence[str], line_of: Callable[[int], int]) -> None:
    """Slow path, only after a conversion error: find the first non-numeric value of a numeric column."""
    as_text = {c: pa.string() for c, t in dtypes.items() if t in _NUMERIC and c in columns}
    table = pacsv.read_csv(io.BytesIO(raw), read_options=read_opts, parse_options=parse_opts,
                           convert_options=pacsv.ConvertOptions(column_types=as_text, null_values=[""],
                                                                strings_can_be_null=True, include_columns=keep))
    for col in as_text:
        s = table.column(col).to_pandas()
        num = pd.to_numeric(s.str.strip(), errors="coerce")
        bad = s.notna() & num.isna()
        if dtypes[col] == "int64":
            # "1.5" parses as a number but is not an integer; "1.0" or "1e3" are not integer literals either
            bad |= s.notna() & ~s.str.fullmatch(r"\s*[+-]?\d+\s*").fillna(False).astype(bool)
            bad |= num.notna() & (num.abs() >= 2.0**63)  # an integer beyond int64
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataValidationError(
                f"{path}: column {col!r} must be {dtypes[col]} but line {line_of(row)} holds "
                f"{py_scalar(s.iloc[row])!r}{_date_hint(s.iloc[row])}"
            )
    raise DataValidationError(f"{path}: a numeric column holds a value that cannot be parsed")


def _date_hint(value: str) -> str:
    """For a number that did not parse: where it reads as a date or time, what a numeric column wants instead."""
    try:
        stamp = pd.Timestamp(value.strip())
    except (ValueError, TypeError, OverflowError):
        return ""
    if pd.isna(stamp):
        return ""
    return (", a date: give times as epoch numbers (seconds or milliseconds, [time] unit), or store them in a "
            "parquet timestamp column")


def _check_values(df: pd.DataFrame, source: str, nullable: set[str], nonnegative: Iterable[str],
                  unique: Iterable[str], line_of: Callable[[int], int]) -> None:
    """NaN / inf / negative / duplicate checks shared by the CSV and parquet readers (``line_of(row)``: the line
    number of 0-based row ``row``, for messages)."""
    for col in df.columns:
        v = df[col].to_numpy()
        if v.dtype.kind == "f":
            bad = np.isinf(v) if col in nullable else ~np.isfinite(v)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataValidationError(
                    f"{source}: column {col!r} has a non-finite value {py_scalar(v[row])!r} at line {line_of(row)}"
                )
        elif col not in nullable and df[col].isna().any():
            row = int(np.flatnonzero(df[col].isna().to_numpy())[0])
            raise DataValidationError(f"{source}: column {col!r} has a missing value at line {line_of(row)}")
    for col in nonnegative:
        if col not in df.columns:
            continue
        v = df[col].to_numpy()
        if v.dtype.kind not in "fiu":
            continue
        with np.errstate(invalid="ignore"):
            bad = v < 0
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataValidationError(
                f"{source}: column {col!r} has a negative value {py_scalar(v[row])!r} at line {line_of(row)}"
            )
    for col in unique:
        if col not in df.columns:
            continue
        dup = df[col].duplicated(keep=False).to_numpy()
        if dup.any():
            rows = np.flatnonzero(dup)
            value = df[col].iloc[rows[0]]
            second = rows[1:][df[col].iloc[rows[1:]].to_numpy() == value][0]
            raise DataValidationError(
                f"{source}: column {col!r} has duplicate id {py_scalar(value)!r} (lines {line_of(rows[0])} and "
                f"{line_of(second)})"
            )


def read_parquet_strict(
    path: PathLike,
    required_columns: Sequence[str],
    dtypes: Mapping[str, str] | None = None,
    *,
    nullable: Iterable[str] = (),
    nonnegative: Iterable[str] = (),
    unique: Iterable[str] = (),
    usecols: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read a parquet file with the checks of :func:`read_csv_strict` ("line" there = row index + 1 here).

    dtypes: column -> "int64" | "float64" | "str"; a column whose stored values cannot be cast raises, naming it.
    """
    path = Path(path)
    schema = _parquet_schema(path)
    missing = [c for c in required_columns if c not in schema.names]
    if missing:
        raise DataValidationError(
            f"{path}: has no required column {missing[0]!r} (needs {list(required_columns)}; has {schema.names})"
        )
    try:
        df = pq.read_table(path, columns=list(usecols) if usecols is not None else None).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(f"{path}: not a readable parquet file ({exc})") from None
    if len(df) == 0:
        raise DataValidationError(f"{path}: has no rows")
    for col, dt in (dtypes or {}).items():
        if col in df.columns:
            df[col] = _cast_column(df[col], dt, str(path), col, first_line=1)
    _check_values(df, str(path), set(nullable), nonnegative, unique, lambda row: row + 1)
    return df


def parquet_timestamp(path: PathLike, column: str) -> pa.DataType | None:
    """The stored type of ``column`` in a parquet file where it is a timestamp (``timestamp[us, tz=UTC]``, ...);
    None for a column of another type, a file without it, or a file that is not parquet."""
    path = Path(path)
    if path.suffix.lower() not in (".parquet", ".pq"):
        return None
    schema = _parquet_schema(path)
    if column not in schema.names:
        return None
    kind = schema.field(column).type
    return kind if pa.types.is_timestamp(kind) else None


def epoch_ms_of_timestamps(s: pd.Series, utc_offset_hours: float) -> np.ndarray:
    """float64 [N] epoch milliseconds of a timestamp column ``s`` (datetime64, any unit): the instant where it has a
    time zone; where it has none, its wall-clock time read in the log's local time (``utc_offset_hours``)."""
    if s.dt.tz is not None:
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
        offset_ms = 0
    else:
        offset_ms = int(round(utc_offset_hours * 3_600_000))
    return (s.to_numpy().astype("datetime64[ms]").astype(np.int64) - offset_ms).astype(np.float64)


def _parquet_schema(path: Path) -> pa.Schema:
    check_file(path)
    try:
        return pq.read_schema(path)
    except PermissionError as exc:
        raise _open_error(path, exc) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(f"{path}: not a readable parquet file ({exc})") from None


def _cast_column(s: pd.Series, dtype: str, source: str, col: str, first_line: int) -> pd.Series:
    """Cast ``s`` to "int64" / "float64" / "str"; a value that does not convert raises naming it and its line."""
    if dtype == "str":
        return s.astype("str").where(s.notna(), None) if s.dtype.kind != "O" else s
    if s.dtype.kind in "biu":
        # Through float64 an id above 2**53 would lose its last digits.
        return s.astype("int64") if dtype == "int64" else s.astype("float64")
    num = pd.to_numeric(s, errors="coerce") if s.dtype.kind != "f" else s
    bad = s.notna().to_numpy() & num.isna().to_numpy()
    if dtype == "int64":
        with np.errstate(invalid="ignore"):
            bad |= num.notna().to_numpy() & (num.to_numpy() != np.floor(num.to_numpy()))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = py_scalar(s.iloc[row])
        raise DataValidationError(f"{source}: column {col!r} must be {dtype} but line {row + first_line} holds "
                                  f"{value!r}{_date_hint(value) if isinstance(value, str) else ''}")
    if dtype == "int64" and not num.isna().any():
        return num.astype("int64")  # integer-valued: exact when to_numeric parsed it as int64
    return num.astype("float64")


def read_table_strict(path: PathLike, required_columns: Sequence[str], dtypes: Mapping[str, str] | None = None,
                      sep: str = ",", **checks) -> pd.DataFrame:
    """:func:`read_parquet_strict` for ``*.parquet`` / ``*.pq`` files, else :func:`read_csv_strict`."""
    if Path(path).suffix.lower() in (".parquet", ".pq"):
        return read_parquet_strict(path, required_columns, dtypes, **checks)
    return read_csv_strict(path, required_columns, dtypes, sep, **checks)


def table_columns(path: PathLike, sep: str = ",", encoding: str = "utf-8") -> list[str]:
    """The column names of a parquet file (its schema) or a CSV file (its header line), reading nothing else."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return list(_parquet_schema(path).names)
    check_file(path)
    try:
        with open(path, "rb") as f:
            line = f.readline(1 << 20)
    except OSError as exc:
        raise _open_error(path, exc) from None
    _check_text(line[:8], path)
    _check_encoding(line, path, encoding)
    return _split_header(_first_line(line, encoding), sep)


def expand_glob(pattern: PathLike) -> list[Path]:
    """The files matching ``pattern``, sorted by name; an empty match raises naming the pattern."""
    paths = sorted(Path(p) for p in glob.glob(str(pattern)))
    if not paths:
        raise DataValidationError(f"{pattern}: no file matches")
    return paths


# --------------------------------------------------------------------------------------------------------------
# time, requests, positions

#: Epoch values below this many milliseconds (1973-03-03) are taken to be seconds read as milliseconds.
_MIN_PLAUSIBLE_MS = 10**11
#: Epoch values above this many milliseconds (year 5138) are taken to be micro- or nanoseconds.
MAX_PLAUSIBLE_MS = 10**14


def check_time_unit(values: np.ndarray, unit: str, source: str, column: str, first_line: int | None = None,
                    line_of: Callable[[int], int] | None = None) -> None:
    """Check that epoch timestamps ``values`` [N] look like ``unit`` ("ms" or "s").

    Milliseconds must lie in [1e11, 1e14) (1973 .. 5138); seconds in [1e8, 1e11) (1973 .. 5138). A value outside
    raises DataValidationError naming the file, the column, the value, its place (``line line_of(row)`` or ``line
    row + first_line`` when given, else the 0-based row) and the unit it seems to be in.
    """
    if unit not in ("ms", "s"):
        raise ValueError(f"time unit must be 'ms' or 's', got {unit!r}")
    v = np.asarray(values)
    scale = 1 if unit == "ms" else 1000
    lo, hi = _MIN_PLAUSIBLE_MS // scale, MAX_PLAUSIBLE_MS // scale
    bad = (v < lo) | (v >= hi)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        x = v[row]
        where = (f"line {line_of(row)}" if line_of is not None else f"line {row + first_line}"
                 if first_line is not None else f"row {row}")
        seems = ("seconds" if 10**8 <= x < 10**11 else "milliseconds" if 10**11 <= x < 10**14
                 else "microseconds or nanoseconds" if x >= 10**14 else "not an epoch time")
        raise DataValidationError(
            f"{source}: column {column!r} should hold epoch {'milliseconds' if unit == 'ms' else 'seconds'} "
            f"but {where} has {py_scalar(x)!r}, which looks like {seems}"
        )


def hour_weekday(time_ms: np.ndarray, utc_offset_hours: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Local hour (0-23) and weekday (0 = Monday .. 6 = Sunday) of epoch milliseconds ``time_ms`` [N], int8 [N]."""
    local = np.asarray(time_ms, dtype=np.int64) + int(round(utc_offset_hours * 3_600_000))
    hour = (local // 3_600_000) % 24
    # 1970-01-01 was a Thursday (weekday 3).
    weekday = (local // 86_400_000 + 3) % 7
    return hour.astype(np.int8), weekday.astype(np.int8)


def yyyymmdd(time_ms: np.ndarray, utc_offset_hours: float = 0.0) -> np.ndarray:
    """Local calendar date of epoch milliseconds ``time_ms`` [N] as int64 YYYYMMDD [N]."""
    local = np.asarray(time_ms, dtype=np.int64) + int(round(utc_offset_hours * 3_600_000))
    day = (local // 86_400_000).astype("datetime64[D]")
    month = day.astype("datetime64[M]")
    year = month.astype("datetime64[Y]").astype(np.int64) + 1970
    mon = month.astype(np.int64) % 12 + 1
    dom = (day - month.astype("datetime64[D]")).astype(np.int64) + 1
    return year * 10000 + mon * 100 + dom


def assign_requests(group: np.ndarray, time_ms: np.ndarray,
                    tiebreak: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense request ids and positions from a group key.

    group: int64 [N], rows with the same value form one request (e.g. ``groupby(...).ngroup()``).
    time_ms: int64 [N]. tiebreak: int64 [N] second sort key among equal times (default: row order).
    Returns (request_id int64 [N], position int64 [N]): position is the 0-based order by (time_ms, tiebreak)
    within the request; request ids are 0..R-1 in order of each request's first impression (time, tiebreak).
    """
    n = len(group)
    group = np.asarray(group, dtype=np.int64)
    time_ms = np.asarray(time_ms, dtype=np.int64)
    tb = np.arange(n, dtype=np.int64) if tiebreak is None else np.asarray(tiebreak, dtype=np.int64)
    order = np.lexsort((tb, time_ms, group))
    g_sorted = group[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    run = np.diff(np.r_[starts, n])
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n, dtype=np.int64) - np.repeat(starts, run)
    # The first row of each run is the request's first impression; rank the runs by its (time, tiebreak).
    first = order[starts]
    run_rank = np.empty(len(starts), dtype=np.int64)
    run_rank[np.lexsort((tb[first], time_ms[first]))] = np.arange(len(starts), dtype=np.int64)
    request_id = np.empty(n, dtype=np.int64)
    request_id[order] = np.repeat(run_rank, run)
    return request_id, position


def group_ids(df: pd.DataFrame, keys: Sequence[str]) -> np.ndarray:
    """int64 [N] id of each row's ``keys`` combination (vectorised; NaN keys are a value of their own)."""
    return df.groupby(list(keys), sort=False, dropna=False).ngroup().to_numpy(np.int64)


def sort_impressions(imp: pd.DataFrame) -> pd.DataFrame:
    """Impressions ordered by (request_id, position), with a fresh 0..N-1 index."""
    order = np.lexsort((imp["position"].to_numpy(), imp["request_id"].to_numpy()))
    return imp.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------
# missing values in side tables


def fill_missing_categorical(df: pd.DataFrame, cols: Iterable[str], source: str) -> None:
    """In place: categorical columns get their own "missing" value instead of NaN.

    Whole-number float columns (integer codes that became float because of NaN) become int64 with -1
    (:data:`MISSING_INT`) for missing; text columns get "missing" (:data:`MISSING_STR`). A float code with a
    fraction raises, naming the column and value.
    """
    for col in cols:
        s = df[col]
        n_missing = int(s.isna().sum())
        if pd.api.types.is_float_dtype(s):
            v = s.to_numpy()
            frac = np.isfinite(v) & (v != np.floor(v))
            if frac.any():
                raise DataValidationError(
                    f"{source}: categorical column {col!r} holds a non-integer code {py_scalar(v[frac][0])!r}"
                )
            df[col] = np.where(np.isnan(v), MISSING_INT, v).astype(np.int64)
        elif pd.api.types.is_integer_dtype(s) or pd.api.types.is_bool_dtype(s):
            df[col] = s.astype(np.int64)
        else:
            df[col] = s.astype("str").where(s.notna(), MISSING_STR).astype("str")
        if n_missing:
            log.info("%s: column %r: %d missing value(s) -> their own category", source, col, n_missing)


def fill_missing_numeric(df: pd.DataFrame, cols: Iterable[str], source: str) -> list[str]:
    """In place: NaN in numeric columns -> the column median, plus a 0/1 column ``<col>_missing``.

    The flag keeps the information that the value was absent (a median alone would hide it). Returns the names of
    the flag columns added (one per column that had a NaN). A column with no finite value at all raises.
    """
    added = []
    for col in cols:
        v = df[col].to_numpy(dtype=np.float64)
        miss = np.isnan(v)
        if not miss.any():
            df[col] = v
            continue
        if miss.all():
            raise DataValidationError(f"{source}: numeric column {col!r} has no value at all")
        med = float(np.median(v[~miss]))
        df[col] = np.where(miss, med, v)
        flag = f"{col}_missing"
        df[flag] = miss.astype(np.int64)
        added.append(flag)
        log.info("%s: column %r: %d missing value(s) -> median %g and flag %r", source, col, int(miss.sum()), med,
                 flag)
    return added
