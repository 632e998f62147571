"""A new user who skips `migrate` gets a clear CommandError from the first commands, not a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args", [
    ["run_pipeline", "--fleet", "demo"],
    ["generate_fleet", "--fleet", "demo", "--devices", "2", "--days", "2", "--seed", "1"],
    ["evaluate", "skab", "{data}/skab", "--detector", "iqr"],
])
def test_command_on_an_unmigrated_database_says_to_migrate(tmp_path, shared_data, args):
    args = [a.replace("{data}", str(shared_data)) for a in args]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["VIGIL_VAR_DIR"] = str(tmp_path)  # a fresh, empty SQLite file
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "unapplied migration" in done.stderr and "manage.py migrate" in done.stderr
    assert "Traceback" not in done.stderr
