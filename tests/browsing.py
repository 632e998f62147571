"""Shared steps of the browser tests (headless Chromium through Playwright)."""
from __future__ import annotations


def signed_in(browser, live_server, username: str, password: str, next_path: str = "/"):
    """A 1280 x 900 page signed in as username through the login form, at next_path (URL-encoded if
    it holds a query string); returns (page, errors), errors collecting every uncaught page error."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
    page.goto(f"{live_server.url}/accounts/login/?next={next_path}")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    return page, errors
