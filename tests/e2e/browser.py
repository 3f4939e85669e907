"""Headless Chromium driven by Selenium, and a page object for the admin page.

The browser is Debian's ``chromium`` with its ``chromium-driver``, installed from the
machine's package sources by ``scripts/install-browser.sh`` (``scripts/test.sh`` runs
it); nothing is downloaded at test time. When either is missing the test is skipped with
the reason, or fails under ``CI=true`` (like every missing service, see
``tests/services.py``).

Selenium is synchronous: tests call these helpers through ``trio.to_thread.run_sync`` so
the node, served by the same trio loop, keeps running while the browser waits.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.services import in_ci

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1360,1240",
)
#: Seconds any wait in the browser may take.
BROWSER_WAIT_S = 15.0
#: How often WebDriverWait re-checks its condition.
POLL_S = 0.05


def require_browser() -> None:
    """Skip (or fail under ``CI=true``) unless Selenium, Chromium and its driver exist."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (path.exists() or shutil.which(path.name)):
            missing.append(str(path))
    if not missing:
        return
    reason = f"{', '.join(missing)} missing; run scripts/install-browser.sh"
    if in_ci():
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def start_browser(profile_dir: Path) -> WebDriver:
    """A headless Chromium with a fresh profile in ``profile_dir`` (blocking)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = CHROMEDRIVER if CHROMEDRIVER.exists() else shutil.which("chromedriver")
    service = Service(executable_path=str(driver_path))
    return webdriver.Chrome(options=options, service=service)


class AdminPage:
    """What a person does on ``/admin``, as blocking Selenium calls."""

    def __init__(self, driver: WebDriver, base_url: str, *, poll_ms: int = 300) -> None:
        self.driver = driver
        self.url = f"{base_url}/admin?poll={poll_ms}"

    def _wait(self, condition: Any, message: str) -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, BROWSER_WAIT_S, poll_frequency=POLL_S).until(
            condition, message
        )

    def _by_id(self, element_id: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def open(self) -> None:
        self.driver.get(self.url)
        self._wait(lambda d: self._by_id("login-form").is_displayed(), "login form shown")

    def login(self, email: str, password: str) -> None:
        self._by_id("login-email").clear()
        self._by_id("login-email").send_keys(email)
        self._by_id("login-password").send_keys(password)
        self._by_id("login-submit").click()

    def wait_dashboard(self) -> None:
        self._wait(lambda d: self._by_id("dashboard").is_displayed(), "dashboard shown")

    def wait_login_error(self) -> str:
        self._wait(lambda d: self._by_id("login-error").text, "sign-in error shown")
        return str(self._by_id("login-error").text)

    def wait_live(self) -> None:
        """The page's WebSocket is open and subscribed."""
        self._wait(
            lambda d: self._by_id("ws-state").get_attribute("data-state") == "live",
            "WebSocket live",
        )

    def feed_titles(self) -> list[str]:
        from selenium.webdriver.common.by import By

        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, "#feed .title")]

    def wait_feed_contains(self, title: str) -> None:
        self._wait(lambda d: title in self.feed_titles(), f"{title!r} in the live feed")

    def publish(self, channel: str, title: str, body: str, event: str = "") -> None:
        for element_id, value in (
            ("pub-channel", channel),
            ("pub-title", title),
            ("pub-body", body),
            ("pub-event", event),
        ):
            field = self._by_id(element_id)
            field.clear()
            if value:
                field.send_keys(value)
        self._by_id("pub-submit").click()

    def wait_publish_result(self) -> tuple[str, str]:
        """``(data-status, text)`` of the publish form's result line."""
        self._wait(lambda d: self._by_id("publish-result").get_attribute("data-status"), "result")
        result = self._by_id("publish-result")
        return str(result.get_attribute("data-status")), str(result.text)

    def wait_channel_subscribers(self, channel: str, count: int) -> None:
        from selenium.webdriver.common.by import By

        def shown(driver: Any) -> bool:
            rows = driver.find_elements(By.CSS_SELECTOR, f'#channels tr[data-channel="{channel}"]')
            return bool(rows) and rows[0].find_elements(By.TAG_NAME, "td")[1].text == str(count)

        self._wait(shown, f"channel {channel} with {count} subscriber(s)")

    def wait_chart_samples(self, count: int) -> None:
        def drawn(driver: Any) -> bool:
            samples = self._by_id("chart-rate").get_attribute("data-samples")
            return int(samples or 0) >= count

        self._wait(drawn, f"charts with {count} samples")

    def wait_webhook_delivery(self, event: str) -> str:
        """The text of the deliveries table once a row for ``event`` is shown."""
        self._wait(lambda d: event in self._by_id("webhooks").text, f"delivery of {event}")
        return str(self._by_id("webhooks").text)

    def stat(self, name: str) -> str:
        return str(self._by_id(f"stat-{name}").text)

    def logout(self) -> None:
        self._by_id("logout").click()
        self._wait(lambda d: self._by_id("login-form").is_displayed(), "signed out")

    def severe_console_messages(self) -> list[str]:
        """Errors the page logged (script errors, CSP violations, failed loads)."""
        return [
            entry["message"]
            for entry in self.driver.get_log("browser")
            if entry.get("level") == "SEVERE"
        ]
