"""The one Celery application and the one beat schedule.

With REDIS_URL unset, tasks run eagerly in-process (CELERY_TASK_ALWAYS_EAGER in settings), so the
embedded default needs no broker. With REDIS_URL set, `celery -A anomaly_project worker -Q default,ml`
consumes them.
"""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")

app = Celery("anomaly_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# All periodic tasks are defined here and nowhere else.
app.conf.beat_schedule = {}
