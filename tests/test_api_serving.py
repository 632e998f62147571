"""The serving fast path: StackedForest scores exactly as sklearn's IsolationForest."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from detection.serving import StackedForest


@pytest.mark.parametrize("max_features, rows", [(1.0, 1), (1.0, 700), (0.6, 37), (0.6, 1500)])
def test_stacked_forest_scores_equal_sklearn(max_features, rows):
    rng = np.random.default_rng(4)
    train = rng.normal(size=(600, 7)).astype(np.float32)
    train[:20] += 6  # a few outliers, so leaves sit at varied depths
    forest = IsolationForest(n_estimators=60, max_samples=256, max_features=max_features, random_state=1)
    forest.fit(train)
    X = np.vstack([rng.normal(size=(rows - 1, 7)), np.full((1, 7), 9.0)]).astype(np.float32) if rows > 1 \
        else np.full((1, 7), 9.0, dtype=np.float32)
    stacked = StackedForest(forest)
    stacked.CHUNK_ROWS = 256  # several chunks for the larger case
    assert np.allclose(stacked.score_samples(X), forest.score_samples(X), rtol=0, atol=1e-12)
    assert stacked.n_estimators == 60  # everything else is the forest's
    assert stacked.score_samples(np.zeros((0, 7), dtype=np.float32)).shape == (0,)


def test_cached_baseline_set_looks_up_exactly_as_the_plain_set():
    """serving.CachedBaselineSet builds its tables once per model version; lookups (with fall-back to
    the parent level for unseen groups) and the robust z-scores are those of the plain set."""
    import pandas as pd

    from baselines.engine import apply_baselines, compute_baselines, lookup
    from detection.serving import CachedBaselineSet

    rng = np.random.default_rng(2)
    n = 400
    frame = pd.DataFrame({
        "manufacturer": rng.choice(["acme", "globex"], n), "model": rng.choice(["m1", "m2"], n),
        "os_version": rng.choice(["1", "2"], n), "store": rng.choice(["s1", "s2", "s3"], n),
        "customer": rng.choice(["c1", "c2"], n), "external_id": rng.choice([f"d{i}" for i in range(12)], n),
        "battery": rng.normal(50, 5, n), "temp": rng.normal(30, 2, n)})
    plain = compute_baselines(frame, ["battery", "temp"], ("cohort", "device"), min_rows=5)
    cached = CachedBaselineSet.of(plain)
    rows = frame.sample(40, random_state=1).reset_index(drop=True)
    rows.loc[:4, "external_id"] = "new-device"  # unseen group: falls back to the cohort
    rows.loc[5:7, "model"] = "m9"  # unseen cohort: falls back to global
    for level in ("cohort", "device"):
        for a, b in zip(lookup(rows, cached, level, ["battery", "temp"], with_levels=True),
                        lookup(rows, plain, level, ["battery", "temp"], with_levels=True)):
            np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(apply_baselines(rows, cached, ("cohort", "device")),
                                  apply_baselines(rows, plain, ("cohort", "device")))
    assert cached.table("device", "median") is cached.table("device", "median")  # built once
