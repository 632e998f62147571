from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _sync_schedules(sender, using="default", **kwargs) -> None:
    """After migrate, create beat entries that are missing (admins' edits to existing ones are kept)."""
    from django.db import DEFAULT_DB_ALIAS

    if using != DEFAULT_DB_ALIAS:
        return
    from .schedules import schedules_sync

    schedules_sync(overwrite=False)


class AlertsConfig(AppConfig):
    name = "alerts"
    verbose_name = "Alerts"

    def ready(self) -> None:
        post_migrate.connect(_sync_schedules, sender=self, dispatch_uid="alerts.sync_schedules")
