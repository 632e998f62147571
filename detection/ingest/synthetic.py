"""A synthetic demo fleet: retail handheld scanners with work-shift seasonality and labelled anomalies.

Every device follows its store's shift (UTC hours, a store opens between 06:00 and 09:00 for 9-11 h):
during the shift the battery drains and warms up, CPU, memory, network traffic rise and Wi-Fi RSSI
dips as the worker roams the aisles; after the shift the device sits in its cradle and charges up to a
plateau. Every device has its own offsets (idle CPU, memory footprint, traffic volume, Wi-Fi spot,
storage fill rate) and every shift-day its own intensity, plus per-sample noise.

One cohort is normal but unlike the rest: SPECIAL_COHORT_NAME, "Samsung Galaxy S21 Android 14". It is
a consumer phone drafted in as a scanner: its smaller battery drains ~1.5x faster, Samsung's
"Protect battery" caps charging at 85 %, and it runs ~6 °C hotter all the time, so its battery_level
is systematically lower and battery_temp higher. None of it is labelled: a fleet-wide (global)
baseline flags it wrongly, a cohort baseline must not.

Injected anomalies (ANOMALY_KINDS), each one ground-truth window in batch.labels, cover about
ANOMALY_ROW_SHARE of all rows (at least one window per kind, so more in a tiny fleet); windows sit on a
random subset of devices and never overlap:
- spike: 1-3 samples, battery_temp jumps to 52-58 °C (at least +15 °C) or cpu_pct pins at 97-100 %.
- level_shift: a 12-48 h step, storage_free -25..35 points or wifi_rssi -20..28 dB.
- drift: a linear slide over 2-4 days, memory_pct towards 92-97 % (a leak) or storage_free down by
  30-40 points (a runaway log).
- stuck_sensor: battery_level, battery_temp or wifi_rssi frozen at its value at the window start for 24 h.
- dropout: 6-12 h with network_rx_mb/network_tx_mb ~0 and wifi_rssi at -95 dBm (labelled wifi_rssi).
Finally MISSING_SHARE of the values are set to NaN at random (never a whole column).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .base import DEVICE_COLUMNS, LABEL_COLUMNS, IngestBatch

SOURCE = "synthetic"
DEFAULT_END = pd.Timestamp("2026-11-01", tz="UTC")  # fixed, so that a seed always gives the same data

METRIC_SCHEMA = [
    {"name": "battery_level", "unit": "%", "domain": "battery"},
    {"name": "battery_temp", "unit": "°C", "domain": "battery"},
    {"name": "storage_free", "unit": "%", "domain": "storage"},
    {"name": "cpu_pct", "unit": "%", "domain": "compute"},
    {"name": "memory_pct", "unit": "%", "domain": "compute"},
    {"name": "network_rx_mb", "unit": "MB", "domain": "network"},
    {"name": "network_tx_mb", "unit": "MB", "domain": "network"},
    {"name": "wifi_rssi", "unit": "dBm", "domain": "wifi"},
]
METRICS = [m["name"] for m in METRIC_SCHEMA]
PHYSICAL_RANGE = {
    "battery_level": (0.0, 100.0), "battery_temp": (10.0, 60.0), "storage_free": (0.0, 100.0),
    "cpu_pct": (0.0, 100.0), "memory_pct": (0.0, 100.0), "network_rx_mb": (0.0, np.inf),
    "network_tx_mb": (0.0, np.inf), "wifi_rssi": (-95.0, -30.0),
}

# (manufacturer, model, os_version, share of the fleet, battery drain factor)
CATALOGUE = [
    ("Zebra", "TC52", "Android 11", 0.22, 1.00),
    ("Zebra", "TC52", "Android 13", 0.10, 0.95),
    ("Zebra", "TC57", "Android 13", 0.20, 1.05),
    ("Honeywell", "CT40", "Android 12", 0.16, 0.90),
    ("Honeywell", "CT60", "Android 11", 0.08, 1.10),
    ("Samsung", "Galaxy XCover6 Pro", "Android 14", 0.14, 0.95),
    ("Samsung", "Galaxy S21", "Android 14", 0.10, 1.50),
]
SPECIAL_COHORT = ("Samsung", "Galaxy S21", "Android 14")
SPECIAL_COHORT_NAME = " ".join(SPECIAL_COHORT)  # as Device.cohort_label spells it
SPECIAL_CHARGE_CAP = 85.0  # %, Samsung "Protect battery"
SPECIAL_TEMP_OFFSET = 6.0  # °C
CUSTOMERS = ["acme-retail", "globex-grocers", "northwind-pharmacy", "initech-hardware"]
DEVICES_PER_STORE = 12

ANOMALY_KINDS = ("spike", "level_shift", "drift", "stuck_sensor", "dropout")
ANOMALY_ROW_SHARE = 0.015
MISSING_SHARE = 0.002
# kind -> (min, max) window length in hours (spikes: in samples), and the metrics it may hit
_WINDOW_HOURS = {"level_shift": (12, 48), "drift": (48, 96), "stuck_sensor": (24, 24), "dropout": (6, 12)}
_KIND_METRICS = {
    "spike": ["battery_temp", "cpu_pct"],
    "level_shift": ["storage_free", "wifi_rssi"],
    "drift": ["memory_pct", "storage_free"],
    "stuck_sensor": ["battery_level", "battery_temp", "wifi_rssi"],
    "dropout": ["wifi_rssi"],
}


def generate_fleet(*, devices: int, days: int, seed: int, start: pd.Timestamp | None = None,
                   freq: str = "1h") -> IngestBatch:
    """Generate a synthetic fleet with labelled injected anomalies; the same seed gives the same batch.

    devices: number of devices (>= 1), ids "dev-0001"..., ~1 store ("store-001"...) per 12 devices,
        stores spread over up to four customers; cohorts in CATALOGUE proportions (every cohort present
        once devices >= len(CATALOGUE)).
    days, freq: `days` x (1 day / freq) samples per device; freq is a fixed pandas offset ("1h", "15min").
    start: first timestamp (naive means UTC), floored to the hour; default midnight UTC `days` days
        before 2026-11-01.
    Returns an IngestBatch with source "synthetic": telemetry is (devices x samples) rows x
        (external_id, timestamp [datetime64[ns, UTC]], the 8 METRICS as float64 in METRIC_SCHEMA units),
        sorted by external_id then timestamp; labels one row per injected window (LABEL_COLUMNS, start
        and end inclusive). Generating 1000 devices x 42 days hourly (~1M rows) takes about a second.
    Raises ValueError if devices < 1, days < 1, or freq is not a positive fixed period dividing a day.
    """
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    step = pd.Timedelta(freq)
    if step <= pd.Timedelta(0) or pd.Timedelta(days=1) % step:
        raise ValueError(f"freq must be a positive period that divides a day, got {freq!r}")
    rng = np.random.default_rng(seed)
    start = DEFAULT_END - pd.Timedelta(days=days) if start is None else pd.Timestamp(start)
    start = (start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")).floor("h")
    n_steps = days * (pd.Timedelta(days=1) // step)
    timestamps = pd.date_range(start, periods=n_steps, freq=step).as_unit("ns")

    device_frame, is_special, drain_factor, store_of = _devices(rng, devices)
    values = _normal_telemetry(rng, timestamps, is_special, drain_factor, store_of)
    labels = _inject_anomalies(rng, values, timestamps, device_frame["external_id"].to_numpy())

    missing = rng.random(values.shape) < MISSING_SHARE
    missing[:, 0, 0] &= ~missing.reshape(len(METRICS), -1).all(axis=1)  # never a whole column NaN
    values[missing] = np.nan

    telemetry = pd.DataFrame({
        "external_id": np.repeat(device_frame["external_id"].to_numpy(), n_steps),
        "timestamp": pd.to_datetime(np.tile(timestamps.asi8, devices), utc=True),
        **{name: values[m].ravel() for m, name in enumerate(METRICS)},
    })
    return IngestBatch(metric_schema=[dict(m) for m in METRIC_SCHEMA], devices=device_frame,
                       telemetry=telemetry, labels=labels,
                       cohort_columns=["manufacturer", "model", "os_version"], source=SOURCE)


def _devices(rng: np.random.Generator, n: int
             ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Device attributes (DEVICE_COLUMNS), special-cohort mask, battery drain factor, store index."""
    # Cohort sizes follow the catalogue shares exactly (largest remainder), so small fleets keep them.
    quota = np.array([c[3] for c in CATALOGUE]) * n
    counts = np.floor(quota).astype(int)
    counts[np.argsort(counts - quota, kind="stable")[: n - counts.sum()]] += 1
    cohort = rng.permutation(np.repeat(np.arange(len(CATALOGUE)), counts))
    n_stores = max(1, round(n / DEVICES_PER_STORE))
    n_customers = min(len(CUSTOMERS), n_stores)
    customer_of_store = rng.permutation(np.arange(n_stores) % n_customers)
    store_of = rng.permutation(np.arange(n) % n_stores)
    width = max(4, len(str(n)))
    catalogue = np.array([c[:3] for c in CATALOGUE], dtype=object)
    frame = pd.DataFrame({
        "external_id": [f"dev-{i:0{width}d}" for i in range(1, n + 1)],
        "manufacturer": catalogue[cohort, 0],
        "model": catalogue[cohort, 1],
        "os_version": catalogue[cohort, 2],
        "store": [f"store-{s + 1:03d}" for s in store_of],
        "customer": np.array(CUSTOMERS, dtype=object)[customer_of_store[store_of]],
    })[DEVICE_COLUMNS]
    is_special = np.array([CATALOGUE[c][:3] == SPECIAL_COHORT for c in range(len(CATALOGUE))])[cohort]
    drain_factor = np.array([c[4] for c in CATALOGUE])[cohort]
    return frame, is_special, drain_factor, store_of


def _normal_telemetry(rng: np.random.Generator, timestamps: pd.DatetimeIndex, is_special: np.ndarray,
                      drain_factor: np.ndarray, store_of: np.ndarray) -> np.ndarray:
    """Normal behaviour as a (metrics x devices x samples) float64 array in METRICS order."""
    n_dev, n_steps = len(is_special), len(timestamps)
    step_h = (timestamps[1] - timestamps[0]) / pd.Timedelta(hours=1) if n_steps > 1 else 1.0
    hours = ((timestamps - timestamps[0].normalize()) / pd.Timedelta(hours=1)).to_numpy()[None, :]
    col = lambda a: np.asarray(a, dtype=float)[:, None]  # noqa: E731 - per-device column vector
    noise = lambda scale: rng.normal(0.0, scale, (n_dev, n_steps))  # noqa: E731

    n_stores = store_of.max() + 1
    shift_start = col(rng.integers(6, 10, n_stores)[store_of] + rng.normal(0, 0.25, n_dev))
    shift_len = col(rng.uniform(9, 11, n_stores)[store_of])
    since_start = hours - shift_start
    in_shift_h = np.mod(since_start, 24.0)  # hours since this shift-day's start
    shift_day = np.floor(since_start / 24.0).astype(int) + 1
    intensity = np.take_along_axis(rng.uniform(0.8, 1.2, (n_dev, shift_day.max() + 1)), shift_day, axis=1)
    ramp = lambda x: 1.0 / (1.0 + np.exp(-x / 0.4))  # noqa: E731 - ~1 h ramp at shift start and end
    activity = ramp(in_shift_h - 0.5) * ramp(shift_len - in_shift_h - 0.5) * intensity

    # Battery: starts the shift at the charge plateau, drains, then charges in the cradle.
    plateau = np.where(is_special, SPECIAL_CHARGE_CAP, rng.uniform(95, 99, n_dev))[:, None]
    drain = col(5.0 * drain_factor * rng.uniform(0.9, 1.1, n_dev)) * intensity  # %/h
    charge = col(rng.uniform(22, 30, n_dev))  # %/h
    working = in_shift_h < shift_len
    shift_end = np.maximum(plateau - drain * shift_len, 3.0)
    battery = np.where(working, np.maximum(plateau - drain * in_shift_h, 3.0),
                       np.minimum(plateau, shift_end + charge * (in_shift_h - shift_len)))
    charging = ~working & (battery < plateau - 0.5)
    battery = battery + noise(0.8)
    temp = (col(27 + rng.normal(0, 0.8, n_dev) + SPECIAL_TEMP_OFFSET * is_special) + 7.0 * activity
            + 3.5 * charging + noise(0.6))

    days_elapsed = hours / 24.0
    fill_rate = col(rng.uniform(0.05, 0.25, n_dev))  # points per day
    storage = col(rng.uniform(35, 85, n_dev)) - fill_rate * days_elapsed + noise(0.3)
    cpu = (col(rng.uniform(4, 10, n_dev)) + 30.0 * col(rng.uniform(0.7, 1.3, n_dev)) * activity
           + rng.gamma(2.0, 1.5, (n_dev, n_steps)))
    memory = col(40 + rng.normal(0, 6, n_dev)) + 15.0 * activity + noise(2.0)
    # Traffic is MB per sample, so it scales with the sample period.
    burst = rng.gamma(4.0, 0.25, (n_dev, n_steps))
    rx = (col(rng.uniform(0.5, 2.0, n_dev)) + col(rng.uniform(15, 60, n_dev)) * activity * burst) * step_h
    tx = rx * col(rng.uniform(0.2, 0.3, n_dev)) + np.abs(noise(0.05)) * step_h
    spot = rng.uniform(-62, -48, n_stores)[store_of] + rng.normal(0, 3, n_dev)  # dBm, store and device
    rssi = col(spot) - 6.0 * activity + noise(2.5)
    return np.stack([battery, temp, storage, cpu, memory, rx, tx, rssi])


def _inject_anomalies(rng: np.random.Generator, values: np.ndarray, timestamps: pd.DatetimeIndex,
                      external_ids: np.ndarray) -> pd.DataFrame:
    """Inject windows into `values` (metrics x devices x samples, in place, then clipped to
    PHYSICAL_RANGE) and return their labels (LABEL_COLUMNS)."""
    _, n_dev, n_steps = values.shape
    step_h = (timestamps[1] - timestamps[0]) / pd.Timedelta(hours=1) if n_steps > 1 else 1.0
    # Draw more windows than needed, then keep the prefix whose length sum is nearest the row budget
    # (every kind among the first five), so that the anomalous share is close to ANOMALY_ROW_SHARE.
    lo_hi = np.array([(1, 3)] + [(max(1, round(lo / step_h)), max(1, round(hi / step_h)))
                                 for lo, hi in _WINDOW_HOURS.values()])
    budget = ANOMALY_ROW_SHARE * n_dev * n_steps
    n_draw = len(ANOMALY_KINDS) + int(2 * budget / lo_hi.mean()) + 1
    kinds = np.concatenate([rng.permutation(len(ANOMALY_KINDS)),
                            rng.integers(0, len(ANOMALY_KINDS), n_draw - len(ANOMALY_KINDS))])
    length = rng.integers(lo_hi[kinds, 0], lo_hi[kinds, 1] + 1)
    n_win = max(len(ANOMALY_KINDS), int(np.argmin(np.abs(np.cumsum(length) - budget))) + 1)
    n_win = min(n_win, n_dev * n_steps)  # a degenerate fleet (a sample or two) gets fewer windows
    kinds, length = kinds[:n_win], length[:n_win]
    # Each affected device splits its timeline into one segment per window, so windows never overlap.
    order = rng.permutation(n_dev)
    dev = order[np.arange(n_win) % n_dev]
    per_dev = np.bincount(dev, minlength=n_dev)[dev]
    seg_len = n_steps // per_dev
    seg_start = (np.arange(n_win) // n_dev) * seg_len
    length = np.minimum(length, np.maximum(seg_len - 1, 1))
    start = seg_start + rng.integers(0, np.maximum(seg_len - length, 0) + 1)
    options = [[METRICS.index(name) for name in _KIND_METRICS[kind]] for kind in ANOMALY_KINDS]
    n_options = np.array([len(o) for o in options])
    table = np.array([[o[i % len(o)] for i in range(n_options.max())] for o in options])
    metric = table[kinds, rng.integers(0, n_options[kinds])]

    # One entry per anomalous sample: window w, its sample t and its position 0..1 within the window.
    w = np.repeat(np.arange(n_win), length)
    offset = np.arange(len(w)) - np.repeat(np.cumsum(length) - length, length)
    t, d, m = start[w] + offset, dev[w], metric[w]
    pos = offset / np.maximum(length[w] - 1, 1)
    size = rng.uniform(0, 1, n_win)[w]  # the magnitude within each kind's range
    kind_of = np.array(ANOMALY_KINDS)[kinds][w]
    idx = METRICS.index

    hit = kind_of == "spike"
    temp, cpu = hit & (m == idx("battery_temp")), hit & (m == idx("cpu_pct"))
    hot = values[m[temp], d[temp], t[temp]] + 15
    values[m[temp], d[temp], t[temp]] = np.maximum(hot, 52 + 6 * size[temp])
    values[m[cpu], d[cpu], t[cpu]] = 97 + 3 * size[cpu]
    hit = kind_of == "level_shift"
    storage, rssi = hit & (m == idx("storage_free")), hit & (m == idx("wifi_rssi"))
    values[m[storage], d[storage], t[storage]] -= 25 + 10 * size[storage]
    values[m[rssi], d[rssi], t[rssi]] -= 20 + 8 * size[rssi]
    hit = kind_of == "drift"
    current = values[m[hit], d[hit], t[hit]]
    memory = (m == idx("memory_pct"))[hit]
    leak = pos[hit] * (92 + 5 * size[hit] - current)
    values[m[hit], d[hit], t[hit]] = current + np.where(memory, leak, -pos[hit] * (30 + 10 * size[hit]))
    hit = kind_of == "stuck_sensor"
    values[m[hit], d[hit], t[hit]] = values[m[hit], d[hit], start[w][hit]]
    hit = kind_of == "dropout"
    for name in ("network_rx_mb", "network_tx_mb"):
        values[idx(name), d[hit], t[hit]] = np.abs(rng.normal(0, 0.01, hit.sum())) * step_h
    values[idx("wifi_rssi"), d[hit], t[hit]] = -95.0

    for i, name in enumerate(METRICS):
        np.clip(values[i], *PHYSICAL_RANGE[name], out=values[i])
    labels = pd.DataFrame({
        "external_id": external_ids[dev],
        "start": timestamps[start],
        "end": timestamps[start + length - 1],
        "kind": np.array(ANOMALY_KINDS)[kinds],
        "metric": np.array(METRICS)[metric],
        "source": SOURCE,
    })[LABEL_COLUMNS]
    return labels.sort_values(["external_id", "start"], ignore_index=True)
