"""Settings: env-driven, typed, and deployable."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _manage(*args, env_extra: dict, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_URL", "REDIS_URL"))}
    env.update({"VIGIL_VAR_DIR": str(tmp_path), **env_extra})
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_check_deploy_is_clean_with_the_production_environment(tmp_path):
    result = _manage("check", "--deploy", "--fail-level", "WARNING", tmp_path=tmp_path, env_extra={
        "DJANGO_DEBUG": "false", "DJANGO_SECRET_KEY": "x" * 64 + "-production-secret-0123456789",
        "DJANGO_ALLOWED_HOSTS": "vigil.example.com"})
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize("env, message", [
    ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG='maybe' is not a boolean"),
    ({"VIGIL_N_ESTIMATORS": "many"}, "VIGIL_N_ESTIMATORS='many' is not an integer"),
    ({"DJANGO_DEBUG": "false"}, "DJANGO_SECRET_KEY must be set"),
    ({"DATABASE_URL": "nosuchdb://x"}, "DATABASE_URL='nosuchdb://x' cannot be parsed"),
])
def test_a_bad_setting_is_refused_with_its_name(env, message, tmp_path):
    result = _manage("check", tmp_path=tmp_path, env_extra=env)
    assert result.returncode != 0
    assert message in result.stderr
