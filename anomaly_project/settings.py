"""Vigil settings: one module, driven by environment variables.

Nothing set gives the embedded default: SQLite (WAL), Celery tasks run in-process, an in-memory
channel layer. DATABASE_URL selects the database (sqlite:////abs/path.sqlite3 or postgres://...),
REDIS_URL the Celery broker, result backend, cache and channel layer. `.env.example` lists every
variable.
"""
from __future__ import annotations

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def envstr(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use one of 1/0, true/false, yes/no, on/off)")


def envint(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None


def envfloat(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None


DEBUG = envbool("DJANGO_DEBUG", True)
SECRET_KEY = envstr("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off")
    SECRET_KEY = "vigil-insecure-development-key-change-me"
ALLOWED_HOSTS = [h for h in envstr("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h]
CSRF_TRUSTED_ORIGINS = [o for o in envstr("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

# Where model and baseline artifacts are written (atomically, with a FORMAT_VERSION and checksum).
VIGIL_VAR_DIR = Path(envstr("VIGIL_VAR_DIR", str(BASE_DIR / "var")))
VIGIL_ARTIFACT_DIR = Path(envstr("VIGIL_ARTIFACT_DIR", str(VIGIL_VAR_DIR / "artifacts")))

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_filters",
    "simple_history",
    "django_celery_beat",
    "channels",
    "detection",
    "baselines",
    "alerts",
    "explanations",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "simple_history.middleware.HistoryRequestMiddleware",
]

ROOT_URLCONF = "anomaly_project.urls"
WSGI_APPLICATION = "anomaly_project.wsgi.application"
ASGI_APPLICATION = "anomaly_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    }
]


def _database_from_url(url: str) -> dict:
    import dj_database_url

    try:
        config = dj_database_url.parse(url, conn_max_age=envint("DB_CONN_MAX_AGE", 60))
    except Exception as exc:  # dj_database_url raises several types for a malformed URL
        raise ImproperlyConfigured(f"DATABASE_URL={url!r} cannot be parsed: {exc}") from None
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config["OPTIONS"] = {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
                                             "PRAGMA cache_size=-262144;",  # 256 MiB page cache
                             "transaction_mode": "IMMEDIATE", "timeout": 30}
        # Each SQLite connection starts with a cold 256 MiB page cache and runs the PRAGMAs above, so
        # a connection per request cost /api/v1/detect a quarter of its CPU under gunicorn, which sets
        # DB_CONN_MAX_AGE (docker/gunicorn.conf.py). Daphne keeps the default 0: Django advises
        # against persistent connections under ASGI.
        config["CONN_MAX_AGE"] = envint("DB_CONN_MAX_AGE", 0)
    return config


DATABASE_URL = envstr("DATABASE_URL", "")
if not DATABASE_URL:
    VIGIL_VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES = {
    "default": _database_from_url(DATABASE_URL or f"sqlite:///{VIGIL_VAR_DIR / 'vigil.sqlite3'}")
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("TEST", {})["NAME"] = envstr("DATABASE_TEST_NAME", "test_vigil")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(envstr("VIGIL_STATIC_ROOT", str(VIGIL_VAR_DIR / "staticfiles")))
# WhiteNoise warns on every request until collectstatic has made the folder.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if envbool("VIGIL_MANIFEST_STATIC", not DEBUG)
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

# --- Redis, Celery, Channels -------------------------------------------------------------------
REDIS_URL = envstr("REDIS_URL", "")
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
    CELERY_TASK_ALWAYS_EAGER = envbool("CELERY_TASK_ALWAYS_EAGER", False)
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}
    }
else:
    CELERY_BROKER_URL = "memory://localhost/"  # a host, or kombu warns "No hostname was supplied"
    CELERY_RESULT_BACKEND = "cache+memory://"
    CELERY_TASK_ALWAYS_EAGER = True
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# With acks_late, a task whose worker died is delivered again once the broker's visibility timeout
# passes; it must exceed the longest task (CELERY_TASK_TIME_LIMIT), or a slow run is delivered twice.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": envint("CELERY_VISIBILITY_TIMEOUT", envint("CELERY_TASK_TIME_LIMIT", 3600) + 600)}
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = envint("CELERY_TASK_TIME_LIMIT", 3600)
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {"detection.tasks.run_pipeline_task": {"queue": "ml"},
                      "detection.tasks.score_shard_task": {"queue": "ml"}, "explanations.tasks.*": {"queue": "ml"}}
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = TIME_ZONE

# --- DRF ---------------------------------------------------------------------------------------
# Clients send "Authorization: Token <key>" (tokens: admin, or `manage.py drf_create_token <user>`);
# the web app's session works too. Roles (detection.permissions) decide what each user may do.
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Session first keeps the web app's anonymous answer a 403; /api/v1/ puts Token first (so a 401
        # with a WWW-Authenticate challenge), see detection.api.views.API_AUTHENTICATION.
        "rest_framework.authentication.SessionAuthentication",
        "detection.api.authentication.CachedTokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": envint("VIGIL_API_PAGE_SIZE", 50),
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    # Per user, per token, and per costly endpoint (detection.api.throttling); rates like "1200/min".
    "DEFAULT_THROTTLE_CLASSES": ["detection.api.throttling.UserThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "user": envstr("VIGIL_API_THROTTLE_USER", "1200/min"),
        "token": envstr("VIGIL_API_THROTTLE_TOKEN", "1200/min"),
        "detect": envstr("VIGIL_API_THROTTLE_DETECT", "1200/min"),
        "ingest": envstr("VIGIL_API_THROTTLE_INGEST", "60/min"),
    },
    "EXCEPTION_HANDLER": "detection.api.errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Vigil API",
    "DESCRIPTION": "Anomaly detection for device-fleet telemetry: scoring, runs, results, model versions.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI's assets come from drf-spectacular-sidecar (served by WhiteNoise), never from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Two models have a "verdict" (review feedback, explanation validation); name each enum.
    "ENUM_NAME_OVERRIDES": {"FeedbackVerdictEnum": "detection.choices.Verdict",
                            "SeverityEnum": "detection.choices.Severity",
                            "AlertStatusEnum": "alerts.choices.AlertStatus",
                            "DriftStatusEnum": "alerts.choices.DriftStatus",
                            "HealthStatusEnum": ["ok", "down"]},
}
# Most observations one POST /api/v1/detect/batch may carry.
MAX_BATCH_SIZE = envint("VIGIL_MAX_BATCH_SIZE", 500)
# Seconds an API process trusts a token it has verified (detection.api.authentication); 0 = every request.
VIGIL_API_TOKEN_CACHE_SECONDS = envint("VIGIL_API_TOKEN_CACHE_SECONDS", 10)
# Seconds an API process keeps which model version is a fleet's production one (detection.serving);
# a promotion or rollback made in another process is served within this time.
VIGIL_SERVING_PRODUCTION_CACHE_SECONDS = envfloat("VIGIL_SERVING_PRODUCTION_CACHE_SECONDS", 1.0)
# Most rows (and bytes, for a CSV upload) one POST /api/v1/fleets/{name}/telemetry/ may carry.
VIGIL_MAX_INGEST_ROWS = envint("VIGIL_MAX_INGEST_ROWS", 100_000)
VIGIL_MAX_INGEST_BYTES = envint("VIGIL_MAX_INGEST_BYTES", 20 * 1024 * 1024)
# A JSON ingest body of VIGIL_MAX_INGEST_ROWS rows is larger than Django's 2.5 MB default.
DATA_UPLOAD_MAX_MEMORY_SIZE = envint("DJANGO_DATA_UPLOAD_MAX_MEMORY_SIZE", 20 * 1024 * 1024)

# --- Detection defaults (the pipeline reads these; no literals in the numerical code) -------------
VIGIL_DETECTION = {
    "algorithm": envstr("VIGIL_ALGORITHM", "hybrid"),
    "contamination": envfloat("VIGIL_CONTAMINATION", 0.03),
    "n_estimators": envint("VIGIL_N_ESTIMATORS", 300),
    "random_state": envint("VIGIL_RANDOM_STATE", 42),
    "scale_features": envbool("VIGIL_SCALE_FEATURES", True),
    "min_variance": envfloat("VIGIL_MIN_VARIANCE", 1e-6),
    "min_training_rows": envint("VIGIL_MIN_TRAINING_ROWS", 50),
    "rolling_window": envstr("VIGIL_ROLLING_WINDOW", "12h"),
    "delta_lag": envstr("VIGIL_DELTA_LAG", "1D"),
    "z_level": envstr("VIGIL_Z_LEVEL", "cohort"),
    "baseline_min_rows": envint("VIGIL_BASELINE_MIN_ROWS", 25),
    # A device's baseline MAD is at least this share of its cohort's (baselines.engine).
    "device_mad_floor": envfloat("VIGIL_DEVICE_MAD_FLOOR", 0.1),
    "hybrid_temporal_weight": envfloat("VIGIL_HYBRID_TEMPORAL_WEIGHT", 0.6),
    "hybrid_temporal": envstr("VIGIL_HYBRID_TEMPORAL", "baseline"),
    "top_metrics": envint("VIGIL_TOP_METRICS", 5),
    "n_jobs": envint("VIGIL_N_JOBS", 2),
    # Severity: the top metric's |z| times the impact weight of its domain or cohort value
    # (a fleet's config overrides, e.g. {"power": 2.0}), banded at (medium, high, critical).
    "severity_z": (4.0, 6.0, 10.0),
    "impact_weights": {},
    # "algorithm": "ensemble" fuses these members ("robust" or "rank" normalisation).
    "ensemble_members": ("hybrid", "robust_z", "lof"),
    "ensemble_fusion": envstr("VIGIL_ENSEMBLE_FUSION", "robust"),
}

# --- Explanations: narrative writers. The built-in writer is the default and needs no network; the
# LLM client speaks the OpenAI-compatible chat API (Ollama, vLLM, llama.cpp server, OpenAI).
VIGIL_LLM = {
    "provider": envstr("VIGIL_NARRATIVE_PROVIDER", "builtin"),
    "base_url": envstr("VIGIL_LLM_BASE_URL", ""),
    "model": envstr("VIGIL_LLM_MODEL", ""),
    "api_key": envstr("VIGIL_LLM_API_KEY", ""),
    "timeout": envfloat("VIGIL_LLM_TIMEOUT", 20.0),
    "max_retries": envint("VIGIL_LLM_MAX_RETRIES", 2),
    "backoff": envfloat("VIGIL_LLM_BACKOFF", 0.5),
    "breaker_failures": envint("VIGIL_LLM_BREAKER_FAILURES", 3),
    "breaker_reset_seconds": envfloat("VIGIL_LLM_BREAKER_RESET", 60.0),
    "temperature": envfloat("VIGIL_LLM_TEMPERATURE", 0.2),
    "max_tokens": envint("VIGIL_LLM_MAX_TOKENS", 400),
}
# Push finished explanations to the open anomaly page over the websocket; the panel keeps polling
# while an explanation is pending, so a page whose socket is down still updates.
VIGIL_EXPLANATION_PUSH = envbool("VIGIL_EXPLANATION_PUSH", True)
# Push run progress, finished runs, review feedback and model changes to open fleet pages over the
# websocket (detection.push); the pages keep polling, so a page whose socket is down still updates.
VIGIL_LIVE_PUSH = envbool("VIGIL_LIVE_PUSH", True)

# --- Live stream (detection.ingest.stream) and Prometheus metrics (detection.metrics).
# The stream's Redis defaults to REDIS_URL; keys are <prefix>:<fleet> and <prefix>:<fleet>:dead.
VIGIL_STREAM_REDIS_URL = envstr("VIGIL_STREAM_REDIS_URL", "")
VIGIL_STREAM_PREFIX = envstr("VIGIL_STREAM_PREFIX", "vigil:telemetry")
# When set, /metrics answers only "Authorization: Bearer <token>"; empty leaves it open (as Prometheus expects).
VIGIL_METRICS_TOKEN = envstr("VIGIL_METRICS_TOKEN", "")

# --- Alerts, drift and retraining (alerts app). Durations in minutes unless named otherwise.
VIGIL_ALERTS = {
    "dedup_window_minutes": envint("VIGIL_ALERT_DEDUP_MINUTES", 360),
    "cohort_min_devices": envint("VIGIL_ALERT_COHORT_MIN_DEVICES", 5),
    "fp_suppress_share": envfloat("VIGIL_ALERT_FP_SUPPRESS_SHARE", 0.5),
    "max_attempts": envint("VIGIL_ALERT_MAX_ATTEMPTS", 5),
    "retry_backoff_seconds": envfloat("VIGIL_ALERT_RETRY_BACKOFF", 30.0),
    "webhook_timeout": envfloat("VIGIL_ALERT_WEBHOOK_TIMEOUT", 5.0),
    "email_from": envstr("VIGIL_ALERT_EMAIL_FROM", "vigil@localhost"),
    "base_url": envstr("VIGIL_BASE_URL", "http://localhost:8000"),
    "run_lookback_hours": envint("VIGIL_ALERT_RUN_LOOKBACK_HOURS", 24),
    "hourly_scoring": envbool("VIGIL_HOURLY_SCORING", False),
    "drift_current_hours": envint("VIGIL_DRIFT_CURRENT_HOURS", 24),
    "drift_reference_days": envint("VIGIL_DRIFT_REFERENCE_DAYS", 14),
    "drift": {"psi_drift": envfloat("VIGIL_DRIFT_PSI", 0.25), "ks_drift": envfloat("VIGIL_DRIFT_KS", 0.2)},
    "rate_factor": envfloat("VIGIL_RETRAIN_RATE_FACTOR", 3.0),
    "min_precision": envfloat("VIGIL_RETRAIN_MIN_PRECISION", 0.5),
    "min_feedback": envint("VIGIL_RETRAIN_MIN_FEEDBACK", 20),
    "feedback_days": envint("VIGIL_RETRAIN_FEEDBACK_DAYS", 14),
    "max_model_age_days": envint("VIGIL_RETRAIN_MAX_MODEL_AGE_DAYS", 30),
}
EMAIL_BACKEND = envstr("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend" if DEBUG
                       else "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = envstr("EMAIL_HOST", "localhost")
EMAIL_PORT = envint("EMAIL_PORT", 25)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": envstr("VIGIL_LOG_LEVEL", "INFO")},
    # celery.app.trace logs every task's return value at INFO: in the embedded default (tasks run
    # in-process) that floods the command line, so it is kept for failures; workers log their own.
    "loggers": {"django.db.backends": {"level": "WARNING"}, "daphne": {"level": "WARNING"},
                "celery.app.trace": {"level": envstr("VIGIL_TASK_LOG_LEVEL", "WARNING")}},
}

if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = envbool("DJANGO_SECURE_COOKIES", True)
    CSRF_COOKIE_SECURE = envbool("DJANGO_SECURE_COOKIES", True)
    SECURE_SSL_REDIRECT = envbool("DJANGO_SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = envint("DJANGO_SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
