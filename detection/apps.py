from django.apps import AppConfig


class DetectionConfig(AppConfig):
    name = "detection"
    verbose_name = "Detection"

    def ready(self) -> None:
        from . import metrics  # noqa: F401  registers the Celery task-duration and failure signal handlers
