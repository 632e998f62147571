"""factory_boy factories for the detection and baseline models."""
from __future__ import annotations

import datetime as dt

import factory
from django.utils import timezone

from baselines.models import BaselineVersion
from detection.choices import Label, RunStage, RunStatus, Severity
from detection.models import AnomalyResult, Device, Fleet, ModelVersion, PipelineRun

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)


class FleetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Fleet
        django_get_or_create = ["name"]

    name = factory.Sequence(lambda n: f"fleet-{n}")
    metric_schema = [
        {"name": "battery_level", "unit": "%", "domain": "battery"},
        {"name": "cpu_temp", "unit": "C", "domain": "thermal"},
    ]
    cohort_columns = ["manufacturer", "model", "os_version"]


class DeviceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Device

    fleet = factory.SubFactory(FleetFactory)
    external_id = factory.Sequence(lambda n: f"dev-{n:04d}")
    manufacturer = "Zebra"
    model = "TC52"
    os_version = "11"


class BaselineVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = BaselineVersion

    fleet = factory.SubFactory(FleetFactory)
    number = factory.Sequence(lambda n: n + 1)
    levels = ["global", "cohort", "device"]


class ModelVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelVersion

    fleet = factory.SubFactory(FleetFactory)
    version = factory.Sequence(lambda n: n + 1)
    algorithm = "hybrid"
    baseline_version = factory.SubFactory(BaselineVersionFactory, fleet=factory.SelfAttribute("..fleet"))


class PipelineRunFactory(factory.django.DjangoModelFactory):
    """A finished, successful run; pass status=RunStatus.RUNNING (and stage) for one in flight."""

    class Meta:
        model = PipelineRun

    fleet = factory.SubFactory(FleetFactory)
    status = RunStatus.SUCCEEDED
    stage = RunStage.DONE
    stage_timings = {"ingest": 0.8, "features": 2.4, "baselines": 1.1, "train": 12.5, "score": 3.2,
                     "persist": 0.9}
    row_counts = {"ingest": 20160, "features": 20160, "score": 20160, "persist": 20160}
    started_at = factory.LazyFunction(lambda: timezone.now() - dt.timedelta(seconds=21))
    finished_at = factory.LazyFunction(timezone.now)
    n_scored = 20160
    threshold = 0.62


class AnomalyResultFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AnomalyResult

    run = factory.SubFactory(PipelineRunFactory)
    fleet = factory.SelfAttribute("run.fleet")
    device = factory.SubFactory(DeviceFactory, fleet=factory.SelfAttribute("..fleet"))
    timestamp = factory.Sequence(lambda n: T0 + dt.timedelta(minutes=15 * n))
    anomaly_score = factory.Sequence(lambda n: 0.7 + (n % 30) / 100)
    label = Label.ANOMALY
    threshold = 0.62
    severity = Severity.HIGH
    model_version = factory.SubFactory(ModelVersionFactory, fleet=factory.SelfAttribute("..fleet"))
    baseline_version = factory.SelfAttribute("model_version.baseline_version")
    top_metrics = [
        {"metric": "battery_level", "value": 12.0, "typical": 78.0, "z": -6.1},
        {"metric": "cpu_temp", "value": 71.5, "typical": 44.0, "z": 4.8},
        {"metric": "wifi_rssi", "value": -88.0, "typical": -60.0, "z": -3.2},
        {"metric": "storage_free", "value": 0.4, "typical": 5.1, "z": -2.1},
    ]


def user_with_role(username: str, role: str | None, **fields):
    """A user in the role's group (viewer, reviewer, approver, admin), or in none for role=None."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    user = get_user_model().objects.create_user(username, **fields)
    if role:
        user.groups.add(Group.objects.get_or_create(name=role)[0])
    return user


def api_client(user=None):
    """A DRF APIClient authenticated as `user` (force_authenticate); anonymous for None."""
    from rest_framework.test import APIClient

    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client
