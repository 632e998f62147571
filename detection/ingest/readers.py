"""Django-free readers: CSV/Parquet tables and the NAB, SKAB and C-MAPSS benchmark layouts.

Each reader validates the whole source before it returns, and raises one IngestError that lists
every problem it found (file, 1-based data row, column), so a user fixes a file in one pass. A
problem that hits many rows is listed for its first ROWS_PER_PROBLEM rows and then counted, and
the list stops at MAX_PROBLEMS. The happy path is vectorised: pyarrow parses CSV, timestamps are
parsed once per distinct string, and rows are only looked at one by one to describe failures.

Timestamps are ISO 8601. Naive ones are read as UTC; a file that mixes naive timestamps with
timestamps carrying an offset is refused, because the naive ones are then ambiguous.
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .base import (
    DEVICE_ATTRIBUTES,
    DEVICE_COLUMNS,
    LABEL_COLUMNS,
    METRIC_NAME_RE,
    RESERVED_METRIC_NAMES,
    IngestBatch,
    IngestError,
    IngestProblem,
    metric_identifier,
)

FORMATS = ("csv", "parquet", "nab", "skab", "cmapss")
DEFAULT_COHORT = ["manufacturer", "model", "os_version"]
MAX_PROBLEMS = 200
ROWS_PER_PROBLEM = 5
ISO_8601 = "expected ISO 8601, e.g. 2024-01-31 12:00:00 or 2024-01-31T12:00:00+01:00"
_OFFSET_RE = r"(?:Z|[+-]\d\d(?::?\d\d)?)$"
_NULL_SPELLINGS = ("", "na", "n/a", "nan", "null", "none")

# SKAB v0.9 sensors: source column -> (unit, domain). Units from the SKAB README.
SKAB_SENSORS = {
    "Accelerometer1RMS": ("g", "vibration"),
    "Accelerometer2RMS": ("g", "vibration"),
    "Current": ("A", "electrical"),
    "Pressure": ("bar", "hydraulic"),
    "Temperature": ("°C", "thermal"),
    "Thermocouple": ("°C", "thermal"),
    "Voltage": ("V", "electrical"),
    "Volume Flow RateRMS": ("l/min", "hydraulic"),
}
SKAB_LABEL_COLUMNS = ("anomaly", "changepoint")

# C-MAPSS sensors 1..21: (label, unit, domain), after Saxena et al., PHM08 (2008), table 2.
CMAPSS_SENSORS = [
    ("T2 total temperature at fan inlet", "°R", "thermal"),
    ("T24 total temperature at LPC outlet", "°R", "thermal"),
    ("T30 total temperature at HPC outlet", "°R", "thermal"),
    ("T50 total temperature at LPT outlet", "°R", "thermal"),
    ("P2 pressure at fan inlet", "psia", "pressure"),
    ("P15 total pressure in bypass duct", "psia", "pressure"),
    ("P30 total pressure at HPC outlet", "psia", "pressure"),
    ("Nf physical fan speed", "rpm", "speed"),
    ("Nc physical core speed", "rpm", "speed"),
    ("epr engine pressure ratio", "", "pressure"),
    ("Ps30 static pressure at HPC outlet", "psia", "pressure"),
    ("phi ratio of fuel flow to Ps30", "pps/psi", "flow"),
    ("NRf corrected fan speed", "rpm", "speed"),
    ("NRc corrected core speed", "rpm", "speed"),
    ("BPR bypass ratio", "", "flow"),
    ("farB burner fuel-air ratio", "", "flow"),
    ("htBleed bleed enthalpy", "", "flow"),
    ("Nf_dmd demanded fan speed", "rpm", "speed"),
    ("PCNfR_dmd demanded corrected fan speed", "rpm", "speed"),
    ("W31 HPT coolant bleed", "lbm/s", "flow"),
    ("W32 LPT coolant bleed", "lbm/s", "flow"),
]
CMAPSS_COLUMNS = ["unit", "cycle", "setting_1", "setting_2", "setting_3",
                  *(f"sensor_{i}" for i in range(1, 22))]
CMAPSS_EPOCH = pd.Timestamp("2000-01-01", tz="UTC")

_HINTS = {
    "parquet": "it is a Parquet file: read it with format 'parquet'",
    "binary": "it looks binary, not text",
    "nab": "it looks like a NAB series (header timestamp,value): read it with format 'nab'",
    "skab": "it looks like a SKAB experiment (header datetime;...): read it with format 'skab'",
    "cmapss": "it looks like a C-MAPSS file (26 numbers per line): read it with format 'cmapss'",
}


class _Problems:
    """Collects IngestProblems up to MAX_PROBLEMS; raise_if_any() turns them into one IngestError."""

    def __init__(self) -> None:
        self.items: list[IngestProblem] = []
        self.dropped = 0

    def add(self, message: str, file: Path | str = "", row: int | None = None, column: str = "") -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(IngestProblem(message, str(file), row, column))
        else:
            self.dropped += 1

    def add_rows(self, rows: Sequence[int], describe: Callable[[int], str], *, file: Path | str,
                 column: str = "") -> None:
        """Report rows[i] as describe(i) for the first ROWS_PER_PROBLEM rows, then count the rest."""
        for i, row in enumerate(rows[:ROWS_PER_PROBLEM]):
            self.add(describe(i), file, int(row), column)
        if len(rows) > ROWS_PER_PROBLEM:
            self.add(f"... and {len(rows) - ROWS_PER_PROBLEM:,} more rows like this", file, column=column)

    def raise_if_any(self) -> None:
        if self.items:
            more = [IngestProblem(f"... and {self.dropped:,} more problems")] if self.dropped else []
            raise IngestError(self.items + more)


# --- public readers ------------------------------------------------------------------------------

def read_source(path: str | Path, fmt: str, **options) -> IngestBatch:
    """Read `path` with the reader for `fmt` (one of FORMATS); options go to that reader.

    Raises IngestError for a bad source, ValueError for an unknown format.
    """
    if fmt in ("csv", "parquet"):
        return read_table(path, fmt=fmt, **options)
    readers = {"nab": read_nab, "skab": read_skab, "cmapss": read_cmapss}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return readers[fmt](path, **options)


def infer_format(path: str | Path) -> str:
    """'csv' or 'parquet' from a file's extension, or from the files in a folder.

    The benchmark layouts (nab, skab, cmapss) are never inferred. Raises IngestError when the
    extension says nothing or a folder holds both kinds.
    """
    path = Path(path)
    if path.is_dir():
        found = {f.suffix.lower() for f in path.iterdir()} & {".csv", ".parquet"}
    else:
        found = {path.suffix.lower()}
    if found == {".csv"}:
        return "csv"
    if found == {".parquet"}:
        return "parquet"
    raise IngestError(IngestProblem(
        f"cannot tell the format from {'the files in this folder' if path.is_dir() else 'the extension'}:"
        f" give one of {', '.join(FORMATS)}", str(path)))


def read_table(
    path: str | Path,
    *,
    fmt: str = "csv",
    device_column: str = "device_id",
    timestamp_column: str = "timestamp",
    metrics: Sequence[str] | None = None,
    cohort_columns: Mapping[str, str] | None = None,
    metric_units: Mapping[str, str] | None = None,
    metric_domains: Mapping[str, str] | None = None,
    sep: str = ",",
) -> IngestBatch:
    """Read a long table: one row per (device, timestamp), one column per metric.

    path: a .csv/.parquet file, or a folder meaning every *.<fmt> file in it.
    metrics: source columns to keep; None means every numeric column that is not mapped to the
        device, the timestamp or a device attribute (a text column counts when most of its values
        are numbers; the rest are then reported). Names outside [A-Za-z0-9_] are turned into
        snake_case identifiers and the source name is kept as the schema entry's "label".
    cohort_columns: device attribute -> source column, attributes among manufacturer, model,
        os_version, store, customer. A device takes its latest non-empty value of each.
        The batch's cohort is the mapped attributes among manufacturer/model/os_version.
    metric_units, metric_domains: keyed by source column or metric name ("" and "other" if absent).
    Returns an IngestBatch. Raises IngestError with every problem found.
    """
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"read_table reads csv or parquet, not {fmt!r}")
    problems = _Problems()
    attributes = dict(cohort_columns or {})
    for attr in attributes:
        if attr not in DEVICE_ATTRIBUTES:
            problems.add(f"unknown device attribute {attr!r}; use one of {', '.join(DEVICE_ATTRIBUTES)}")
    roles = {device_column: "device column", timestamp_column: "timestamp column"}
    for attr, column in attributes.items():
        _claim(roles, column, f"{attr} column", problems)
    for column in metrics or []:
        _claim(roles, column, "metric column", problems)
    files = _files(Path(path), [f"*.{fmt}"], problems, what=f"*.{fmt} files")
    problems.raise_if_any()

    chosen = list(metrics) if metrics else None
    frames, names = [], {}
    for file in files:
        header = _header(file, fmt, sep, problems)
        if header is None or not _require(header, roles, file, fmt, problems):
            continue
        raw = _read(file, fmt, sep, problems, columns=None if chosen is None else list(roles),
                    strings=[device_column, timestamp_column, *attributes.values()])
        if raw is None:
            continue
        if chosen is None:
            inferred = _numeric_columns(raw, exclude=roles)
            if not inferred:
                problems.add(f"no metric columns: no column besides {', '.join(map(repr, roles))} holds"
                             f" numbers; available columns: {', '.join(header)}", file)
                continue
            chosen = inferred
            roles.update(dict.fromkeys(chosen, "metric column"))
        names = names or _metric_names(chosen, problems)
        frames.append(_to_frame(raw, file=file, timestamp_column=timestamp_column, metrics=names,
                                problems=problems, device_column=device_column, attributes=attributes))
    units, domains = dict(metric_units or {}), dict(metric_domains or {})
    schema = [_schema_entry(name, source, units.get(source, units.get(name, "")),
                            domains.get(source, domains.get(name, "other")))
              for source, name in names.items()]
    cohort = [a for a in DEFAULT_COHORT if a in attributes] or DEFAULT_COHORT
    return _finish(frames, schema, problems, source=str(path), cohort_columns=cohort,
                   attributes=list(attributes))


def read_nab(path: str | Path) -> IngestBatch:
    """Read NAB series (Lavin & Ahmad, "Evaluating real-time anomaly detection algorithms", 2015).

    path: the NAB root (data/<category>/<name>.csv and labels/combined_windows.json), its data
    folder, one category folder, or one series file. Each series is one device
    ("<category>/<name>") with one metric "value"; the category is the device's manufacturer, so
    categories are cohorts. Labels are the inclusive windows of labels/combined_windows.json
    (kind "nab_window"), when the file sits in that layout.

    Six upstream series repeat a timestamp (daylight-saving artefacts, e.g. twelve rows at
    2014-03-09 03:00:00). NAB scores by row, so every row is kept: the k-th repeat of a timestamp is
    moved k microseconds later. No repeat falls inside a label window.
    """
    problems = _Problems()
    files = _files(Path(path), ["data/*/*.csv", "*/*.csv", "*.csv"], problems, what="NAB series (*.csv)")
    frames, devices, labels, label_files = [], [], [], {}
    for file in files:
        external_id = f"{file.parent.name}/{file.stem}"
        header = _header(file, "csv", ",", problems)
        if header is None:
            continue
        missing = [c for c in ("timestamp", "value") if c not in header]
        if missing:
            problems.add(f"a NAB series needs columns 'timestamp' and 'value'; found {', '.join(header)}"
                         f"{_hint(file, 'nab')}", file, column=missing[0])
            continue
        raw = _read(file, "csv", ",", problems, columns=["timestamp", "value"], strings=["timestamp"])
        if raw is None:
            continue
        frame = _to_frame(raw, file=file, timestamp_column="timestamp", metrics={"value": "value"},
                          problems=problems, external_id=external_id)
        repeat = frame.groupby("timestamp").cumcount().to_numpy()
        frame["timestamp"] += pd.to_timedelta(repeat, unit="us")
        frames.append(frame)
        devices.append({"external_id": external_id, "manufacturer": file.parent.name})
        for start, end in _nab_windows(file, label_files, problems):
            labels.append({"external_id": external_id, "start": start, "end": end, "kind": "nab_window",
                           "metric": "value", "source": "nab"})
    schema = [_schema_entry("value", "value", "", "value")]
    return _finish(frames, schema, problems, source=str(path), cohort_columns=["manufacturer"],
                   devices=_devices(devices), labels=_labels(labels))


def read_skab(path: str | Path) -> IngestBatch:
    """Read SKAB experiments (Katser & Kozitsin, Skoltech Anomaly Benchmark, 2020).

    path: the SKAB root, its data folder, one experiment folder (e.g. valve1) or one file.
    Files are ';'-separated. Each file is one device ("<folder>/<file stem>", e.g. "valve1/0"),
    with manufacturer "SKAB" and model <folder>, so each folder is a cohort. The eight sensors are
    the metrics (snake_case names, e.g. "volume_flow_rate_rms"; the source name is the "label").
    Each contiguous run of anomaly == 1 becomes one label (kind "skab_anomaly"); changepoint is
    not used. Timestamps carry no zone and are read as UTC.
    """
    problems = _Problems()
    files = _files(Path(path), ["data/*/*.csv", "*/*.csv", "*.csv"], problems, what="SKAB files (*.csv)")
    names = {source: metric_identifier(source) for source in SKAB_SENSORS}
    frames, devices, labels = [], [], []
    for file in files:
        external_id = f"{file.parent.name}/{file.stem}"
        header = _header(file, "csv", ";", problems)
        if header is None:
            continue
        missing = [c for c in ("datetime", *SKAB_SENSORS) if c not in header]
        if missing:
            problems.add(f"not a SKAB file: missing {', '.join(map(repr, missing))}; found"
                         f" {', '.join(header)}{_hint(file, 'skab')}", file, column=missing[0])
            continue
        flagged = "anomaly" in header
        raw = _read(file, "csv", ";", problems, strings=["datetime"],
                    columns=["datetime", *SKAB_SENSORS, *(["anomaly"] if flagged else [])])
        if raw is None:
            continue
        frame = _to_frame(raw, file=file, timestamp_column="datetime", metrics=names, problems=problems,
                          external_id=external_id)
        frames.append(frame)
        devices.append({"external_id": external_id, "manufacturer": "SKAB", "model": file.parent.name})
        if flagged:
            flags = _numbers(raw["anomaly"], file, "anomaly", problems)
            bad = np.flatnonzero(np.isfinite(flags) & ~np.isin(flags, (0.0, 1.0)))
            problems.add_rows(bad + 1, lambda i: f"anomaly must be 0 or 1, not {flags[bad[i]]:g}",
                              file=file, column="anomaly")
            labels += [{"external_id": external_id, "start": start, "end": end, "kind": "skab_anomaly",
                        "metric": "", "source": "skab"}
                       for start, end in _runs(frame["timestamp"], flags == 1)]
    schema = [_schema_entry(name, source, *SKAB_SENSORS[source]) for source, name in names.items()]
    return _finish(frames, schema, problems, source=str(path), cohort_columns=["manufacturer", "model"],
                   devices=_devices(devices), labels=_labels(labels))


def read_cmapss(path: str | Path, *, split: str = "train", degraded_cycles: int = 30) -> IngestBatch:
    """Read NASA C-MAPSS turbofan runs (Saxena, Goebel, Simon & Eklund, PHM08, 2008).

    path: a folder (every <split>_FD*.txt in it) or one train_/test_FD00x.txt file, whose name
    then decides the split. Lines hold 26 whitespace-separated numbers: unit, cycle, 3 operational
    settings (metrics setting_1..3, domain "operating") and 21 sensors (sensor_1..21). Each unit is
    one device ("FD001/unit_001"; test units "FD001/test_unit_001"); cycle c is the timestamp
    2000-01-01T00:00Z + c hours. The files carry no labels: the last `degraded_cycles` cycles
    before failure of each unit become one label (kind "cmapss_degradation"). A training unit
    fails at its last cycle; a test unit fails RUL cycles after it, taken from RUL_FD00x.txt
    next to the file (no test labels without that file).
    """
    if split not in ("train", "test") or degraded_cycles < 0:
        raise ValueError("split must be 'train' or 'test' and degraded_cycles >= 0")
    problems = _Problems()
    path = Path(path)
    files = _files(path, [f"{split}_FD*.txt"], problems, what=f"C-MAPSS {split}_FD*.txt files")
    metric_names = CMAPSS_COLUMNS[2:]
    frames, devices, labels = [], [], []
    for file in files:
        table = _read_cmapss_table(file, problems)
        if table is None:
            continue
        fd = m.group() if (m := re.search(r"FD\d+", file.name)) else file.stem
        file_split = file.name.split("_")[0] if file.name.startswith(("train_", "test_")) else split
        ids = table[["unit", "cycle"]].to_numpy()
        bad = np.flatnonzero(((ids < 1) | (ids != np.floor(ids))).any(axis=1))
        problems.add_rows(bad + 1, lambda i: f"unit and cycle must be whole numbers >= 1, not"
                          f" {ids[bad[i], 0]:g} and {ids[bad[i], 1]:g}", file=file)
        if bad.size:
            continue
        units, cycles = ids[:, 0].astype(np.int64), ids[:, 1].astype(np.int64)
        prefix = f"{fd}/unit_" if file_split == "train" else f"{fd}/test_unit_"
        codes, uniques = pd.factorize(units, sort=True)
        external_ids = np.array([f"{prefix}{u:03d}" for u in uniques], dtype=object)
        frame = table[metric_names].copy()
        frame.insert(0, "external_id", external_ids[codes])
        frame.insert(1, "timestamp", CMAPSS_EPOCH + pd.to_timedelta(cycles, unit="h"))
        frame["_row"], frame["_file"] = np.arange(1, len(frame) + 1), str(file)
        frames.append(frame)
        devices += [{"external_id": e, "manufacturer": "NASA C-MAPSS", "model": fd} for e in external_ids]
        rul = np.zeros(len(uniques)) if file_split == "train" else _read_rul(file, fd, len(uniques), problems)
        if rul is None or not degraded_cycles:
            continue
        span = pd.DataFrame({"unit": units, "cycle": cycles}).groupby("unit")["cycle"].agg(["min", "max"])
        first = np.maximum(span["max"].to_numpy() + rul - degraded_cycles + 1, span["min"].to_numpy())
        for external_id, start, end in zip(external_ids, first, span["max"].to_numpy()):
            if start <= end:
                labels.append({"external_id": external_id, "start": CMAPSS_EPOCH + pd.Timedelta(hours=start),
                               "end": CMAPSS_EPOCH + pd.Timedelta(hours=end), "kind": "cmapss_degradation",
                               "metric": "", "source": "cmapss"})
    schema = [_schema_entry(f"setting_{i}", f"operational setting {i}", "", "operating") for i in (1, 2, 3)]
    schema += [_schema_entry(f"sensor_{i}", label, unit, domain)
               for i, (label, unit, domain) in enumerate(CMAPSS_SENSORS, start=1)]
    return _finish(frames, schema, problems, source=str(path), cohort_columns=["manufacturer", "model"],
                   devices=_devices(devices), labels=_labels(labels))


# --- files -------------------------------------------------------------------------------------

def _files(path: Path, patterns: list[str], problems: _Problems, *, what: str) -> list[Path]:
    """The file itself, or the files of the first pattern that matches inside a folder."""
    if not path.exists():
        problems.add("file or folder not found", path)
        return []
    if path.is_file():
        return [path]
    for pattern in patterns:
        if found := sorted(p for p in path.glob(pattern) if p.is_file()):
            return found
    problems.add(f"no {what} in this folder", path)
    return []


def _sniff(path: Path) -> str:
    """What a file looks like, for hints: parquet, binary, empty, nab, skab, cmapss or text."""
    with path.open("rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    if b"\x00" in head:
        return "binary"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    if not text.strip():
        return "empty"
    first = text.strip().splitlines()[0].strip()
    if first == "timestamp,value":
        return "nab"
    if first.startswith("datetime;"):
        return "skab"
    fields = first.split()
    if len(fields) == 26 and all(re.fullmatch(r"[-+]?[\d.]+(?:[eE][-+]?\d+)?", f) for f in fields):
        return "cmapss"
    return "text"


def _hint(path: Path, fmt: str) -> str:
    kind = _sniff(path)
    return f" ({_HINTS[kind]})" if kind in _HINTS and kind != fmt else ""


def _header(path: Path, fmt: str, sep: str, problems: _Problems) -> list[str] | None:
    """Column names of a CSV or Parquet file, or None (and a problem) when it cannot be read."""
    kind = _sniff(path)
    if kind == "empty":
        problems.add("file is empty", path)
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if kind != "parquet":
            problems.add(f"is not a Parquet file{_hint(path, fmt)}", path)
            return None
        try:
            return pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a damaged file
            problems.add(f"is not a readable Parquet file: {exc}", path)
            return None
    if kind in ("parquet", "binary"):
        problems.add(f"is not a CSV text file: {_HINTS[kind]}", path)
        return None
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh, delimiter=sep), [])
    except (UnicodeDecodeError, csv.Error) as exc:
        problems.add(f"cannot be read as UTF-8 CSV text: {exc}", path)
        return None
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        problems.add(f"the header names {', '.join(map(repr, repeated))} more than once", path)
        return None
    return header


def _require(header: list[str], roles: Mapping[str, str], file: Path, fmt: str, problems: _Problems) -> bool:
    """Report every requested column that the header lacks; True when none is missing."""
    missing = [c for c in roles if c not in header]
    for column in missing:
        problems.add(f"{roles[column]} {column!r} is not in the file; available columns:"
                     f" {', '.join(map(repr, header))}{_hint(file, fmt)}", file, column=column)
    return not missing


def _read(path: Path, fmt: str, sep: str, problems: _Problems, *, columns: list[str] | None,
          strings: list[str]) -> pd.DataFrame | None:
    """Parse a CSV (pyarrow, multi-threaded) or Parquet file; `strings` columns stay text.

    None (and a problem) when the file cannot be parsed or has no data rows.
    """
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=columns)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            problems.add(f"is not a readable Parquet file: {exc}", path)
            return None
        return _rows(table.to_pandas(), path, problems)
    import pyarrow.csv as pacsv

    ragged = []

    def on_ragged(row) -> str:
        ragged.append(row)
        return "skip"

    def parse(threads: bool) -> pa.Table:
        return pacsv.read_csv(
            path, read_options=pacsv.ReadOptions(use_threads=threads),
            parse_options=pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_ragged),
            convert_options=pacsv.ConvertOptions(include_columns=columns,
                                                 column_types={c: pa.string() for c in strings}))
    try:
        table = parse(threads=True)
        if ragged:  # only the single-threaded parser knows the line numbers
            ragged.clear()
            parse(threads=False)
    except pa.ArrowInvalid as exc:
        problems.add(f"cannot be parsed as {'semicolon' if sep == ';' else 'comma'}-separated text:"
                     f" {exc}", path)
        return None
    if ragged:
        problems.add_rows([r.number - 1 for r in ragged], lambda i: f"has {ragged[i].actual_columns} fields,"
                          f" the header has {ragged[i].expected_columns}: {ragged[i].text[:80]!r}", file=path)
        return None
    return _rows(table.to_pandas(), path, problems)


def _rows(raw: pd.DataFrame, path: Path, problems: _Problems) -> pd.DataFrame | None:
    if raw.empty:
        problems.add("has a header but no data rows", path)
        return None
    return raw


def _read_cmapss_table(path: Path, problems: _Problems) -> pd.DataFrame | None:
    """26 float columns; a file that does not parse cleanly is scanned line by line to name each fault."""
    kind = _sniff(path)
    if kind in ("empty", "parquet", "binary", "nab", "skab"):
        problems.add("file is empty" if kind == "empty" else f"is not a C-MAPSS file: {_HINTS[kind]}", path)
        return None
    try:
        table = pd.read_csv(path, sep=r"\s+", header=None, dtype=float)
        if table.shape[1] == len(CMAPSS_COLUMNS) and np.isfinite(table.to_numpy()).all():
            table.columns = CMAPSS_COLUMNS
            return table
    except (ValueError, pd.errors.ParserError):
        pass
    before = len(problems.items)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        problems.add(f"is not UTF-8 text: {exc}", path)
        return None
    wrong, bad = [], {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if fields and len(fields) != len(CMAPSS_COLUMNS):
            wrong.append((number, len(fields)))
            continue
        for column, text in zip(CMAPSS_COLUMNS, fields):
            try:
                ok = np.isfinite(float(text))
            except ValueError:
                ok = False
            if not ok:
                bad.setdefault(column, []).append((number, text))
    problems.add_rows([n for n, _ in wrong], lambda i: f"has {wrong[i][1]} fields, expected"
                      f" {len(CMAPSS_COLUMNS)} (unit, cycle, 3 settings, 21 sensors)", file=path)
    for column, found in bad.items():
        problems.add_rows([n for n, _ in found], lambda i, found=found: f"{found[i][1]!r} is not a finite"
                          " number", file=path, column=column)
    if len(problems.items) == before:
        problems.add(f"cannot be parsed as {len(CMAPSS_COLUMNS)} whitespace-separated numbers per line", path)
    return None


def _read_rul(file: Path, fd: str, units: int, problems: _Problems) -> np.ndarray | None:
    """Remaining useful life per test unit (unit order) from RUL_<fd>.txt, or None without the file."""
    rul_file = file.with_name(f"RUL_{fd}.txt")
    if not rul_file.is_file():
        return None
    try:
        rul = np.loadtxt(rul_file, ndmin=1)
    except ValueError as exc:
        problems.add(f"cannot be read as one number per line: {exc}", rul_file)
        return None
    if len(rul) != units:
        problems.add(f"has {len(rul)} values but {file.name} has {units} units", rul_file)
        return None
    return rul


def _nab_windows(file: Path, cache: dict, problems: _Problems) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """Label windows of a series in <root>/data/<category>/<name>.csv from <root>/labels/."""
    if file.parent.parent.name != "data":
        return []
    labels_file = file.parent.parent.parent / "labels" / "combined_windows.json"
    if labels_file not in cache:
        try:
            cache[labels_file] = json.loads(labels_file.read_text()) if labels_file.is_file() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            problems.add(f"is not valid JSON: {exc}", labels_file)
            cache[labels_file] = {}
    pairs = cache[labels_file].get(f"{file.parent.name}/{file.name}", [])
    try:
        return [(pd.Timestamp(start, tz="UTC"), pd.Timestamp(end, tz="UTC")) for start, end in pairs]
    except (TypeError, ValueError) as exc:
        problems.add(f"windows of {file.parent.name}/{file.name} are not [start, end] timestamp pairs: {exc}",
                     labels_file)
        return []


# --- columns -----------------------------------------------------------------------------------

def _claim(roles: dict[str, str], column: str, role: str, problems: _Problems) -> None:
    if column in roles:
        problems.add(f"column {column!r} cannot be both the {roles[column]} and a {role}", column=column)
    else:
        roles[column] = role


def _numeric_columns(raw: pd.DataFrame, *, exclude: Mapping[str, str]) -> list[str]:
    """Columns that hold numbers: a numeric type, or text where most present values are numbers."""
    chosen = []
    for column in raw.columns:
        values = raw[column]
        if column in exclude or pd.api.types.is_bool_dtype(values):
            continue
        if pd.api.types.is_numeric_dtype(values):
            chosen.append(column)
        elif values.dtype == object:
            present = values.dropna().astype(str)
            present = present[~_null_spelling(present)]
            if present.size and pd.to_numeric(present, errors="coerce").notna().mean() >= 0.5:
                chosen.append(column)
    return chosen


def _metric_names(columns: list[str], problems: _Problems) -> dict[str, str]:
    """Source column -> metric name ([A-Za-z0-9_]+, unique, not a reserved frame column)."""
    names = {c: c if METRIC_NAME_RE.fullmatch(c) else metric_identifier(c) for c in columns}
    seen: dict[str, str] = {}
    for column, name in names.items():
        if name in RESERVED_METRIC_NAMES:
            problems.add(f"metric name {name!r} is reserved; rename the column", column=column)
        if name in seen:
            problems.add(f"columns {seen[name]!r} and {column!r} both become metric {name!r}", column=column)
        seen[name] = column
    return names


def _schema_entry(name: str, label: str, unit: str, domain: str) -> dict:
    entry = {"name": name, "unit": unit, "domain": domain}
    return {**entry, "label": label} if label != name else entry


def _to_frame(raw: pd.DataFrame, *, file: Path, timestamp_column: str, metrics: Mapping[str, str],
              problems: _Problems, device_column: str | None = None, external_id: str = "",
              attributes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Validate one file's rows.

    Returns rows x (external_id, timestamp, metric names..., attributes..., _row, _file), in file
    order. Values that fail are reported, not dropped.
    """
    columns = {
        "external_id": (_device_ids(raw[device_column], file, device_column, problems)
                        if device_column else external_id),
        "timestamp": _timestamps(raw[timestamp_column], file, timestamp_column, problems),
        **{name: _numbers(raw[source], file, source, problems) for source, name in metrics.items()},
        **{attr: _texts(raw[source])[0] for attr, source in (attributes or {}).items()},
        "_row": np.arange(1, len(raw) + 1),
        "_file": str(file),
    }
    return pd.DataFrame(columns)


def _texts(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Stripped strings (None where blank or missing) and the mask of those; one pass per distinct value."""
    codes, uniques = pd.factorize(values)
    stripped = pd.Index(uniques).astype(str).str.strip()
    texts = np.append(stripped.to_numpy(dtype=object), None)[codes]
    empty = pd.isna(texts) | (texts == "")
    texts[empty] = None
    return texts, empty


def _device_ids(values: pd.Series, file: Path, column: str, problems: _Problems) -> np.ndarray:
    ids, empty = _texts(values)
    bad = np.flatnonzero(empty)
    problems.add_rows(bad + 1, lambda i: "device id is empty", file=file, column=column)
    return ids


def _timestamps(values: pd.Series, file: Path, column: str, problems: _Problems) -> pd.Series:
    """datetime64[ns, UTC]; each distinct string is parsed once (timestamps repeat across devices)."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(values):
        return values.dt.tz_localize("UTC")
    codes, uniques = pd.factorize(values)
    text = pd.Series(uniques, dtype=object).astype(str).str.strip()
    empty = np.append((text == "").to_numpy(), True)[codes]
    if empty.all():
        problems.add(f"timestamp column {column!r} is empty in every row", file, column=column)
        return pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    zulu = text.str.endswith("Z")
    offset = text.str.contains(_OFFSET_RE) & text.str.contains(":") & ~zulu
    # Zone-less text parses an order of magnitude faster than "Z", so "Z" is cut and read as UTC.
    # Offsets are parsed on their own: pandas 2 applies an offset to the naive strings after it.
    parsed = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns, UTC]")
    for part, strings in ((~offset, text.where(~zulu, text.str[:-1])), (offset, text)):
        if part.any():
            parsed[part] = pd.to_datetime(strings[part], format="ISO8601", utc=True, errors="coerce")
    offset |= zulu
    stamps = np.append(parsed.dt.tz_localize(None).to_numpy(), np.datetime64("NaT"))[codes]

    def first_row(mask: pd.Series) -> int:
        return int(np.flatnonzero(np.append(mask.to_numpy(), False)[codes])[0]) + 1

    if offset.any() and (~offset & parsed.notna()).any():
        naive, aware = first_row(~offset & parsed.notna()), first_row(offset & parsed.notna())
        problems.add(f"mixes timestamps with a UTC offset (first at row {aware}: {values.iat[aware - 1]!r})"
                     f" and without (first at row {naive}: {values.iat[naive - 1]!r}); give every timestamp"
                     f" an offset, or none (naive timestamps are read as UTC)", file, column=column)
    missing = np.flatnonzero(empty)
    problems.add_rows(missing + 1, lambda i: "timestamp is empty", file=file, column=column)
    bad = np.flatnonzero(np.isnat(stamps) & ~empty)
    problems.add_rows(bad + 1, lambda i: f"{values.iat[bad[i]]!r} is not a timestamp ({ISO_8601})",
                      file=file, column=column)
    return pd.Series(stamps, index=values.index).dt.tz_localize("UTC")


def _numbers(values: pd.Series, file: Path, column: str, problems: _Problems) -> np.ndarray:
    """float64 values; text that is not a number and infinite values are reported by row.

    Blank cells and the usual null spellings (NA, N/A, null, None) are missing values (NaN).
    """
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        numbers = values.to_numpy(dtype="float64", na_value=np.nan)
    else:
        text = values.astype(object).where(values.isna(), values.astype(str))
        numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        failed = np.isnan(numbers) & text.notna().to_numpy()
        if failed.any():
            failed[failed] = ~_null_spelling(text[failed]).to_numpy()
        bad = np.flatnonzero(failed)
        problems.add_rows(bad + 1, lambda i: f"{values.iat[bad[i]]!r} is not a number", file=file,
                          column=column)
    infinite = np.flatnonzero(np.isinf(numbers))
    problems.add_rows(infinite + 1, lambda i: f"value {numbers[infinite[i]]} is infinite", file=file,
                      column=column)
    return numbers


def _null_spelling(text: pd.Series) -> pd.Series:
    """Blank text and the usual spellings of a missing value (NA, N/A, NaN, null, None)."""
    return text.str.strip().str.lower().isin(_NULL_SPELLINGS)


def _runs(timestamps: pd.Series, flags: np.ndarray) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """(first, last) timestamp of each contiguous run of True, in time order."""
    order = np.argsort(timestamps.to_numpy(), kind="stable")
    edges = np.diff(np.concatenate([[0], flags[order].astype(np.int8), [0]]))
    ordered = timestamps.iloc[order]
    return list(zip(ordered.iloc[np.flatnonzero(edges == 1)], ordered.iloc[np.flatnonzero(edges == -1) - 1]))


# --- batch -------------------------------------------------------------------------------------

def _devices(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=DEVICE_COLUMNS).fillna("")


def _labels(rows: list[dict]) -> pd.DataFrame:
    labels = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    for column in ("start", "end"):
        labels[column] = pd.to_datetime(labels[column], utc=True)
    return labels.sort_values(["external_id", "start"], ignore_index=True)


def _finish(frames: list[pd.DataFrame], schema: list[dict], problems: _Problems, *, source: str,
            cohort_columns: list[str], devices: pd.DataFrame | None = None,
            labels: pd.DataFrame | None = None, attributes: Sequence[str] = ()) -> IngestBatch:
    """Checks across files (empty metrics, duplicate samples), then the sorted IngestBatch."""
    if not frames:
        problems.raise_if_any()
        raise IngestError(IngestProblem("no telemetry found", source))
    telemetry = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    for entry in schema:
        if telemetry[entry["name"]].isna().all():
            problems.add("metric has no values in any row", source, column=entry.get("label", entry["name"]))
    telemetry = telemetry.sort_values(["external_id", "timestamp"], kind="stable", ignore_index=True)
    _check_duplicates(telemetry, problems)
    problems.raise_if_any()
    if devices is None:
        devices = telemetry.groupby("external_id", sort=True)[list(attributes)].last().reset_index()
        devices = devices.reindex(columns=DEVICE_COLUMNS).fillna("")
    names = [entry["name"] for entry in schema]
    return IngestBatch(
        metric_schema=schema, devices=devices.reset_index(drop=True),
        telemetry=telemetry[["external_id", "timestamp", *names]],
        labels=labels if labels is not None else _labels([]), cohort_columns=cohort_columns, source=source)


def _check_duplicates(telemetry: pd.DataFrame, problems: _Problems) -> None:
    """Report samples that repeat a (device, timestamp), naming the row they repeat (sorted input)."""
    ids = telemetry["external_id"].to_numpy()
    stamps = telemetry["timestamp"].to_numpy("datetime64[ns]")
    repeat = np.zeros(len(ids), dtype=bool)
    repeat[1:] = (ids[1:] == ids[:-1]) & (stamps[1:] == stamps[:-1]) & pd.notna(ids[1:])
    dup = np.flatnonzero(repeat)
    if not dup.size:
        return
    first = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(ids))))
    rows, files = telemetry["_row"].to_numpy(), telemetry["_file"].to_numpy()
    for j in dup[:ROWS_PER_PROBLEM]:
        k = first[j]
        where = f"row {rows[k]}" + (f" of {files[k]}" if files[k] != files[j] else "")
        problems.add(f"duplicate sample: device {ids[j]!r} at {pd.Timestamp(stamps[j], tz='UTC')} is already"
                     f" at {where}", files[j], int(rows[j]))
    if dup.size > ROWS_PER_PROBLEM:
        problems.add(f"... and {dup.size - ROWS_PER_PROBLEM:,} more duplicate samples", files[dup[-1]])
