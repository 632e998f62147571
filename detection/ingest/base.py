"""The shape every telemetry source produces, and the error every source raises.

Readers (csv/parquet/nab/skab/cmapss/synthetic) are Django-free: they parse and validate a file
and return an IngestBatch. detection.ingest.loader writes a batch in one transaction.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

DEVICE_COLUMNS = ["external_id", "manufacturer", "model", "os_version", "store", "customer"]
DEVICE_ATTRIBUTES = DEVICE_COLUMNS[1:]
LABEL_COLUMNS = ["external_id", "start", "end", "kind", "metric", "source"]

# Metric names become JSON keys and SQL literals (loader.load_telemetry_frame), so they are plain
# identifiers, and never one of the frame columns they sit next to.
METRIC_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
RESERVED_METRIC_NAMES = frozenset({"fleet_id", "device_id", "timestamp", *DEVICE_COLUMNS})


def metric_identifier(name: str) -> str:
    """snake_case identifier for a column name: "Volume Flow RateRMS" -> "volume_flow_rate_rms"."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name.strip())
    return re.sub(r"[^A-Za-z0-9]+", "_", spaced).strip("_").lower() or "metric"


@dataclass(frozen=True)
class IngestProblem:
    """One validation problem, located as precisely as the source allows (1-based data row)."""

    message: str
    file: str = ""
    row: int | None = None
    column: str = ""

    def __str__(self) -> str:
        where = [p for p in (self.file, f"row {self.row}" if self.row is not None else "",
                             f"column {self.column!r}" if self.column else "") if p]
        return f"{', '.join(where)}: {self.message}" if where else self.message


class IngestError(Exception):
    """Raised when a source cannot be ingested; carries every problem found, not only the first."""

    def __init__(self, problems: list[IngestProblem] | IngestProblem | str):
        if isinstance(problems, str):
            problems = [IngestProblem(problems)]
        elif isinstance(problems, IngestProblem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__(self.summary())

    def summary(self, limit: int = 20) -> str:
        lines = [str(p) for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more problems")
        return "\n".join(lines)


@dataclass
class IngestBatch:
    """Telemetry ready to be written.

    metric_schema: [{"name", "unit", "domain"}], one entry per metric column of `telemetry`.
    cohort_columns: device attributes that define a cohort (default manufacturer, model, os_version).
    devices: one row per device, columns DEVICE_COLUMNS (strings, "" when unknown).
    telemetry: rows x (external_id, timestamp [datetime64[ns, UTC]], one float64 column per metric),
        sorted by external_id then timestamp, no duplicate (external_id, timestamp).
    labels: ground-truth anomaly windows, columns LABEL_COLUMNS (start/end UTC, inclusive). For
        evaluation only; the detector never sees them.
    """

    metric_schema: list[dict]
    devices: pd.DataFrame
    telemetry: pd.DataFrame
    labels: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=LABEL_COLUMNS))
    cohort_columns: list[str] = field(default_factory=lambda: ["manufacturer", "model", "os_version"])
    source: str = ""

    @property
    def metric_names(self) -> list[str]:
        return [m["name"] for m in self.metric_schema]
