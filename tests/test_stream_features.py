"""The stream's per-batch scoring pieces against the pandas pipeline they stand in for: features of some
rows only (detection.ml.features.build_features_at) and the entries of scoring.top_metrics.

Crafted on a synthetic fleet with what live telemetry has: samples missing at random (irregular
spacing), missing values, an infinite value, a flat-lined sensor and a near-constant one (where pandas'
running variance carries its own rounding), and a device without cohort attributes.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from baselines.engine import compute_baselines
from detection.ingest.synthetic import generate_fleet
from detection.ml.features import FeatureConfig, build_features, build_features_at, resid_scales
from detection.ml.scoring import top_metrics


@pytest.fixture(scope="module")
def telemetry():
    batch = generate_fleet(devices=24, days=3, seed=5)
    df = batch.telemetry.merge(batch.devices, on="external_id", how="left")
    df["device_id"] = df["external_id"].map({e: i + 1 for i, e in enumerate(batch.devices["external_id"])}).astype(np.int64)
    metrics = [c for c in batch.telemetry.columns if c not in ("external_id", "timestamp")]
    rng = np.random.default_rng(11)
    df = df[rng.random(len(df)) > 0.15]  # irregular spacing, sometimes gaps longer than the window
    df = df.sort_values(["device_id", "timestamp"], ignore_index=True)
    df.loc[rng.random(len(df)) < 0.08, metrics[0]] = np.nan
    df.loc[7, metrics[1]] = np.inf
    one = df["device_id"] == 3
    df.loc[one, metrics[2]] = 42.0  # flat-lined: std exactly 0
    df.loc[df["device_id"] == 4, metrics[3]] = 1.3486 + rng.normal(0, 1e-7, (df["device_id"] == 4).sum())
    df.loc[df["device_id"] == 5, ["manufacturer", "model"]] = None  # no cohort: no cohort median
    return df, metrics


CONFIGS = [FeatureConfig(), FeatureConfig(rolling_window="3h", delta_lag="6h", cohort_bucket="2h", resid_floor=0.5)]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("pick", ["random", "last_per_device", "all", "one"])
def test_features_of_some_rows_are_build_features_values_to_the_bit(telemetry, config, pick):
    df, metrics = telemetry
    if config.resid_floor == 0.5:
        config = FeatureConfig(**{**config.__dict__, "resid_scale": resid_scales(df, metrics)})
    rng = np.random.default_rng(2)
    rows = {"random": rng.choice(len(df), 300, replace=False),
            "last_per_device": np.flatnonzero(df["device_id"].ne(df["device_id"].shift(-1))),
            "all": np.arange(len(df))[::-1],
            "one": np.array([len(df) // 2])}[pick]

    part = build_features_at(df, rows, metrics, config)
    full = build_features(df, metrics, config)

    expected = full.frame.iloc[rows].reset_index(drop=True)
    assert list(part.frame.columns) == list(expected.columns)
    for column in expected.columns:
        np.testing.assert_array_equal(part.frame[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
    assert (part.model_features, part.resid_features, part.feature_metric) == \
        (full.model_features, full.resid_features, full.feature_metric)


def test_features_of_some_rows_keep_pandas_rounding_of_a_near_constant_window(telemetry):
    """pandas' running variance is not the exact one on a near-constant sensor: the rows must carry
    pandas' value (what training saw), not a freshly summed one."""
    df, metrics = telemetry
    rows = np.flatnonzero(df["device_id"] == 4)[30:]
    column = f"{metrics[3]}_roll_std"
    got = build_features_at(df, rows, metrics).frame[column].to_numpy()
    assert np.array_equal(got, build_features(df, metrics).frame[column].to_numpy()[rows])
    values = df[metrics[3]].to_numpy()
    ts = df["timestamp"]
    exact = np.array([np.std(values[(df["device_id"] == 4) & (ts > ts[r] - pd.Timedelta("12h")) & (ts <= ts[r])],
                             ddof=1) for r in rows])
    assert not np.array_equal(got, exact)  # the case is one where the two differ


def test_features_of_some_rows_refuse_an_unsorted_frame_and_rows_outside_it(telemetry):
    df, metrics = telemetry
    with pytest.raises(ValueError, match="sorted"):
        build_features_at(df.iloc[::-1], [0], metrics)
    with pytest.raises(ValueError, match="positions"):
        build_features_at(df, [len(df)], metrics)
    with pytest.raises(KeyError, match="nope"):
        build_features_at(df, [0], [*metrics, "nope"])
    assert len(build_features_at(df, [], metrics).frame) == 0


def _num(v: float) -> float | None:
    return round(float(v), 4) if np.isfinite(v) else None


def _top_metrics_per_entry(rows, *, features, feature_metric, metric_domain, baselines, level, top_k):
    """scoring.top_metrics as it was written before its entries were built a column at a time."""
    from baselines.engine import lookup
    from detection.ml.features import feature_kind

    features = [f for f in features if f in rows.columns and f in baselines.features]
    x = rows[features].to_numpy(dtype="float64")
    median, mad, used = lookup(rows, baselines, level, features, with_levels=True)
    with np.errstate(all="ignore"):
        z = (x - median) / (1.4826 * mad)
    absz = np.where(np.isfinite(z), np.abs(z), -1.0)
    metric_of = np.array([feature_metric.get(f, f) for f in features])
    metrics = list(dict.fromkeys(metric_of))
    best_col = np.empty((len(rows), len(metrics)), dtype=int)
    best_abs = np.empty((len(rows), len(metrics)))
    for j, m in enumerate(metrics):
        cols = np.flatnonzero(metric_of == m)
        best_col[:, j] = cols[np.argmax(absz[:, cols], axis=1)]
        best_abs[:, j] = absz[np.arange(len(rows)), best_col[:, j]]
    order = np.argsort(-best_abs, axis=1)[:, :top_k]
    out = []
    for r in range(len(rows)):
        entries = []
        for j in order[r]:
            c = best_col[r, j]
            if best_abs[r, j] < 0:
                continue
            entries.append({"metric": metrics[j], "feature": features[c],
                            "kind": feature_kind(features[c], metrics[j]),
                            "domain": metric_domain.get(metrics[j], "other"), "value": _num(x[r, c]),
                            "typical": _num(median[r, c]), "mad": _num(mad[r, c]), "z": _num(z[r, c]),
                            "level": str(used[r, c])})
        out.append(entries)
    return out


@pytest.mark.parametrize("top_k", [1, 3, 5, 50])
def test_top_metrics_entries_are_those_of_the_per_entry_loop(telemetry, top_k):
    df, metrics = telemetry
    ff = build_features(df.fillna({"manufacturer": "unknown", "model": "unknown"}), metrics)
    train = ff.frame[ff.frame["timestamp"] < ff.frame["timestamp"].min() + pd.Timedelta("2D")]
    baselines = compute_baselines(train, ff.model_features, ("device", "cohort"), min_rows=10)
    rows = ff.frame.iloc[::5]
    kwargs = {"features": ff.model_features, "feature_metric": ff.feature_metric,
              "metric_domain": {metrics[0]: "battery", metrics[4]: "compute"}, "baselines": baselines,
              "level": "device", "top_k": top_k}

    got = top_metrics(rows, **kwargs)

    assert repr(got) == repr(_top_metrics_per_entry(rows, **kwargs))  # same values, same types, same order
    assert any(e["level"] != "device" for entries in got for e in entries)  # fall-backs were exercised
