"""The online scoring path (detection.ml.online, used by detection.serving for /api/v1/detect) gives the
pandas path's answers: the same features as build_features, and the same detect_observations dicts for
stored samples and for crafted observations (new timestamps, replaced samples, missing metrics, devices
without history or alone in their cohort, values far out), one at a time and in batches."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from factories import DeviceFactory, FleetFactory

from detection import serving
from detection.ingest.loader import ingest_batch, load_telemetry_frame
from detection.ingest.synthetic import generate_fleet
from detection.ml.features import FeatureConfig, build_features, resid_scales
from detection.ml.online import BLOCKS, FeatureSpec, History, OnlineModel, Unsupported, engineer
from detection.models import Device, Fleet
from detection.services import pipeline_run_create, pipeline_run_execute


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    serving.model_cache_clear()
    yield
    serving.model_cache_clear()


# --- features on arrays, no database --------------------------------------------------------------

def _fleet_frame(freq: str) -> tuple[pd.DataFrame, list[str]]:
    """A synthetic fleet as load_telemetry_frame shapes it, with gaps: missing values, a flat-lined
    sensor and a device silent for half a day."""
    batch = generate_fleet(devices=14, days=3, seed=11, freq=freq)
    metrics = batch.metric_names
    frame = batch.telemetry.merge(batch.devices, on="external_id")
    frame.insert(0, "device_id", frame["external_id"].factorize(sort=True)[0].astype(np.int64) + 1)
    frame = frame.sort_values(["device_id", "timestamp"], ignore_index=True)
    rng = np.random.default_rng(5)
    values = frame[metrics].to_numpy()
    values[rng.random(values.shape) < 0.08] = np.nan
    values[40:70, 2] = 63.25  # flat: rolling std exactly 0, running sums notwithstanding
    frame[metrics] = values
    silent = (frame["device_id"] == 3) & (frame["timestamp"] > frame["timestamp"].min() + pd.Timedelta("20h")) \
        & (frame["timestamp"] < frame["timestamp"].min() + pd.Timedelta("34h"))
    return frame[~silent].reset_index(drop=True), metrics


def _history(frame: pd.DataFrame, metrics: list[str], cohort_columns: list[str]) -> History:
    cohort = pd.MultiIndex.from_frame(frame[cohort_columns]).factorize()[0] if cohort_columns \
        else np.zeros(len(frame), dtype=np.int64)
    return History(frame["device_id"].to_numpy(np.int64),
                   frame["timestamp"].to_numpy("datetime64[ns]").view(np.int64),
                   frame[metrics].to_numpy(np.float64), np.asarray(cohort, dtype=np.int64))


@pytest.mark.parametrize("freq, cohort_columns", [("1h", ("manufacturer", "model", "os_version")),
                                                   ("20min", ("manufacturer",)), ("1h", ())])
def test_online_features_equal_build_features_bit_for_bit(freq, cohort_columns):
    frame, metrics = _fleet_frame(freq)
    config = FeatureConfig(cohort_columns=cohort_columns, resid_scale=resid_scales(frame, metrics))
    want = build_features(frame, metrics, config).frame
    history = _history(frame, metrics, list(cohort_columns))
    spec = FeatureSpec.of(config, metrics)
    every = engineer(spec, history, np.arange(len(frame)))
    some = np.sort(np.random.default_rng(2).choice(len(frame), 25, replace=False))
    few = engineer(spec, history, some)  # a handful of rows: the same values as in the whole frame
    for b, suffix in enumerate(BLOCKS):
        expected = want[[f"{m}{suffix}" for m in metrics]].to_numpy()
        np.testing.assert_array_equal(every[b], expected, err_msg=f"feature {suffix or 'value'}")
        np.testing.assert_array_equal(few[b], expected[some], err_msg=f"feature {suffix or 'value'} (25 rows)")
    assert np.isnan(every[3]).any() and np.isnan(every[5]).any()  # first samples: no delta, no residual
    assert (every[2] == 0).any()  # the flat-lined sensor


def test_feature_spec_refuses_windows_that_are_not_fixed_durations():
    with pytest.raises(Unsupported):
        FeatureSpec.of(FeatureConfig(cohort_bucket="1M"), ["x"])


# --- detect_observations: the online path against the pandas path ---------------------------------

def _train(name: str, *, freq: str = "1h", config: dict | None = None) -> Fleet:
    ingest_batch(batch=generate_fleet(devices=24, days=4, seed=3, freq=freq), fleet_name=name)
    fleet = Fleet.objects.get(name=name)
    if config:
        fleet.config = config
        fleet.save(update_fields=["config"])
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert run.model_version_id, run.error
    return fleet


def _observation(row, metrics) -> dict:
    return {"device_id": row.external_id, "timestamp": row.timestamp.to_pydatetime(),
            "metrics": {m: (None if np.isnan(getattr(row, m)) else float(getattr(row, m))) for m in metrics}}


def _same(a, b, where="") -> None:
    """Equal dicts/lists, floats within 1e-9 relative (the spec's tolerance; they are in fact equal)."""
    if isinstance(b, float) and isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) or (math.isnan(a) and math.isnan(b)), (where, a, b)
    elif isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), (where, a, b)
        for k in b:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), (where, a, b)
        for k, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{k}]")
    else:
        assert a == b and type(a) is type(b) or (a == b and {type(a), type(b)} <= {str, np.str_}), (where, a, b)


def _both(fleet: Fleet, observations: list[dict], monkeypatch) -> list[dict]:
    """detect_observations by the online path (checked to be taken), then by the pandas path; asserts
    they agree and returns the answers."""
    taken = []
    online = serving._score_online
    monkeypatch.setattr(serving, "_score_online", lambda *a, **k: taken.append(1) or online(*a, **k))
    monkeypatch.setattr(serving, "FAST_PATH", True)
    fast = serving.detect_observations(fleet=fleet, observations=observations)
    assert taken, "the online path was not taken"
    monkeypatch.setattr(serving, "FAST_PATH", False)
    reference = serving.detect_observations(fleet=fleet, observations=observations)
    for got, want in zip(fast, reference, strict=True):
        got, want = dict(got), dict(want)
        assert got.pop("processing_time_ms") > 0 and want.pop("processing_time_ms") > 0
        _same(got, want, want["device_id"] + " " + want["timestamp"])
    return reference


@pytest.mark.django_db
def test_stored_samples_score_the_same_online_one_by_one_and_in_a_batch(monkeypatch):
    fleet = _train("fast-parity")
    assert serving.model_load(fleet=fleet).online is not None
    metrics = fleet.metric_names
    frame = load_telemetry_frame(fleet)
    rows = frame.sample(60, random_state=4)
    # and the most abnormal stored samples, so that anomalies (severity, top metrics) are compared
    scored = serving.detect_observations(fleet=fleet, observations=[
        _observation(r, metrics) for r in frame.iloc[::7].itertuples(index=False)])
    worst = np.argsort([-s["anomaly_score"] for s in scored])[:12] * 7
    rows = pd.concat([rows, frame.iloc[worst]]).drop_duplicates(["device_id", "timestamp"])
    observations = [_observation(r, metrics) for r in rows.itertuples(index=False)]
    answers = [_both(fleet, [o], monkeypatch)[0] for o in observations]
    assert sum(a["is_anomaly"] for a in answers) >= 5 and any(a["top_metrics"] for a in answers)
    assert {a["severity"] for a in answers if a["is_anomaly"]} - {None}
    batch = _both(fleet, observations, monkeypatch)
    assert [b["device_id"] for b in batch] == [o["device_id"] for o in observations]


@pytest.mark.django_db
@pytest.mark.parametrize("freq, config", [
    ("30min", None),
    ("1h", {"algorithm": "isolation_forest", "impact_weights": {"battery": 2.5, "Zebra": 1.5}}),
    ("1h", {"hybrid_temporal": "residual"}),
])
def test_crafted_observations_score_the_same_online(monkeypatch, freq, config):
    fleet = _train("fast-crafted", freq=freq, config=config)
    assert serving.model_load(fleet=fleet).online is not None
    metrics = fleet.metric_names
    frame = load_telemetry_frame(fleet)
    last = frame["timestamp"].max()
    step = pd.Timedelta(freq)
    some = frame[frame["timestamp"] == last - pd.Timedelta("30h")].iloc[0]
    device = some.external_id
    cohort = {c: getattr(some, c) for c in ("manufacturer", "model", "os_version")}
    peer = Device.objects.filter(fleet=fleet, **cohort).exclude(external_id=device).first()
    values = {m: float(getattr(some, m)) for m in metrics if not np.isnan(getattr(some, m))}
    DeviceFactory(fleet=fleet, external_id="fresh-same-cohort", **cohort)  # no history, known cohort
    DeviceFactory(fleet=fleet, external_id="fresh-alone", manufacturer="Acme", model="X1", os_version="9")
    first = frame[frame["external_id"] == device]["timestamp"].min()
    t = some.timestamp

    def obs(dev, at, **changes):
        return {"device_id": dev, "timestamp": at.to_pydatetime(), "metrics": {**values, **changes}}

    crafted = [
        obs(device, t + step / 2),  # between two stored samples
        obs(device, t, battery_temp=values["battery_temp"] + 7.5),  # replaces a stored sample
        obs(device, t + step / 3, cpu_pct=None, memory_pct=None),  # missing metrics (None)
        {**obs(device, t + step / 4), "metrics": {"battery_level": values["battery_level"]}},  # left out
        obs(device, first - step),  # before the device's first sample
        obs(device, first),  # replaces the first sample
        obs(device, t + step / 5, battery_temp=95.0, network_rx_mb=900.0),  # far out
        obs(device, last + pd.Timedelta("3D")),  # no history within the window at all
        obs("fresh-same-cohort", t),  # no history, device baseline falls back to the cohort
        obs("fresh-alone", t, cpu_pct=99.0),  # alone in a cohort the baselines never saw
        obs(device, t.floor("h") + pd.Timedelta("59min")),  # last moment of the bucket
    ]
    if peer is not None:
        crafted.append(obs(peer.external_id, t + step / 2, wifi_rssi=-20.0))
    # A device with its history, alone in a cohort that the baselines never saw (moved to a new model).
    solo = Device.objects.filter(fleet=fleet).exclude(external_id=device).exclude(
        pk=getattr(peer, "pk", None)).order_by("pk").last()
    Device.objects.filter(pk=solo.pk).update(manufacturer="Solo", model="S1", os_version="1")
    crafted.append(obs(solo.external_id, t, memory_pct=3.0))
    answers = [_both(fleet, [o], monkeypatch)[0] for o in crafted]
    assert any(a["is_anomaly"] for a in answers)
    # Together: observations of one cohort and bucket enter each other's cohort median, and a device's
    # observations each other's windows.
    unique = {(o["device_id"], o["timestamp"]): o for o in crafted}
    _both(fleet, list(unique.values()), monkeypatch)


@pytest.mark.django_db
def test_a_detector_without_an_online_form_keeps_the_pandas_path(monkeypatch):
    fleet = _train("fast-ensemble", config={"algorithm": "robust_z"})
    loaded = serving.model_load(fleet=fleet)
    assert loaded.online is None
    with pytest.raises(Unsupported):
        OnlineModel(detector=loaded.detector, config=loaded.config, baselines=loaded.baselines,
                    metrics=fleet.metric_names, forest_type=serving.StackedForest)
    calls = []
    reference = serving._score_frame
    monkeypatch.setattr(serving, "_score_frame", lambda *a, **k: calls.append(1) or reference(*a, **k))
    row = load_telemetry_frame(fleet).iloc[100]
    out = serving.detect_observations(fleet=fleet, observations=[_observation(row, fleet.metric_names)])
    assert calls and out[0]["device_id"] == row.external_id and np.isfinite(out[0]["anomaly_score"])


@pytest.mark.django_db
def test_errors_name_the_field_and_index_before_any_model_is_needed():
    device = DeviceFactory(fleet=FleetFactory(name="fast-errors"), external_id="d1")
    fleet = device.fleet
    good = {"device_id": "d1", "timestamp": pd.Timestamp("2026-10-30T10:00:00Z").to_pydatetime(),
            "metrics": {"battery_level": 50.0, "cpu_temp": None}}
    cases = [({**good, "device_id": "nope"}, "device_id"),
             ({**good, "metrics": {"bogus": 1.0}}, "metrics"),
             ({**good, "metrics": {"cpu_temp": float("inf")}}, "metrics"),
             (dict(good), "timestamp")]  # the same (device, timestamp) twice
    for bad, field in cases:
        with pytest.raises(serving.ServingError) as err:
            serving.detect_observations(fleet=fleet, observations=[good, bad])
        assert (err.value.field, err.value.index, err.value.status) == (field, 1, 400), str(err.value)
    with pytest.raises(serving.NoProductionModel) as err:  # valid observations, no model yet: 409
        serving.detect_observations(fleet=fleet, observations=[good])
    assert err.value.status == 409 and "fast-errors" in str(err.value)


@pytest.mark.django_db
def test_device_level_explanations_are_the_same_online(monkeypatch):
    """The hybrid model's temporal columns make device-level candidates of the top metrics; the online
    path gives the pandas path's entries for them (values, device statistics, fall-back level)."""
    fleet = _train("fast-device-level")
    online = serving.model_load(fleet=fleet).online
    assert online is not None and len(online.device_columns)
    assert {online.top_features[len(online.features) + k] for k in range(len(online.device_columns))} == \
        {f"{m}_roll_mean" for m in fleet.metric_names}
    metrics = fleet.metric_names
    frame = load_telemetry_frame(fleet)
    device = frame["external_id"].iloc[0]
    # The device's last 18 stored samples with its free storage 8 points lower: anomalies whose entries
    # include device-level ones (the rolling means against the device's own baseline).
    shifted = []
    for row in frame[frame["external_id"] == device].tail(18).itertuples(index=False):
        o = _observation(row, metrics)
        o["metrics"]["storage_free"] = (o["metrics"]["storage_free"] or 50.0) - 8.0
        shifted.append(o)
    answers = _both(fleet, shifted, monkeypatch)
    assert sum(a["is_anomaly"] for a in answers) >= 5
    device_level = [e for a in answers for e in a["top_metrics"] if e["level"] == "device"]
    assert device_level and all(e["feature"].endswith("_roll_mean") for e in device_level)
    # A device the baselines never saw: its device-level candidates take the cohort's statistics.
    DeviceFactory(fleet=fleet, external_id="fresh-device-level", **{
        c: frame[frame["external_id"] == device][c].iloc[0] for c in ("manufacturer", "model", "os_version")})
    fresh = [{**o, "device_id": "fresh-device-level"} for o in shifted[-3:]]
    _both(fleet, fresh, monkeypatch)
