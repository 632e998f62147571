"""Shared fixtures. Real data lives in ../shared/data and is read from there, never copied."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("VIGIL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# Fixtures through which a test reaches the database (pytest-django's, requested directly or by
# another fixture); a test without them or the django_db mark cannot touch it (pytest-django refuses).
# (django_db_setup: also module-scoped fixtures that unblock the database themselves; django_db_blocker
# cannot tell, since pytest-django's autouse fixtures request it for every test.)
DATABASE_FIXTURES = {"db", "transactional_db", "django_db_reset_sequences", "django_db_serialized_rollback",
                     "django_db_setup", "live_server"}


def pytest_collection_modifyitems(config, items):
    """With VIGIL_TESTS_DATABASE_ONLY=1 (the PostgreSQL pass of .ci/run) only the tests that can touch
    the database run: the others (numerical core, readers, parsers) do not depend on the backend and
    already ran in the SQLite pass."""
    if os.environ.get("VIGIL_TESTS_DATABASE_ONLY") != "1":
        return
    keep, drop = [], []
    for item in items:
        touches = (item.get_closest_marker("django_db") or item.get_closest_marker("integration")
                   or DATABASE_FIXTURES & set(getattr(item, "fixturenames", ())))
        (keep if touches else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def worker_redis_db(base: int) -> int:
    """Redis database `base` (6 or 7) for this test process: make test runs two (pytest-xdist), and a
    test that empties its Redis database must not empty another process's. Worker gwN takes
    base + 2N (gw0: 6 and 7, gw1: 8 and 9, ...; one process: base), so up to 5 workers fit Redis's 16."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    db = base + 2 * worker
    if db > 15:
        raise pytest.UsageError(f"Redis has databases 0-15; worker gw{worker} would need {db}: "
                                "use TEST_WORKERS=5 or fewer")
    return db


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data folder {SHARED_DATA} is missing")
        pytest.skip(f"shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _artifact_dir(settings, tmp_path):
    """Every test writes model and baseline artifacts into its own temporary folder."""
    settings.VIGIL_ARTIFACT_DIR = tmp_path / "artifacts"


# --- Browser tests: Debian's Chromium driven by Playwright, never a downloaded browser -------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    folder = Path(os.environ.get("VIGIL_SCREENSHOT_DIR") or REPO_ROOT / "var" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        # On CI a missing browser is a failure, not a skip (DEVELOPERS.md).
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    # Playwright's expect() waits 5 s by default; on a loaded 2-core CI machine a page's htmx swap or
    # websocket push has taken longer (a slow wait fails the whole landing), so every expectation
    # waits up to 15 s. A passing expectation returns as soon as it holds, so runs are no slower.
    sync_api.expect.set_options(timeout=15_000)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# --- API clients by role (test files of pages define their own, logged-in Django clients) -----------
@pytest.fixture
def viewer(db):
    from factories import api_client, user_with_role

    return api_client(user_with_role("viewer", "viewer", password="pw-123456"))


@pytest.fixture
def reviewer(db):
    from factories import api_client, user_with_role

    return api_client(user_with_role("reviewer", "reviewer", password="pw-123456"))


@pytest.fixture
def approver(db):
    from factories import api_client, user_with_role

    return api_client(user_with_role("approver", "approver", password="pw-123456"))


@pytest.fixture
def outsider(db):
    """Signed in, in no role group."""
    from factories import api_client, user_with_role

    return api_client(user_with_role("outsider", None, password="pw-123456"))


@pytest.fixture(autouse=True)
def _fresh_token_cache():
    """Each test starts with no verified API token, fleet or model remembered by this process
    (detection.api.authentication, detection.serving)."""
    from detection.api.authentication import token_cache_clear
    from detection.serving import model_cache_clear

    token_cache_clear()
    model_cache_clear()
    yield
    token_cache_clear()
    model_cache_clear()
