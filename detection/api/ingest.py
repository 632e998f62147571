"""Telemetry bulk ingest over the API: JSON rows or a CSV upload, into one existing fleet.

The rows go through the same reader as `manage.py ingest` (detection.ingest.readers.read_table) and
the same writer (detection.ingest.loader.ingest_batch), so the checks are the CLI's: every problem
names its 1-based data row and column, and the batch is written all-or-nothing in one transaction.
JSON rows are first written out as a CSV file (one column per key), so that a JSON value and the same
text in a CSV cell are read, and refused, identically.

What the API adds on top: the fleet must exist and the columns must be its metrics (a metric left
out is a missing value), unknown devices are refused unless create_devices is set, and a batch has at
most VIGIL_MAX_INGEST_ROWS rows (VIGIL_MAX_INGEST_BYTES for an upload).
"""
from __future__ import annotations

import csv
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from django.conf import settings
from django.db import transaction

from detection.ingest.base import DEVICE_ATTRIBUTES, IngestError, IngestProblem
from detection.ingest.loader import ingest_batch
from detection.ingest.readers import read_table
from detection.models import Device, Fleet

DEVICE_COLUMN = "device_id"
TIMESTAMP_COLUMN = "timestamp"
MAX_MESSAGES = 50


class TelemetryIngestError(Exception):
    """The batch was refused and nothing was saved. `field` is "rows" (JSON) or "file" (CSV);
    `messages` name the row and column of each problem."""

    def __init__(self, field: str, messages: list[str]):
        self.field, self.messages = field, messages[:MAX_MESSAGES]
        if len(messages) > MAX_MESSAGES:
            self.messages.append(f"... and {len(messages) - MAX_MESSAGES} more problems")
        super().__init__("; ".join(self.messages))


@dataclass(frozen=True)
class TelemetryIngestResult:
    fleet: str
    rows: int
    devices_created: int
    devices_existing: int
    seconds: float


def _describe(problem: IngestProblem) -> str:
    # The reader names the temporary file it read; the client knows its rows and columns only.
    where = [w for w in (f"row {problem.row}" if problem.row is not None else "",
                         f"column {problem.column!r}" if problem.column else "") if w]
    return f"{', '.join(where)}: {problem.message}" if where else problem.message


def telemetry_ingest_rows(*, fleet: Fleet, rows: list, create_devices: bool = False, user=None
                          ) -> TelemetryIngestResult:
    """Ingest JSON rows [{"device_id": str, "timestamp": ISO 8601, <metric>: number or null,
    <device attribute>: str}] into `fleet`. Row numbers in errors are 1-based positions in `rows`.

    Raises TelemetryIngestError(field="rows") naming row and column of every problem.
    """
    limit = settings.VIGIL_MAX_INGEST_ROWS
    if not rows:
        raise TelemetryIngestError("rows", ["no rows given"])
    if len(rows) > limit:
        raise TelemetryIngestError("rows", [f"at most {limit} rows per request (VIGIL_MAX_INGEST_ROWS), "
                                            f"got {len(rows)}"])
    allowed = _allowed_columns(fleet)
    problems: list[str] = []
    columns: list[str] = [DEVICE_COLUMN, TIMESTAMP_COLUMN]
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            problems.append(f"row {i}: must be an object with device_id, timestamp and metrics")
            continue
        for key, value in row.items():
            if key not in allowed:
                problems.append(f"row {i}, column {key!r}: unknown column; fleet {fleet.name!r} takes "
                                f"{', '.join(sorted(allowed))}")
            elif isinstance(value, (dict, list)):
                problems.append(f"row {i}, column {key!r}: must be a single value, not {type(value).__name__}")
            elif isinstance(value, float) and not math.isfinite(value):
                problems.append(f"row {i}, column {key!r}: value {value} is not finite")
            elif key not in columns:
                columns.append(key)
        for key in (DEVICE_COLUMN, TIMESTAMP_COLUMN):
            if key not in row:
                problems.append(f"row {i}, column {key!r}: missing")
    if problems:
        raise TelemetryIngestError("rows", problems)
    with tempfile.TemporaryDirectory(prefix="vigil-ingest-") as folder:
        path = Path(folder) / "rows.csv"
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else _cell(row[c]) for c in columns])
        return _ingest(fleet=fleet, path=path, header=columns, field="rows", create_devices=create_devices,
                       user=user)


def telemetry_ingest_csv(*, fleet: Fleet, upload, create_devices: bool = False, user=None
                         ) -> TelemetryIngestResult:
    """Ingest an uploaded CSV file (header device_id,timestamp,<metrics...>[,<device attributes>])
    into `fleet`. Row numbers in errors are 1-based data rows (the header is not counted).

    Raises TelemetryIngestError(field="file") naming row and column of every problem.
    """
    limit = settings.VIGIL_MAX_INGEST_BYTES
    if upload.size > limit:
        raise TelemetryIngestError("file", [f"at most {limit} bytes per upload (VIGIL_MAX_INGEST_BYTES), "
                                            f"got {upload.size}"])
    with tempfile.TemporaryDirectory(prefix="vigil-ingest-") as folder:
        path = Path(folder) / "upload.csv"
        with path.open("wb") as out:
            for chunk in upload.chunks():
                out.write(chunk)
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                header = [c.strip() for c in next(csv.reader(f), [])]
                n_rows = sum(1 for _ in f)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise TelemetryIngestError("file", [f"not a UTF-8 CSV file: {exc}"]) from None
        if not header:
            raise TelemetryIngestError("file", ["the file is empty; expected a header row "
                                                "device_id,timestamp,<metrics...>"])
        if n_rows > settings.VIGIL_MAX_INGEST_ROWS:
            raise TelemetryIngestError("file", [f"at most {settings.VIGIL_MAX_INGEST_ROWS} rows per upload "
                                                f"(VIGIL_MAX_INGEST_ROWS), got {n_rows}"])
        allowed = _allowed_columns(fleet)
        problems = [f"column {c!r}: unknown column; fleet {fleet.name!r} takes {', '.join(sorted(allowed))}"
                    for c in header if c not in allowed]
        problems += [f"column {c!r}: missing" for c in (DEVICE_COLUMN, TIMESTAMP_COLUMN) if c not in header]
        repeated = sorted({c for c in header if header.count(c) > 1})
        problems += [f"column {c!r}: appears more than once" for c in repeated]
        if problems:
            raise TelemetryIngestError("file", problems)
        return _ingest(fleet=fleet, path=path, header=header, field="file", create_devices=create_devices,
                       user=user)


def _cell(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _allowed_columns(fleet: Fleet) -> set[str]:
    return {DEVICE_COLUMN, TIMESTAMP_COLUMN, *fleet.metric_names, *DEVICE_ATTRIBUTES}


def _ingest(*, fleet: Fleet, path: Path, header: list[str], field: str, create_devices: bool, user
            ) -> TelemetryIngestResult:
    from detection.services import audit_record

    metrics = [m for m in fleet.metric_names if m in header]
    if not metrics:
        raise TelemetryIngestError(field, [f"no metric columns; fleet {fleet.name!r} has "
                                           f"{', '.join(fleet.metric_names)}"])
    attributes = {a: a for a in DEVICE_ATTRIBUTES if a in header}
    try:
        batch = read_table(path, fmt="csv", device_column=DEVICE_COLUMN, timestamp_column=TIMESTAMP_COLUMN,
                           metrics=metrics, cohort_columns=attributes)
    except IngestError as exc:
        raise TelemetryIngestError(field, [_describe(p) for p in exc.problems]) from None
    known = set(Device.objects.filter(fleet=fleet).values_list("external_id", flat=True))
    unknown = sorted(set(batch.devices["external_id"]) - known)
    if unknown and not create_devices:
        raw = pd.read_csv(path, usecols=[DEVICE_COLUMN], dtype=str, keep_default_na=False)[DEVICE_COLUMN].str.strip()
        raise TelemetryIngestError(field, [
            f"row {int(np.flatnonzero(raw.to_numpy() == e)[0]) + 1}, column {DEVICE_COLUMN!r}: device {e!r} is not "
            f"a device of fleet {fleet.name!r} (set create_devices to add it)" for e in unknown])
    # A metric the client left out is a missing value, as in telemetry; the fleet keeps its schema.
    for name in fleet.metric_names:
        if name not in batch.telemetry.columns:
            batch.telemetry[name] = np.nan
    batch.telemetry = batch.telemetry[["external_id", "timestamp", *fleet.metric_names]]
    batch.metric_schema = list(fleet.metric_schema)
    try:
        with transaction.atomic():
            summary = ingest_batch(batch=batch, fleet_name=fleet.name)
            audit_record(action="telemetry_ingested", actor=user, fleet=fleet, target=fleet,
                         after={"rows": summary.rows, "devices_created": summary.devices_created,
                                "source": "api"})
    except IngestError as exc:
        raise TelemetryIngestError(field, [_describe(p) for p in exc.problems]) from None
    return TelemetryIngestResult(fleet=fleet.name, rows=summary.rows, devices_created=summary.devices_created,
                                 devices_existing=summary.devices_existing, seconds=round(summary.seconds, 3))
