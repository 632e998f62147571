"""Fast inserts: COPY on PostgreSQL, executemany on SQLite, inside the caller's transaction.

bulk_insert takes rows of Python values (labels, anomaly results). bulk_insert_frame takes a
numeric DataFrame and packs some of its columns into one JSON object per row (telemetry), a
column at a time (in PostgreSQL itself, or with pyarrow for SQLite), because json.dumps on a
million dicts costs many seconds.
Neither commits: both join the caller's atomic block, or open one of their own when called in
autocommit mode, so a failure never leaves part of the rows behind.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from django.db import connections, models, transaction
from django.utils import timezone

from .base import METRIC_NAME_RE

CHUNK_ROWS = 100_000
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970: PostgreSQL's binary epoch
_PG_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # signature, flags, no header extension
_PG_BINARY_TRAILER = b"\xff\xff"
_PG_JSON_PAIRS = 50  # jsonb_build_object takes at most 100 arguments


def bulk_insert(model: type[models.Model], field_names: Sequence[str], rows: Iterable[Sequence[Any]], *,
                using: str = "default") -> int:
    """Insert `rows` (one value per field of `field_names`) into `model`'s table; returns the count.

    Foreign keys are given by field name ("device") or attname ("device_id") and take the pk.
    DateTimeField values must be timezone-aware datetimes or pandas Timestamps (raises ValueError
    for naive ones). JSONField values are dicts/lists; NaN and infinities become null. Other
    values go to the driver as they are. Raises django.db.IntegrityError on a constraint violation
    (the caller's atomic block then rolls back), NotImplementedError for other database vendors.
    """
    connection = connections[using]
    fields = [model._meta.get_field(name) for name in field_names]
    convert = [_converter(field, connection) for field in fields]
    prepared = (tuple(value if c is None else c(value) for c, value in zip(convert, row)) for row in rows)
    return _insert_rows(connection, model, fields, prepared, using=using)


def bulk_insert_columns(model: type[models.Model], columns: Mapping[str, Any], *, using: str = "default") -> int:
    """Column-oriented bulk_insert for large, uniform batches (anomaly results).

    columns: {field name or attname: values}, where values is a sequence, numpy array or Series
    (all of one length n) or a scalar repeated for every row. Datetime columns must be Series of
    dtype datetime64[ns, tz]; they and JSON columns are converted a column at a time rather than
    a value at a time, which is what makes a million rows take seconds. Returns n. Raises
    ValueError for ragged columns or a datetime column without a timezone, IntegrityError on a
    constraint violation.
    """
    connection = connections[using]
    fields = [model._meta.get_field(name) for name in columns]
    lengths = {len(v) for v in columns.values() if _is_column(v)}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 1
    prepared = [_column(field, values, n, connection) for field, values in zip(fields, columns.values())]
    return _insert_rows(connection, model, fields, zip(*prepared), using=using)


def _is_column(values: Any) -> bool:
    return isinstance(values, (list, tuple, np.ndarray, pd.Series, pd.Index))


def _column(field: models.Field, values: Any, n: int, connection) -> Iterable:
    if not _is_column(values):
        converter = _converter(field, connection)
        return repeat(values if converter is None else converter(values), n)
    if isinstance(field, models.DateTimeField):
        series = pd.Series(values)
        if not isinstance(series.dtype, pd.DatetimeTZDtype):
            raise ValueError(f"{field.name}: expected timezone-aware datetimes, got dtype {series.dtype}")
        if connection.vendor == "sqlite":
            return _sqlite_datetimes(series).tolist()
        return series.dt.tz_convert("UTC").to_numpy(dtype=object).tolist()  # Timestamps are datetimes
    if isinstance(field, models.JSONField):
        return ["[]" if isinstance(v, list) and not v else _json_text(v) for v in values]
    return values.tolist() if isinstance(values, (np.ndarray, pd.Series, pd.Index)) else list(values)


def _insert_rows(connection, model: type[models.Model], fields: list[models.Field], rows: Iterable[tuple], *,
                 using: str) -> int:
    count = 0

    def counted():
        nonlocal count
        for row in rows:
            count += 1
            yield row

    table, columns = _names(connection, model, fields)
    with transaction.atomic(using=using, savepoint=False), connection.cursor() as cursor, \
            connection.wrap_database_errors:
        if connection.vendor == "postgresql":
            with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in counted():
                    copy.write_row(row)
        elif connection.vendor == "sqlite":
            marks = ", ".join("?" * len(fields))
            cursor.cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", counted())
        else:
            raise NotImplementedError(f"bulk inserts support PostgreSQL and SQLite, not {connection.vendor}")
    return count


def bulk_insert_frame(model: type[models.Model], frame: pd.DataFrame, *, json_field: str,
                      json_columns: Sequence[str], using: str = "default") -> int:
    """Insert a numeric frame, packing `json_columns` into `json_field` as {column: float | null}.

    frame: rows x (one column per other model field, named by field name or attname, e.g.
    "device_id": integer, float, bool or datetime64[ns, UTC]) + json_columns (float64, NaN ->
    null). json_columns must match [A-Za-z0-9_]+ (they become SQL literals). Floats are stored
    exactly, as their shortest round-trip text (PostgreSQL's float8 -> jsonb, pyarrow's cast for
    SQLite). Returns the number of rows. Raises ValueError for a bad key or a
    missing timestamp, django.db.IntegrityError on a constraint violation.
    """
    bad = [c for c in json_columns if not METRIC_NAME_RE.fullmatch(c)]
    if bad:
        raise ValueError(f"JSON keys must match [A-Za-z0-9_]+: {bad}")
    connection = connections[using]
    scalars = [c for c in frame.columns if c not in set(json_columns)]
    fields = [model._meta.get_field(c) for c in scalars] + [model._meta.get_field(json_field)]
    table, columns = _names(connection, model, fields)
    with transaction.atomic(using=using, savepoint=False), connection.cursor() as cursor, \
            connection.wrap_database_errors:
        if connection.vendor == "postgresql":
            return _copy_frame(cursor.cursor, connection, table, columns, frame, scalars, json_columns)
        if connection.vendor == "sqlite":
            return _executemany_frame(cursor.cursor, table, columns, frame, scalars, json_columns)
        raise NotImplementedError(f"bulk_insert_frame supports PostgreSQL and SQLite, not"
                                  f" {connection.vendor}")


def _names(connection, model: type[models.Model], fields: list[models.Field]) -> tuple[str, str]:
    quote = connection.ops.quote_name
    return quote(model._meta.db_table), ", ".join(quote(field.column) for field in fields)


def _converter(field: models.Field, connection):
    if isinstance(field, models.JSONField):
        return _json_text
    if isinstance(field, models.DateTimeField):
        def convert(value):
            if value is None:
                return None
            if isinstance(value, pd.Timestamp):
                value = value.to_pydatetime()
            if not isinstance(value, datetime) or timezone.is_naive(value):
                raise ValueError(f"{field.name}: {value!r} is not a timezone-aware datetime")
            return connection.ops.adapt_datetimefield_value(value)
        return convert
    return None


def _json_text(value: Any) -> str | None:
    """JSON text with NaN/inf as null (json.dumps would write the invalid token NaN)."""
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False, default=_json_default)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False, default=_json_default)


def _finite(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, np.generic):
        return _finite(value.item())
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _copy_frame(cursor, connection, table: str, columns: str, frame: pd.DataFrame, scalars: list[str],
                json_columns: Sequence[str]) -> int:
    """Binary COPY into a temporary table, then one INSERT ... SELECT that builds the jsonb."""
    parts = [_binary_column(frame[c], c) for c in scalars] + [
        (frame[c].to_numpy(dtype="float64"), ">f8", "double precision") for c in json_columns]
    staging = connection.ops.quote_name("vigil_bulk_frame")
    cursor.execute(f"CREATE TEMPORARY TABLE {staging} ("
                   + ", ".join(f"c{i} {sql_type}" for i, (_, _, sql_type) in enumerate(parts)) + ")")
    dtype = np.dtype([("n", ">i2")] + [item for i, (_, fmt, _) in enumerate(parts)
                                       for item in ((f"l{i}", ">i4"), (f"v{i}", fmt))])
    with cursor.copy(f"COPY {staging} FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(_PG_BINARY_HEADER)
        for start in range(0, len(frame), CHUNK_ROWS):
            block = np.empty(min(CHUNK_ROWS, len(frame) - start), dtype=dtype)
            block["n"] = len(parts)
            for i, (values, fmt, _) in enumerate(parts):
                block[f"l{i}"] = np.dtype(fmt).itemsize
                block[f"v{i}"] = values[start:start + len(block)]
            copy.write(block.tobytes())
        copy.write(_PG_BINARY_TRAILER)
    first = len(scalars)
    pairs = [f"'{key}', NULLIF(c{first + i}, 'NaN'::float8)" for i, key in enumerate(json_columns)]
    packed = " || ".join(f"jsonb_build_object({', '.join(pairs[i:i + _PG_JSON_PAIRS])})"
                         for i in range(0, len(pairs), _PG_JSON_PAIRS)) or "'{}'::jsonb"
    cursor.execute(f"INSERT INTO {table} ({columns}) SELECT "
                   + ", ".join(f"c{i}" for i in range(first)) + f", {packed} FROM {staging}")
    count = cursor.rowcount
    cursor.execute(f"DROP TABLE {staging}")
    return count


def _binary_column(values: pd.Series, name: str) -> tuple[np.ndarray, str, str]:
    """(values, big-endian numpy type, SQL type) in PostgreSQL's binary COPY encoding."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        micros = values.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]")
        if np.isnat(micros).any():
            raise ValueError(f"{name}: missing timestamp (NaT)")
        return micros.astype(np.int64) - _PG_EPOCH_US, ">i8", "timestamptz"
    if pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=bool), "?", "boolean"
    if pd.api.types.is_integer_dtype(values):
        return values.to_numpy(dtype=np.int64), ">i8", "bigint"
    if pd.api.types.is_float_dtype(values):
        return values.to_numpy(dtype="float64"), ">f8", "double precision"
    raise ValueError(f"{name}: bulk_insert_frame takes integer, float, bool or UTC datetime columns,"
                     f" not {values.dtype}")


def _executemany_frame(cursor, table: str, columns: str, frame: pd.DataFrame, scalars: list[str],
                       json_columns: Sequence[str]) -> int:
    """executemany of (scalars..., JSON text); the JSON text is built column-wise by pyarrow."""
    marks = ", ".join("?" * (len(scalars) + 1))
    sql = f"INSERT INTO {table} ({columns}) VALUES ({marks})"
    arrays = [_sqlite_datetimes(frame[c]) if isinstance(frame[c].dtype, pd.DatetimeTZDtype)
              else frame[c].to_numpy() for c in scalars]
    for start in range(0, len(frame), CHUNK_ROWS):
        chunk = slice(start, start + CHUNK_ROWS)
        objects = _json_objects(frame.iloc[chunk], json_columns)
        cursor.executemany(sql, zip(*(a[chunk].tolist() for a in arrays), objects))
    return len(frame)


def _json_objects(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """'{"key":value,...}' per row, NaN and infinities as null.

    pyarrow casts float64 to its shortest round-trip text (exact, like repr) a column at a time,
    several times faster than json.dumps per row.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = []
    for i, key in enumerate(keys):
        values = pa.array(frame[key].to_numpy(dtype="float64"))
        text = pc.if_else(pc.is_finite(values), pc.cast(values, pa.string()), pa.scalar("null"))
        parts += [pa.scalar(f'{"," if i else "{"}"{key}":'), text]
    if not parts:
        return ["{}"] * len(frame)
    return pc.binary_join_element_wise(*parts, pa.scalar("}"), pa.scalar("")).to_pylist()


def _sqlite_datetimes(values: pd.Series) -> np.ndarray:
    """Django's SQLite text for UTC datetimes: str(datetime), 'YYYY-MM-DD HH:MM:SS[.ffffff]'.

    The fraction is left out when it is zero, exactly as Django does; otherwise text comparison
    and the unique constraint would tell '...:00' and '...:00.000000' apart.
    """
    micros = values.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]")
    if np.isnat(micros).any():
        raise ValueError("missing timestamp (NaT)")
    text = np.datetime_as_string(micros, unit="us")
    text.view(np.uint32).reshape(len(text), -1)[:, 10] = ord(" ")  # 'T' -> ' ', in place
    whole = micros.astype(np.int64) % 1_000_000 == 0
    return np.where(whole, text.astype("U19"), text)
