"""The container files: the compose stack's services, health checks and start order."""
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def test_compose_stack_has_every_service_with_a_health_check():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"web", "worker", "beat", "postgres", "redis"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert "/api/v1/health/live" in " ".join(services["web"]["healthcheck"]["test"])
    assert services["worker"]["command"][:5] == ["celery", "-A", "anomaly_project", "worker", "-Q"]
    assert set(services["worker"]["command"][5].split(",")) == {"default", "ml"}
    assert services["beat"]["command"][:4] == ["celery", "-A", "anomaly_project", "beat"]


def test_app_services_wait_for_healthy_dependencies():
    services = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    for name in ("web", "worker", "beat"):
        depends = services[name]["depends_on"]
        for dependency in ("postgres", "redis"):
            assert depends[dependency] == {"condition": "service_healthy"}, (name, dependency)
        assert services[name]["env_file"] == "../.env"
        assert services[name]["environment"]["REDIS_URL"].startswith("redis://redis")


def test_dockerfile_is_multi_stage_non_root_with_a_health_check():
    text = (DOCKER / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2 and "AS builder" in text
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "\nUSER vigil" in text and "HEALTHCHECK" in text and "/api/v1/health/live" in text
    assert "daphne" in text
    entrypoint = (DOCKER / "entrypoint.sh").read_text()
    assert "migrate --noinput" in entrypoint and "collectstatic --noinput" in entrypoint
