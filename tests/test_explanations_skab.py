"""The built-in writer on real anomalies: the SKAB pipeline run (valve1) through detection.evaluation.

Every sentence of every narrative may state only numbers that are in its payload (within the rounding it
prints them with), checked here independently of explanations.validation: the payload's numeric fields,
read recursively, and the attribution shares in per cent.
"""
from __future__ import annotations

import math
import re

import pytest

from detection.evaluation import evaluate_skab
from detection.models import AnomalyResult, Fleet, PipelineRun
from detection.services import fleet_delete
from explanations.services import explanation_run_generate

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
SAMPLE = 60


@pytest.fixture(scope="module")
def skab_run(shared_data, django_db_setup, django_db_blocker, tmp_path_factory):
    from django.test import override_settings

    with django_db_blocker.unblock(), override_settings(VIGIL_ARTIFACT_DIR=tmp_path_factory.mktemp("artifacts")):
        result = evaluate_skab(path=shared_data / "skab" / "data" / "valve1", keep=True)
        run = PipelineRun.objects.select_related("fleet").get(pk=result.run_id)
    yield run
    with django_db_blocker.unblock():
        fleet_delete(fleet=Fleet.objects.get(pk=run.fleet_id))


def _numbers(value) -> list[float]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)] if math.isfinite(value) else []
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return []


def _names(payload: dict) -> list[str]:
    """Strings whose digits are names, not stated numbers: device, cohort, labels, timestamp, windows."""
    names = [payload["device"], payload["cohort_label"], payload["fleet"], *payload["device_attributes"].values(),
             *payload["metric_labels"].values(), *payload["metric_labels"]]
    for m in payload["top_metrics"]:
        names += [m["level_label"], m["aspect"], m["feature"]]
    return sorted((n for n in names if n), key=len, reverse=True)


def test_builtin_narratives_of_skab_anomalies_state_only_payload_numbers(skab_run):
    ids = list(AnomalyResult.objects.filter(run=skab_run, label=-1).order_by("pk").values_list("pk", flat=True))
    sample = ids[:: max(1, len(ids) // SAMPLE)][:SAMPLE]
    result = explanation_run_generate(run=skab_run, anomaly_ids=sample)
    assert len(result.explanations) == len(sample) > 40
    checked = 0
    for explanation in result.explanations:
        assert explanation.attribution_method == "tree_shap"
        assert explanation.attributions["additivity"]["ok"] and explanation.attributions["reproduced"]["ok"]
        assert explanation.verdict == "accepted", explanation.validation
        payload = explanation.payload
        allowed = [abs(n) for n in _numbers(payload)]
        allowed += [100 * abs(m["share"]) for m in payload["attribution"]["metrics"]]
        top = payload["top_metrics"][0]
        assert top["label"] in explanation.text  # the top metric is named
        text = explanation.text
        for name in _names(payload):
            text = text.replace(name, " ")
        text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)? UTC", " ", text)
        for sentence in re.split(r"(?<=[.!?])\s+|\n", text):
            for match in NUMBER.finditer(sentence):
                written = match.group(0)
                decimals = len(written.split(".")[1]) if "." in written else 0
                value = abs(float(written))
                assert any(abs(value - a) <= 0.5 * 10 ** -decimals + 1e-9 for a in allowed), (
                    f"{written!r} in {sentence!r} is not a payload number")
                checked += 1
    assert checked > 20 * len(sample)
