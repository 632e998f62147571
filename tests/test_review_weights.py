"""Dynamic ensemble weights: a retrained ensemble weighs each member by its precision on the fleet's
reviewed anomalies (suite.weights_from_feedback through pipeline._review_weights), with the
configured weights as priors when there are no reviews; the model version records which."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from factories import user_with_role

from detection.choices import Verdict
from detection.ingest.loader import ingest_batch
from detection.ingest.synthetic import generate_fleet
from detection.ml import suite  # noqa: F401  (registers the detectors)
from detection.ml.detectors import AnomalyDetectorConfig
from detection.ml.suite import EnsembleDetector
from detection.models import AnomalyResult, Fleet
from detection.services import feedback_give, pipeline_run_create, pipeline_run_execute, reviewed_anomalies

CONFIG = AnomalyDetectorConfig(contamination=0.05, min_training_rows=20)
MEMBERS = ["robust_z", "iqr", "lof"]


def _frame(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])


@pytest.mark.parametrize("smooth", [1, 5])
def test_reweight_equals_fitting_with_those_weights(smooth):
    X = _frame()
    config = AnomalyDetectorConfig(contamination=0.05, min_training_rows=20, ensemble_smooth_rows=smooth)
    weights = {"lof": 0.2, "iqr": 2.5}
    refit = EnsembleDetector(config, members=MEMBERS).fit(X, ["a", "b", "c"])
    refit.reweight(X, weights, source="a test")
    direct = EnsembleDetector(config, members=MEMBERS, weights=weights).fit(X, ["a", "b", "c"])
    assert refit.threshold_ == pytest.approx(direct.threshold_)
    np.testing.assert_allclose(refit.score_samples(X.iloc[900:]), direct.score_samples(X.iloc[900:]))
    assert refit.params()["weights_source"] == "a test" and direct.params()["weights_source"] == "priors"
    assert refit.params()["member_weights"] == {"robust_z": 1.0, "iqr": 2.5, "lof": 0.2}


@pytest.fixture
def fleet():
    ingest_batch(batch=generate_fleet(devices=12, days=6, seed=3), fleet_name="weights")
    fleet = Fleet.objects.get(name="weights")
    fleet.config = {"algorithm": "ensemble", "ensemble_members": MEMBERS}
    fleet.save()
    return fleet


def _run(fleet):
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert run.status == "succeeded", run.error
    return run


def _weights(params: dict) -> dict[str, float]:
    return {m: params[f"weight_{m}"] for m in MEMBERS}


@pytest.mark.django_db
def test_reviews_move_the_weights_of_the_members_that_flagged_them(fleet):
    first = _run(fleet)
    params = first.model_version.params
    assert params["weights_source"] == "priors" and set(_weights(params).values()) == {1.0}
    reviewer = user_with_role("rita", "reviewer")
    anomalies = list(AnomalyResult.objects.filter(run=first, label=-1).order_by("timestamp")[:40])
    assert len(anomalies) == 40
    for anomaly in anomalies:  # every one a false positive: whoever flagged them loses weight
        feedback_give(anomaly=anomaly, user=reviewer, verdict=Verdict.FALSE_POSITIVE)
    reviewed = reviewed_anomalies(fleet)
    assert len(reviewed) == 40 and set(reviewed["verdict"]) == {"false_positive"}

    second = _run(fleet)
    params = second.model_version.params
    assert params["weights_source"] == "precision on 40 reviewed anomalies"
    weights = _weights(params)
    # Each member's weight is its precision on the reviews shrunk towards 0.5 (weights_from_feedback):
    # 0 true of the n it flagged gives 2 / (n + 4) / 0.5, so n = 4 / w - 4 is a whole number <= 40.
    assert min(weights.values()) < 0.5 and all(w <= 1.0 for w in weights.values())
    flagged = [4 / w - 4 for w in weights.values()]
    assert all(abs(n - round(n)) < 1e-6 and 0 <= round(n) <= 40 for n in flagged)
    assert max(flagged) > 20  # the ensemble flagged all 40, so at least one member flagged most


@pytest.mark.django_db
def test_true_positive_reviews_raise_the_weights_and_a_tie_or_not_sure_counts_for_nothing(fleet):
    first = _run(fleet)
    anomalies = list(AnomalyResult.objects.filter(run=first, label=-1).order_by("timestamp")[:30])
    rita, sam = user_with_role("rita", "reviewer"), user_with_role("sam", "reviewer")
    for anomaly in anomalies[:20]:
        feedback_give(anomaly=anomaly, user=rita, verdict=Verdict.TRUE_POSITIVE)
    for anomaly in anomalies[20:25]:  # a tie between two reviewers: no verdict
        feedback_give(anomaly=anomaly, user=rita, verdict=Verdict.TRUE_POSITIVE)
        feedback_give(anomaly=anomaly, user=sam, verdict=Verdict.FALSE_POSITIVE)
    for anomaly in anomalies[25:]:
        feedback_give(anomaly=anomaly, user=sam, verdict=Verdict.NOT_SURE)
    assert len(reviewed_anomalies(fleet)) == 20
    params = _run(fleet).model_version.params
    assert params["weights_source"] == "precision on 20 reviewed anomalies"
    assert max(_weights(params).values()) > 1.0 and min(_weights(params).values()) >= 1.0


@pytest.mark.django_db
def test_model_versions_page_shows_the_weights_and_where_they_came_from(fleet, client):
    first = _run(fleet)
    client.force_login(user_with_role("vera", "viewer"))
    page = client.get(f"/fleets/{fleet.name}/models/").content.decode()
    assert "robust_z 1.00" in page and "weights: configured (no reviews yet)" in page
    reviewer = user_with_role("rita", "reviewer")
    for anomaly in AnomalyResult.objects.filter(run=first, label=-1).order_by("timestamp")[:10]:
        feedback_give(anomaly=anomaly, user=reviewer, verdict=Verdict.FALSE_POSITIVE)
    second = _run(fleet)
    page = client.get(f"/fleets/{fleet.name}/models/").content.decode()
    assert "weights: precision on 10 reviewed anomalies" in page
    shown = second.model_version.params["weight_lof"]
    assert f"lof {shown:.2f}" in page
