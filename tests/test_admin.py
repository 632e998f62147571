"""Every model is in the admin; list, change and history pages render; the demo user command works."""
from __future__ import annotations

import pytest
from django.contrib import admin
from django.core.management import call_command
from django.urls import reverse

from baselines.models import BaselineStatistic, BaselineVersion
from detection.models import (
    AnomalyResult,
    Device,
    Fleet,
    GroundTruthLabel,
    ModelVersion,
    PipelineRun,
    Telemetry,
)
from tests.factories import T0, AnomalyResultFactory

pytestmark = pytest.mark.django_db

MODELS = [Fleet, Device, Telemetry, GroundTruthLabel, PipelineRun, ModelVersion, AnomalyResult,
          BaselineVersion, BaselineStatistic]


@pytest.fixture
def objects():
    result = AnomalyResultFactory()
    device, fleet = result.device, result.fleet
    return {
        Fleet: fleet, Device: device, PipelineRun: result.run, ModelVersion: result.model_version,
        AnomalyResult: result, BaselineVersion: result.baseline_version,
        Telemetry: Telemetry.objects.create(fleet=fleet, device=device, timestamp=T0, values={"cpu_temp": 41}),
        GroundTruthLabel: GroundTruthLabel.objects.create(fleet=fleet, device=device, start=T0, end=T0),
        BaselineStatistic: BaselineStatistic.objects.create(
            version=result.baseline_version, level="global", group_key="*", feature="cpu_temp", median=40, mad=2
        ),
    }


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_admin_pages_render(admin_client, objects, model):
    assert model in admin.site._registry
    opts = model._meta
    obj = objects[model]
    assert admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")).status_code == 200
    assert admin_client.get(
        reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    ).status_code == 200
    if hasattr(model, "history"):
        assert admin_client.get(
            reverse(f"admin:{opts.app_label}_{opts.model_name}_history", args=[obj.pk])
        ).status_code == 200


def test_create_demo_user_is_idempotent(django_user_model, capsys):
    call_command("create_demo_user")
    call_command("create_demo_user", "--password", "changed")
    user = django_user_model.objects.get(username="demo")
    assert user.is_superuser and user.is_staff and user.check_password("changed")
    assert django_user_model.objects.filter(username="demo").count() == 1
    assert "Log in at /accounts/login/ as demo / changed" in capsys.readouterr().out


def test_create_demo_user_with_another_name(django_user_model):
    call_command("create_demo_user", "--username", "ops", "--password", "s3cret")
    assert django_user_model.objects.get(username="ops").check_password("s3cret")
