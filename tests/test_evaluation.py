"""SKAB evaluation: the metric arithmetic by hand, and the pipeline on the real valve1 files."""
import json

import numpy as np
import pandas as pd
import pytest
from django.core.management import CommandError, call_command

from detection.ml.evaluation import binary_metrics, in_windows
from detection.models import Fleet


def test_binary_metrics_by_hand():
    m = binary_metrics(np.array([1, 1, 1, 0, 0, 0, 0, 0], bool), np.array([1, 1, 0, 1, 0, 0, 0, 0], bool))
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 1, 4)
    assert m.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m.far == pytest.approx(20.0) and m.mar == pytest.approx(100 / 3)


def test_flagging_every_row_gets_high_f1_but_full_far():
    truth = np.r_[np.ones(35, bool), np.zeros(65, bool)]
    m = binary_metrics(truth, np.ones(100, bool))
    assert m.f1 == pytest.approx(0.5185, abs=1e-3) and m.far == 100.0


def test_in_windows_is_inclusive_and_per_device():
    ts = pd.date_range("2026-01-01", periods=5, freq="1h", tz="UTC")
    rows = pd.DataFrame({"device_id": [1] * 5 + [2] * 5, "timestamp": list(ts) * 2})
    windows = pd.DataFrame({"device_id": [1], "start": [ts[1]], "end": [ts[3]]})
    assert in_windows(rows, windows).tolist() == [False, True, True, True, False] + [False] * 5


@pytest.mark.slow
@pytest.mark.django_db
def test_skab_valve1_meets_measured_floors(shared_data, tmp_path, capsys):
    out = tmp_path / "skab.json"
    preds = tmp_path / "preds"
    call_command("evaluate", "skab", str(shared_data / "skab" / "data" / "valve1"), "--json", str(out),
                 "--predictions-dir", str(preds))
    result = json.loads(out.read_text())
    # Measured on 2026-11-21: F1 0.462, FAR 15.3 %, MAR 66.0 % (hybrid detector, device baselines).
    assert result["f1"] >= 0.42
    assert result["far_pct"] <= 18.0
    assert result["files"] == 16 and result["scored_rows"] == sum(
        len(pd.read_csv(f, sep=";")) - 400 for f in (shared_data / "skab" / "data" / "valve1").glob("*.csv"))
    written = sorted(preds.glob("*.csv"))
    assert len(written) == 16
    first = pd.read_csv(written[0])
    assert list(first.columns) == ["datetime", "anomaly"] and set(first["anomaly"]) <= {0, 1}
    assert "pooled" in capsys.readouterr().out
    assert not Fleet.objects.exists()  # the scratch fleet is removed


@pytest.mark.django_db
def test_evaluate_refuses_a_folder_without_skab_files(tmp_path):
    with pytest.raises(CommandError):
        call_command("evaluate", "skab", str(tmp_path))
