"""The one Celery application and the one beat schedule.

With REDIS_URL unset, tasks run eagerly in-process (CELERY_TASK_ALWAYS_EAGER in settings), so the
embedded default needs no broker. With REDIS_URL set, `celery -A anomaly_project worker -Q default,ml`
consumes them.
"""
import os

from celery import Celery
from celery.schedules import crontab

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")

app = Celery("anomaly_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# All periodic tasks are defined here and nowhere else. `manage.py sync_schedules` (and every migrate)
# copies them into django-celery-beat's PeriodicTask table, where admins can pause or re-time them
# (DatabaseScheduler); times are UTC (CELERY_TIMEZONE).
app.conf.beat_schedule = {
    "hourly-scoring": {
        "task": "alerts.tasks.score_fleets_task",
        "schedule": crontab(minute=5),
        "options": {"queue": "default"},
    },
    "daily-drift-check": {
        "task": "alerts.tasks.drift_check_task",
        "schedule": crontab(hour=2, minute=15),
        "options": {"queue": "ml"},
    },
    "nightly-retraining": {
        "task": "alerts.tasks.retrain_check_task",
        "schedule": crontab(hour=3, minute=0),
        "options": {"queue": "default"},
    },
    "alert-digests": {
        "task": "alerts.tasks.send_digests_task",
        "schedule": crontab(minute="*/30"),
        "options": {"queue": "default"},
    },
    "feedback-proposals": {
        "task": "baselines.tasks.proposals_suggest_all_task",
        "schedule": crontab(hour="*/6", minute=40),
        "options": {"queue": "ml"},
    },
}
