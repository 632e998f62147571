"""Scale-out scoring by device shard (detection.sharding): same results as one worker."""
from __future__ import annotations

import pandas as pd
import pytest

from detection import serving
from detection.ingest.loader import ingest_batch
from detection.ingest.synthetic import generate_fleet
from detection.models import Device, Fleet
from detection.services import pipeline_run_create, pipeline_run_execute
from detection.sharding import cohort_shards, fleet_score, fleet_score_sharded, fleet_shards, rows_to_scores


def test_cohort_shards_cover_every_device_once_and_never_split_a_cohort():
    devices = [(i, ("zebra", "tc52") if i < 6 else ("honeywell", "ct40") if i < 9 else ("x", str(i % 3)))
               for i in range(1, 16)]
    shards = cohort_shards(devices, 3)
    assert sorted(d for s in shards for d in s) == list(range(1, 16))
    cohort_of = dict(devices)
    for key in set(cohort_of.values()):
        holders = {i for i, s in enumerate(shards) if any(cohort_of[d] == key for d in s)}
        assert len(holders) == 1, key
    # cohorts of 5, 3, 3, 2 and 2 devices: LPT gives 5 | 3 + 2 | 3 + 2
    assert sorted(len(s) for s in shards) == [5, 5, 5]
    assert cohort_shards(devices, 3) == shards  # deterministic
    assert len(cohort_shards([(1, ("a",)), (2, ("a",))], 4)) == 1
    with pytest.raises(ValueError):
        cohort_shards(devices, 0)


@pytest.mark.django_db
def test_sharded_scoring_equals_one_worker():
    serving.model_cache_clear()
    ingest_batch(batch=generate_fleet(devices=18, days=4, seed=13), fleet_name="shards")
    fleet = Fleet.objects.get(name="shards")
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert run.model_version_id, run.error
    start = pd.Timestamp(Device.objects.filter(fleet=fleet).first().telemetry.order_by("-timestamp")
                         .values_list("timestamp", flat=True).first()) - pd.Timedelta("1D")

    single = fleet_score(fleet=fleet, start=start)
    assert len(single) > 100 and (single["label"] == -1).any()
    shards = fleet_shards(fleet=fleet, n_shards=3)
    assert len(shards) > 1
    merged = fleet_score_sharded(fleet=fleet, n_shards=3, start=start).get()  # tasks run eagerly here
    assert merged["shards"] == len(shards)
    sharded = rows_to_scores(merged["rows"])
    pd.testing.assert_frame_equal(sharded[["device_id", "label", "severity"]],
                                  single[["device_id", "label", "severity"]])
    assert (sharded["timestamp"].to_numpy() == single["timestamp"].to_numpy()).all()
    assert sharded["anomaly_score"].to_numpy() == pytest.approx(single["anomaly_score"].to_numpy(), rel=1e-9)
    assert merged["n_anomalies"] == int((single["label"] == -1).sum())
    serving.model_cache_clear()
