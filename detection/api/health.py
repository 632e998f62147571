"""Dependency checks behind /api/v1/health: each returns {"status": "ok"|"down", ...} and never raises."""
from __future__ import annotations

import time
import uuid
from importlib import metadata
from pathlib import Path

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

CHECK_TIMEOUT = 2.0  # seconds per dependency


def _timed(fn) -> dict:
    started = time.perf_counter()
    try:
        result = fn() or {}
        result = {"status": "ok", **result}
    except Exception as exc:  # a health check reports a failure, it does not raise it
        result = {"status": "down", "error": f"{type(exc).__name__}: {exc}"}
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return result


def check_database() -> dict:
    def ping():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"vendor": connection.vendor}
    return _timed(ping)


def check_broker() -> dict:
    """The Celery broker answers (REDIS_URL set), or tasks run in-process (the embedded default)."""
    if not settings.REDIS_URL:
        return {"status": "ok", "mode": "in-process", "latency_ms": 0.0}

    def ping():
        from anomaly_project.celery import app

        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT)
        return {"mode": "redis"}
    return _timed(ping)


def check_channel_layer() -> dict:
    """A message sent on the channel layer comes back."""
    def round_trip():
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            raise RuntimeError("no channel layer is configured")

        async def go():
            import asyncio

            channel = await layer.new_channel("health.")
            token = uuid.uuid4().hex
            await layer.send(channel, {"type": "health.ping", "token": token})
            message = await asyncio.wait_for(layer.receive(channel), CHECK_TIMEOUT)
            if message.get("token") != token:
                raise RuntimeError("the channel layer returned another message")
        async_to_sync(go)()
        return {"backend": type(layer).__name__}
    return _timed(round_trip)


def check_models() -> dict:
    """Each fleet's production model version, and whether this process has it loaded."""
    def models():
        from detection.choices import ModelStatus
        from detection.models import ModelVersion
        from detection.serving import model_cache_info

        loaded = model_cache_info()
        fleets = {}
        for mv in ModelVersion.objects.filter(status=ModelStatus.PRODUCTION).select_related("fleet"):
            held = loaded.get(mv.fleet_id)
            fleets[mv.fleet.name] = {"model_version": mv.version, "algorithm": mv.algorithm,
                                     "loaded": bool(held and held["model_version_id"] == mv.pk)}
        return {"fleets": fleets}
    return _timed(models)


def migrations_pending() -> int:
    executor = MigrationExecutor(connection)
    return len(executor.migration_plan(executor.loader.graph.leaf_nodes()))


def app_version() -> str:
    try:
        return metadata.version("vigil")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(settings.BASE_DIR) / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"
