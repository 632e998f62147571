"""baselines.engine on hand-made frames: medians, MADs, fall-back, robust z-scores."""
import json

import numpy as np
import pandas as pd
import pytest

from baselines.engine import BaselineError, apply_baselines, compute_baselines, lookup


# Deviations from the median in one cycle: median |d| = 1 and mean |d| = 1.4826/1.2533, so the
# MAD and its mean-absolute-deviation floor agree at exactly 1.
_CYCLE = [-2 * 1.4826 / 1.2533 + 1, -1, 0, 1, 2 * 1.4826 / 1.2533 - 1]


def _frame():
    # Two cohorts: A (devices a1, a2) with battery around 80 and 82, B (device b1) around 40.
    rows = []
    for dev, manu, base, n in (("a1", "A", 80.0, 40), ("a2", "A", 82.0, 40), ("b1", "B", 40.0, 10)):
        for i in range(n):
            rows.append({"external_id": dev, "manufacturer": manu, "model": "m", "os_version": "1",
                         "store": "s1", "customer": "c1", "battery": base + _CYCLE[i % 5]})
    return pd.DataFrame(rows)


def _stat(bs, level, feature, **key):
    s = bs.stats
    row = s[(s.level == level) & (s.feature == feature) & (s.group_key == json.dumps(key))]
    assert len(row) == 1, row
    return row.iloc[0]


def test_cohort_median_and_mad_are_computed_per_group():
    bs = compute_baselines(_frame(), ["battery"], ("cohort",), min_rows=5)
    a = _stat(bs, "cohort", "battery", manufacturer="A", model="m", os_version="1")
    x = _frame().query("manufacturer == 'A'")["battery"]
    deviation = (x - 81.0).abs()
    assert a["median"] == pytest.approx(81.0)
    assert a["mad"] == pytest.approx(max(deviation.median(), 1.2533 / 1.4826 * deviation.mean()))
    bs_dev = compute_baselines(_frame(), ["battery"], ("device",), min_rows=5)
    d = _stat(bs_dev, "device", "battery", external_id="a1")
    assert d["median"] == pytest.approx(80.0) and d["mad"] == pytest.approx(1.0)
    assert a["count"] == 80
    assert a["fallback_level"] == ""


def test_small_group_falls_back_to_parent_level():
    bs = compute_baselines(_frame(), ["battery"], ("device",), min_rows=25)
    b1 = _stat(bs, "device", "battery", external_id="b1")  # 10 rows < 25: takes cohort B's statistics
    assert b1["fallback_level"] == "cohort"
    assert b1["count"] == 10
    # cohort B has 10 rows < 25 too, so it fell back to global
    cohort_b = _stat(bs, "cohort", "battery", manufacturer="B", model="m", os_version="1")
    assert cohort_b["fallback_level"] == "global"
    assert b1["median"] == pytest.approx(cohort_b["median"])
    a1 = _stat(bs, "device", "battery", external_id="a1")
    assert a1["fallback_level"] == "" and a1["median"] == pytest.approx(80.0)


def test_zero_mad_group_falls_back_instead_of_dividing_by_zero():
    df = _frame()
    df.loc[df.external_id == "a1", "battery"] = 50.0  # a stuck sensor: MAD 0 within the device
    bs = compute_baselines(df, ["battery"], ("device",), min_rows=5)
    assert _stat(bs, "device", "battery", external_id="a1")["fallback_level"] == "cohort"
    z = apply_baselines(df, bs, ("device",))["battery_z_device"]
    assert np.isfinite(z).all()


def test_robust_z_score_uses_mad_consistency_constant():
    df = _frame()
    bs = compute_baselines(df, ["battery"], ("device",), min_rows=5)
    probe = df.iloc[[0]].copy()
    probe["battery"] = 80.0 + 1.4826 * 3  # three robust standard deviations above device a1's median
    z = apply_baselines(probe, bs, ("device",))["battery_z_device"].iloc[0]
    assert z == pytest.approx(3.0)


def test_mad_is_floored_for_zero_inflated_features():
    # Network traffic: ~0 for 16 hours a day, 10-30 MB for 8. The plain MAD is the night-time
    # noise (0.05) and would make every daytime hour a 100-sigma outlier; the floored MAD does not.
    night = np.tile([0.0, 0.1, 0.05, 0.02], 400)
    day = np.tile([10.0, 20.0, 30.0, 15.0], 200)
    df = pd.DataFrame({"external_id": "d", "traffic": np.r_[night, day]})
    bs = compute_baselines(df, ["traffic"], ("global",), max_rows_per_group=len(df))
    row = _stat(bs, "global", "traffic")
    x = df["traffic"]
    plain_mad = (x - x.median()).abs().median()
    assert plain_mad < 0.1
    assert row["mad"] == pytest.approx(1.2533 / 1.4826 * (x - x.median()).abs().mean(), rel=0.01)
    z = apply_baselines(df, bs, ("global",))["traffic_z_global"]
    assert z.max() < 6


def test_cohort_baseline_does_not_flag_a_cohort_that_is_normally_different():
    df = _frame()
    bs = compute_baselines(df, ["battery"], ("global", "cohort"), min_rows=5)
    out = apply_baselines(df, bs, ("global", "cohort"))
    b_rows = out[out.manufacturer == "B"]
    assert b_rows["battery_z_global"].abs().min() > 3  # globally, cohort B looks abnormal
    # its own cohort fell back to global (10 rows < 25 would); with min_rows=5 it has its own baseline
    assert b_rows["battery_z_cohort"].abs().max() < 2


def test_unseen_device_takes_parent_statistics():
    df = _frame()
    bs = compute_baselines(df, ["battery"], ("device",), min_rows=5)
    new = df.iloc[[0]].copy()
    new["external_id"] = "never-seen"
    median, mad, used = lookup(new, bs, "device", ["battery"], with_levels=True)
    cohort_a = _stat(bs, "cohort", "battery", manufacturer="A", model="m", os_version="1")
    assert median[0, 0] == pytest.approx(cohort_a["median"])
    assert used[0, 0] == "cohort"


def test_errors_name_the_problem():
    with pytest.raises(BaselineError, match="unknown baseline level"):
        compute_baselines(_frame(), ["battery"], ("planet",))
    with pytest.raises(BaselineError, match="lacks column.*voltage"):
        compute_baselines(_frame(), ["voltage"], ("global",))
    with pytest.raises(BaselineError, match="no rows"):
        compute_baselines(_frame().iloc[:0], ["battery"], ("global",))
    bs = compute_baselines(_frame(), ["battery"], ("global",))
    with pytest.raises(BaselineError, match="not in this baseline set"):
        apply_baselines(_frame(), bs, ("store",))


def test_all_levels_are_computed_with_parents():
    bs = compute_baselines(_frame(), ["battery"], min_rows=5)
    assert set(bs.stats.level) == {"global", "cohort", "store", "customer", "device"}


def test_a_device_mad_is_floored_at_a_tenth_of_its_cohorts():
    """Devices with almost no noise around offsets far apart (a slowly filling disk): the device MAD
    is a tenth of the cohort's, so a drift of a few noise widths is not a "20-sigma" outlier, while
    a step of the cohort's spread still is."""
    rng = np.random.default_rng(0)
    rows = [{"external_id": f"d{d}", "manufacturer": "A", "model": "m", "os_version": "1", "store": "s",
             "customer": "c", "storage": offset + 0.05 * rng.standard_normal()}
            for d, offset in enumerate(np.linspace(30, 90, 12)) for _ in range(60)]
    frame = pd.DataFrame(rows)
    floored = compute_baselines(frame, ["storage"], ("cohort", "device"), min_rows=5)
    plain = compute_baselines(frame, ["storage"], ("cohort", "device"), min_rows=5, device_mad_floor=0)
    cohort_mad = _stat(floored, "cohort", "storage", manufacturer="A", model="m", os_version="1")["mad"]
    own_mad = _stat(plain, "device", "storage", external_id="d0")["mad"]
    assert own_mad < 0.05 < 0.1 * cohort_mad
    assert _stat(floored, "device", "storage", external_id="d0")["mad"] == pytest.approx(0.1 * cohort_mad)
    later = frame[frame.external_id == "d0"].head(2).copy()
    device_median = _stat(floored, "device", "storage", external_id="d0")["median"]
    later["storage"] = [device_median + 1.0, device_median + 20.0]  # a small drift; a step of 20 points
    z = apply_baselines(later, floored, ("device",))["storage_z_device"].to_numpy()
    z_plain = apply_baselines(later, plain, ("device",))["storage_z_device"].to_numpy()
    assert z_plain[0] > 20 and z[0] < 1.0
    assert z[1] > 8
