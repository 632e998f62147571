"""gunicorn settings for Vigil's HTTP server (pages and /api/v1/): `gunicorn -c docker/gunicorn.conf.py
anomaly_project.wsgi:application`. Websockets go to daphne (docker/nginx.conf routes /ws/ there).

Environment: PORT (default 8000), WEB_CONCURRENCY (worker processes, default one per core),
GUNICORN_THREADS (threads per worker, default 1: scoring is CPU-bound, and more threads than cores
only queue inside the GIL), GUNICORN_TIMEOUT (seconds, default 60).
"""
import multiprocessing
import os

# Persistent database connections (one per worker thread), also for the embedded SQLite database,
# whose settings default to a connection per request (as ASGI needs). Read by anomaly_project.settings,
# which gunicorn loads after this file.
os.environ.setdefault("DB_CONN_MAX_AGE", "60")

# An empty variable (a blank line in .env) counts as unset.
bind = f"0.0.0.0:{os.environ.get('PORT') or '8000'}"
workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count())
worker_class = "gthread"  # keep-alive connections; sync workers close every connection
threads = int(os.environ.get("GUNICORN_THREADS") or 1)
keepalive = 30
backlog = 2048
timeout = int(os.environ.get("GUNICORN_TIMEOUT") or 60)
graceful_timeout = 30
accesslog = None
errorlog = "-"


def post_worker_init(worker):
    """Load every fleet's production model into this worker before it takes requests, so the first
    /api/v1/detect a worker answers does not pay for reading the artifacts (seconds for a large forest).
    A fleet without a production model, or whose artifact cannot be read, is skipped: /detect then
    answers it with its own 409/503, as without the warm-up."""
    from detection.models import Fleet
    from detection.serving import ServingError, model_load

    warmed = []
    for fleet in Fleet.objects.all():
        try:
            model_load(fleet=fleet)
            warmed.append(fleet.name)
        except ServingError:
            continue
    worker.log.info("serving cache warmed: %s", ", ".join(warmed) or "no production models")
    # Everything loaded so far (Django, the models' arrays and objects) lives as long as the worker:
    # move it out of the collector's generations, so a full collection does not walk it again and
    # again in the middle of requests (gc.freeze, as Instagram's Django servers do).
    import gc

    gc.collect()
    gc.freeze()
