"""Write an IngestBatch into a fleet in one transaction, and read a fleet's telemetry back fast.

Telemetry goes in through detection.ingest.bulk (COPY on PostgreSQL, executemany on SQLite) and
comes out through the database's own JSON extraction, so neither direction builds a model
instance or a Python dict per row.
"""
from __future__ import annotations

import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import IntegrityError, connections, transaction
from django.db.models import Count, Max, Min

from ..models import Device, Fleet, GroundTruthLabel, Telemetry
from .base import (
    DEVICE_ATTRIBUTES,
    DEVICE_COLUMNS,
    METRIC_NAME_RE,
    RESERVED_METRIC_NAMES,
    IngestBatch,
    IngestError,
    IngestProblem,
)
from .bulk import bulk_insert, bulk_insert_frame

MAX_COLLISIONS = 20


@dataclass(frozen=True)
class IngestSummary:
    """What ingest_batch wrote; seconds is the wall time of the write (validation included)."""

    fleet_id: int
    fleet_created: bool
    devices_created: int
    devices_existing: int
    rows: int
    labels: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def ingest_batch(*, batch: IngestBatch, fleet_name: str, description: str = "") -> IngestSummary:
    """Write `batch` into the fleet `fleet_name`, creating the fleet and missing devices.

    A new fleet takes the batch's metric schema and cohort columns; an existing fleet must have
    the same metric names. Existing devices keep their row, and take the batch's non-empty
    attributes. Everything happens in one transaction: on any error nothing is saved.
    Raises IngestError for an invalid batch, a schema that differs from the fleet's, or samples
    that the fleet already holds (naming the devices and time ranges that collide).
    """
    started = time.perf_counter()
    problems = _check_batch(batch, fleet_name)
    if problems:
        raise IngestError(problems)
    try:
        with transaction.atomic():
            fleet, created = _fleet(batch, fleet_name, description)
            ids, devices_created = _devices(fleet, batch.devices)
            rows = _telemetry(fleet, batch, ids)
            labels = bulk_insert(
                GroundTruthLabel, ["fleet", "device", "start", "end", "kind", "metric", "source"],
                ((fleet.pk, ids[r.external_id], r.start, r.end, r.kind, r.metric, r.source)
                 for r in batch.labels.itertuples(index=False)))
    except IntegrityError as exc:
        raise IngestError(_collisions(fleet_name, batch) or [
            IngestProblem(f"the database refused the batch, nothing was saved: {exc}")]) from None
    return IngestSummary(fleet_id=fleet.pk, fleet_created=created, devices_created=devices_created,
                         devices_existing=len(batch.devices) - devices_created, rows=rows, labels=labels,
                         seconds=time.perf_counter() - started)


def load_telemetry_frame(fleet: Fleet, *, start: datetime | None = None, end: datetime | None = None,
                         device_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """A fleet's telemetry as one frame, sorted by device_id then timestamp.

    Columns: device_id (Device pk, int64), external_id, manufacturer, model, os_version, store,
    customer (str), timestamp (datetime64[ns, UTC]), then one float64 column per fleet metric in
    schema order (NaN where the sample has no value). start is inclusive, end exclusive; both
    timezone-aware. device_ids keeps only those devices. Raises ValueError if the fleet schema
    holds a metric name that is not an identifier.
    """
    metrics = fleet.metric_names
    bad = [m for m in metrics if not METRIC_NAME_RE.fullmatch(m)]
    if bad:
        raise ValueError(f"fleet {fleet.name!r} has metric names that are not identifiers: {bad}")
    connection = connections[Telemetry.objects.db]
    adapt = connection.ops.adapt_datetimefield_value
    if device_ids is None:  # the fleet is read through its devices: (device, timestamp) is the index
        device_ids = list(Device.objects.filter(fleet=fleet).values_list("pk", flat=True))
    where, params = ["fleet_id = %s"], [fleet.pk]
    if start is not None:
        where.append('"timestamp" >= %s')
        params.append(adapt(pd.Timestamp(start).to_pydatetime()))
    if end is not None:
        where.append('"timestamp" < %s')
        params.append(adapt(pd.Timestamp(end).to_pydatetime()))
    if device_ids is not None:
        if connection.vendor == "postgresql":
            where.append("device_id = ANY(%s)")
            params.append([int(d) for d in device_ids])
        else:
            where.append("device_id IN (SELECT value FROM json_each(%s))")
            params.append(json.dumps([int(d) for d in device_ids]))
    table = connection.ops.quote_name(Telemetry._meta.db_table)
    source = f"FROM {table} WHERE {' AND '.join(where)}"
    with connection.cursor() as cursor, connection.wrap_database_errors:
        if connection.vendor == "postgresql":
            frame = _copy_out(cursor.cursor, source, params, metrics)
        else:
            frame = _select(cursor.cursor, source.replace("%s", "?"), params, metrics)
    # Sorting here is cheaper than ORDER BY: SQLite would sort the JSON text in a temporary B-tree.
    frame = frame.sort_values(["device_id", "timestamp"], kind="stable", ignore_index=True)
    devices = pd.DataFrame.from_records(
        list(Device.objects.filter(fleet=fleet).values_list("pk", *DEVICE_COLUMNS)),
        columns=["device_id", *DEVICE_COLUMNS])
    frame = frame.merge(devices.astype({"device_id": np.int64}), on="device_id", how="left")
    return frame[["device_id", *DEVICE_COLUMNS, "timestamp", *metrics]]


def load_ground_truth(fleet: Fleet) -> pd.DataFrame:
    """The fleet's labelled anomaly windows.

    Columns: device_id (int64), external_id, start, end (datetime64[ns, UTC], inclusive), kind,
    metric; sorted by device_id then start.
    """
    columns = ["device_id", "external_id", "start", "end", "kind", "metric"]
    rows = (GroundTruthLabel.objects.filter(fleet=fleet).order_by("device_id", "start")
            .values_list("device_id", "device__external_id", "start", "end", "kind", "metric"))
    frame = pd.DataFrame.from_records(list(rows), columns=columns)
    return frame.astype({"device_id": np.int64, "start": "datetime64[ns, UTC]", "end": "datetime64[ns, UTC]"})


# --- ingest steps --------------------------------------------------------------------------------

def _check_batch(batch: IngestBatch, fleet_name: str) -> list[IngestProblem]:
    """What the database would refuse (or silently cut), found before it is asked."""
    problems = []
    try:
        validate_slug(fleet_name)
    except ValidationError:
        problems.append(IngestProblem(f"fleet name {fleet_name!r} must be a slug (letters, digits, - and _)"))
    names = batch.metric_names
    for name in names:
        if not METRIC_NAME_RE.fullmatch(name) or name in RESERVED_METRIC_NAMES:
            problems.append(IngestProblem(f"metric name {name!r} must match [A-Za-z0-9_]+ and not be one of"
                                          f" {', '.join(sorted(RESERVED_METRIC_NAMES))}"))
    if len(set(names)) != len(names):
        problems.append(IngestProblem(f"metric names repeat: {names}"))
    missing = [c for c in ["external_id", "timestamp", *names] if c not in batch.telemetry.columns]
    if missing:
        problems.append(IngestProblem(f"telemetry lacks columns {missing}"))
    for column in DEVICE_COLUMNS:
        limit = Device._meta.get_field(column).max_length
        long = batch.devices.loc[batch.devices[column].str.len() > limit, "external_id"]
        if len(long):
            problems.append(IngestProblem(f"{len(long)} devices have a {column} longer than {limit}"
                                          f" characters, e.g. {long.iloc[0][:60]!r}", column=column))
    known = set(batch.devices["external_id"])
    for what, frame in (("telemetry", batch.telemetry), ("labels", batch.labels)):
        unknown = set(frame["external_id"].unique()) - known if "external_id" in frame else set()
        if unknown:
            problems.append(IngestProblem(f"{what} name devices missing from the device list:"
                                          f" {', '.join(sorted(unknown)[:5])}"))
    inverted = batch.labels["start"] > batch.labels["end"]
    if inverted.any():
        problems.append(IngestProblem(f"{inverted.sum()} labels end before they start"))
    return problems


def _fleet(batch: IngestBatch, name: str, description: str) -> tuple[Fleet, bool]:
    fleet = Fleet.objects.select_for_update().filter(name=name).first()
    if fleet is None:
        return Fleet.objects.create(name=name, description=description, metric_schema=batch.metric_schema,
                                    cohort_columns=batch.cohort_columns), True
    missing = sorted(set(fleet.metric_names) - set(batch.metric_names))
    extra = sorted(set(batch.metric_names) - set(fleet.metric_names))
    if missing or extra:
        raise IngestError(IngestProblem(
            f"fleet {name!r} has metrics {', '.join(fleet.metric_names)}; this data"
            + (f" lacks {', '.join(missing)}" if missing else "")
            + (" and" if missing and extra else "")
            + (f" adds {', '.join(extra)}" if extra else "")))
    return fleet, False


def _devices(fleet: Fleet, devices: pd.DataFrame) -> tuple[dict[str, int], int]:
    """external_id -> Device pk for the fleet, after creating and updating the batch's devices."""
    existing = {d.external_id: d for d in Device.objects.filter(fleet=fleet)}
    new, changed = [], []
    for row in devices.to_dict("records"):
        device = existing.get(row["external_id"])
        if device is None:
            new.append(Device(fleet=fleet, **row))
            continue
        updates = {a: row[a] for a in DEVICE_ATTRIBUTES if row[a] and row[a] != getattr(device, a)}
        if updates:
            for attr, value in updates.items():
                setattr(device, attr, value)
            changed.append(device)
    Device.objects.bulk_create(new, batch_size=1000)
    Device.objects.bulk_update(changed, DEVICE_ATTRIBUTES, batch_size=1000)
    return dict(Device.objects.filter(fleet=fleet).values_list("external_id", "pk")), len(new)


def _telemetry(fleet: Fleet, batch: IngestBatch, ids: dict[str, int]) -> int:
    telemetry = batch.telemetry
    codes, uniques = pd.factorize(telemetry["external_id"])
    frame = pd.DataFrame({
        "fleet_id": np.full(len(telemetry), fleet.pk, dtype=np.int64),
        "device_id": np.array([ids[e] for e in uniques], dtype=np.int64)[codes],
        "timestamp": telemetry["timestamp"],
        **{m: telemetry[m] for m in batch.metric_names},
    })
    return bulk_insert_frame(Telemetry, frame, json_field="values", json_columns=batch.metric_names)


def _collisions(fleet_name: str, batch: IngestBatch) -> list[IngestProblem]:
    """Devices whose stored samples overlap the batch's time range, after the failed write rolled back."""
    fleet = Fleet.objects.filter(name=fleet_name).first()
    if fleet is None or batch.telemetry.empty:
        return []
    span = batch.telemetry.groupby("external_id")["timestamp"].agg(["min", "max"])
    stored = (Telemetry.objects.filter(device__fleet=fleet, device__external_id__in=list(span.index[:10_000]),
                                       timestamp__gte=span["min"].min(), timestamp__lte=span["max"].max())
              .values("device__external_id")
              .annotate(n=Count("id"), first=Min("timestamp"), last=Max("timestamp"))
              .order_by("device__external_id"))
    problems = []
    for row in stored:
        mine = span.loc[row["device__external_id"]]
        if row["first"] <= mine["max"] and row["last"] >= mine["min"]:
            problems.append(IngestProblem(
                f"device {row['device__external_id']!r} already has {row['n']:,} samples between"
                f" {row['first']:%Y-%m-%d %H:%M:%S} and {row['last']:%Y-%m-%d %H:%M:%S}, which overlaps"
                f" this data ({mine['min']:%Y-%m-%d %H:%M:%S} to {mine['max']:%Y-%m-%d %H:%M:%S})"))
    if not problems:
        return []
    more = [IngestProblem(f"... and {len(problems) - MAX_COLLISIONS} more devices")] \
        if len(problems) > MAX_COLLISIONS else []
    return [IngestProblem(f"{len(problems)} devices already have samples at some of these timestamps;"
                          " nothing was saved"), *problems[:MAX_COLLISIONS], *more]


# --- reading -------------------------------------------------------------------------------------

def _copy_out(cursor, source: str, params: list, metrics: list[str]) -> pd.DataFrame:
    """PostgreSQL: one row of arrays per device (binary COPY), decoded by numpy.

    COPY TO sends one message per row and psycopg reads them one at a time, which costs ~10 us a
    row in Python; arrays cut that to one message per device. NULL becomes NaN in SQL, so every
    element is 8 bytes.
    """
    arrays = ['array_agg("timestamp")'] + [
        f"""array_agg(COALESCE(("values"->>'{m}')::float8, 'NaN'))""" for m in metrics]
    query = f"SELECT device_id, {', '.join(arrays)} {source} GROUP BY device_id"
    with cursor.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)", params) as copy:
        data = b"".join(copy)
    devices, columns = [], [[] for _ in arrays]
    pos = 19  # signature (11), flags (4), header extension length (4, always 0)
    while struct.unpack_from(">h", data, pos)[0] != -1:  # field count; -1 is the trailer
        device_id = struct.unpack_from(">q", data, pos + 6)[0]
        pos += 14
        for k, column in enumerate(columns):
            size, count = struct.unpack_from(">i12xi", data, pos)  # field length, array dimension
            element = ">i8" if k == 0 else ">f8"
            column.append(np.frombuffer(data, dtype=[("n", ">i4"), ("v", element)], count=count,
                                        offset=pos + 24)["v"])
            pos += 4 + size
        devices.append(np.full(count, device_id, dtype=np.int64))
    if not devices:
        return pd.DataFrame({"device_id": np.array([], dtype=np.int64),
                             "timestamp": pd.Series(dtype="datetime64[ns, UTC]"),
                             **{m: np.array([], dtype=np.float64) for m in metrics}})
    micros = np.concatenate(columns[0]).astype(np.int64) + 946_684_800_000_000  # from PostgreSQL's 2000 epoch
    return pd.DataFrame({
        "device_id": np.concatenate(devices),
        "timestamp": pd.to_datetime(micros, unit="us", utc=True).as_unit("ns"),
        **{m: np.concatenate(column).astype(np.float64) for m, column in zip(metrics, columns[1:])},
    })


def _select(cursor, source: str, params: list, metrics: list[str]) -> pd.DataFrame:
    """SQLite: json_extract per metric (NULL -> NaN), timestamps parsed once per distinct text."""
    values = "".join(f""", json_extract("values", '$.{m}')""" for m in metrics)
    # CAST keeps Django's per-row datetime converter (the column's declared type) out of the way.
    cursor.execute(f'SELECT device_id, CAST("timestamp" AS TEXT){values} {source}', params)
    frame = pd.DataFrame.from_records(cursor.fetchall(), columns=["device_id", "timestamp", *metrics],
                                      coerce_float=True)
    codes, uniques = pd.factorize(frame["timestamp"])
    stamps = pd.to_datetime(pd.Index(uniques, dtype=object), format="ISO8601", utc=True)
    frame["timestamp"] = stamps.take(codes)
    return frame.astype({"device_id": np.int64, **dict.fromkeys(metrics, np.float64)})
