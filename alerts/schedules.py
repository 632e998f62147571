"""Copy the one beat schedule (anomaly_project.celery.app.conf.beat_schedule) into django-celery-beat's
PeriodicTask table, which the DatabaseScheduler reads and admins edit.

Uses django-celery-beat's own ModelEntry.from_entry (what DatabaseScheduler does at start-up), so a
crontab or interval becomes the same CrontabSchedule/IntervalSchedule row beat would make.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MANAGED_MARK = "[beat_schedule]"


@dataclass
class SyncResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)


def schedules_sync(*, overwrite: bool = True, schedule: dict | None = None) -> SyncResult:
    """Make PeriodicTask rows match the beat schedule.

    overwrite=True (the sync_schedules command): every entry is written as the dict says (task, schedule,
    args, options) -- the dict is the source of truth -- while an admin's enabled/disabled choice is kept.
    overwrite=False (after migrate): only missing entries are created, so admins' edits survive deploys.
    Entries this function made earlier that left the dict are disabled, never deleted (their run history
    stays). Raises ValueError naming an entry whose schedule django-celery-beat cannot store.
    """
    from django.db import transaction
    from django_celery_beat.models import PeriodicTask
    from django_celery_beat.schedulers import ModelEntry

    from anomaly_project.celery import app

    schedule = app.conf.beat_schedule if schedule is None else schedule
    result = SyncResult()
    with transaction.atomic():
        existing = {t.name: t for t in PeriodicTask.objects.all()}
        for name, entry in schedule.items():
            if name in existing and not overwrite:
                result.kept.append(name)
                continue
            enabled = existing[name].enabled if name in existing else True
            try:
                model = ModelEntry.from_entry(name, app=app, **entry).model
            except (TypeError, ValueError) as exc:
                raise ValueError(f"beat_schedule entry {name!r} cannot be stored: {exc}") from None
            description = f"{MANAGED_MARK} defined in anomaly_project/celery.py"
            if (model.enabled, model.description) != (enabled, description):
                model.enabled, model.description = enabled, description
                model.save(update_fields=["enabled", "description"])
            (result.updated if name in existing else result.created).append(name)
        for name, task in existing.items():
            if name not in schedule and task.description.startswith(MANAGED_MARK) and task.enabled:
                task.enabled = False
                task.save(update_fields=["enabled"])
                result.disabled.append(name)
    return result
