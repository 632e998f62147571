"""detection.ml.features on crafted frames."""
import numpy as np
import pandas as pd
import pytest

from detection.ml.features import FeatureConfig, build_features


def _frame(n=48, devices=(1, 2)):
    ts = pd.date_range("2026-01-01", periods=n, freq="1h", tz="UTC")
    parts = []
    for d in devices:
        parts.append(pd.DataFrame({"device_id": d, "external_id": f"d{d}", "timestamp": ts,
                                   "manufacturer": "A", "model": "m", "os_version": "1",
                                   "cpu": np.arange(n, dtype=float) + 100 * d}))
    return pd.concat(parts, ignore_index=True)


def test_rolling_mean_is_per_device_and_time_based():
    ff = build_features(_frame(), ["cpu"], FeatureConfig(rolling_window="3h"))
    f = ff.frame
    dev2 = f[f.device_id == 2]
    # window (t-3h, t]: the current and two previous hourly samples; never device 1's values
    assert dev2["cpu_roll_mean"].iloc[0] == 200.0
    assert dev2["cpu_roll_mean"].iloc[5] == pytest.approx(np.mean([203, 204, 205]))


def test_day_over_day_delta_matches_the_sample_one_day_earlier():
    ff = build_features(_frame(n=30), ["cpu"])
    f = ff.frame[ff.frame.device_id == 1].reset_index(drop=True)
    assert f["cpu_delta"].iloc[:24].isna().all()
    assert f["cpu_delta"].iloc[24:].eq(24.0).all()


def test_cohort_norm_removes_a_cohort_wide_movement():
    df = _frame(devices=(1, 2, 3))
    df["cpu"] = 10.0
    df.loc[df.device_id == 3, "cpu"] = 50.0  # only device 3 deviates from its cohort
    ff = build_features(df, ["cpu"])
    by_dev = ff.frame.groupby("device_id")["cpu_cohort_norm"].median()
    assert by_dev[1] == 0 and by_dev[3] == 40.0


def test_residual_flags_a_spike_against_the_device_history():
    df = _frame(n=48, devices=(1,))
    rng = np.random.default_rng(0)
    df["cpu"] = 20 + rng.normal(0, 1, len(df))
    df.loc[30, "cpu"] = 60.0
    ff = build_features(df, ["cpu"], FeatureConfig(rolling_window="6h"))
    resid = ff.frame["cpu_resid"].abs()
    assert resid.idxmax() == 30 and resid[30] > 10


def test_unsorted_frame_and_missing_columns_are_refused():
    df = _frame()
    with pytest.raises(ValueError, match="sorted"):
        build_features(df.iloc[::-1], ["cpu"])
    with pytest.raises(KeyError, match="battery"):
        build_features(df, ["battery"])


def test_feature_lists_map_back_to_metrics():
    ff = build_features(_frame(), ["cpu"])
    assert ff.model_features == ["cpu", "cpu_roll_mean", "cpu_roll_std", "cpu_delta", "cpu_cohort_norm"]
    assert ff.resid_features == ["cpu_resid"]
    assert set(ff.feature_metric.values()) == {"cpu"}


def test_feature_kind_names_what_each_engineered_column_measures():
    from detection.ml.features import feature_kind

    assert feature_kind("cpu_pct", "cpu_pct") == "value"
    assert feature_kind("cpu_pct_delta", "cpu_pct") == "day-over-day change"
    assert feature_kind("cpu_pct_cohort_norm", "cpu_pct") == "vs cohort, same hour"


def test_rolling_features_stay_with_their_metric_when_metrics_are_not_in_name_order():
    # pandas' grouped rolling sorts its result columns by name; each metric must still get its own
    # rolling mean and std (a fleet's schema order is rarely alphabetical).
    df = _frame(n=24)
    df = df.rename(columns={"cpu": "zeta"})
    df["alpha"] = 1000.0 + np.arange(len(df)) % 24
    ff = build_features(df, ["zeta", "alpha"], FeatureConfig(rolling_window="3h"))
    f = ff.frame[ff.frame.device_id == 1].reset_index(drop=True)
    assert f["zeta_roll_mean"].iloc[5] == pytest.approx(np.mean([103, 104, 105]))
    assert f["alpha_roll_mean"].iloc[5] == pytest.approx(np.mean([1003, 1004, 1005]))
    assert f["zeta_roll_std"].iloc[5] == pytest.approx(np.std([103, 104, 105], ddof=1))
