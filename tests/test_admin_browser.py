"""The operator's page in a real headless Chromium, against a real ``outbox api`` process.

Run with ``./run browser`` (``pytest -m browser``). Chromium and its driver come from the
system (Debian: ``apt-get install chromium chromium-driver``; or set ``CHROMIUM`` and
``CHROMEDRIVER``); nothing is downloaded. Without them the tests are skipped, except in
CI (``CI`` or ``OUTBOX_REQUIRE_BROWSER`` set), where that is a failure.

``ADMIN_SCREENSHOT=docs/admin-overview.png ./run browser`` also writes the overview, at
desktop width with the seeded data, to that file (the README's picture).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from outbox.dispatcher.db import asyncpg_dsn
from tests.api_process import Api, api
from tests.audit_seed import SENDER

pytestmark = pytest.mark.browser

TOKEN = "browser-admin-token-0123456789"
HOSTILE = "<script>alert('x')</script>\"'><img src=x onerror=alert(1)>\u202egnp.exe"


# --- The browser ----------------------------------------------------------------------------


def _find(variable: str, *names: str) -> str | None:
    """The program named by ``variable``, else the first of ``names`` on PATH."""
    if os.environ.get(variable):
        return shutil.which(os.environ[variable])  # None unless it exists and runs
    return next((found for name in names if (found := shutil.which(name))), None)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") or os.environ.get("OUTBOX_REQUIRE_BROWSER"):
        pytest.fail(f"browser tests are required here, but {reason}")
    pytest.skip(reason)


@dataclass
class Browser:
    """A Chromium under WebDriver, with what its pages logged."""

    driver: Any
    console: list[dict[str, Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def collect_logs(self) -> None:
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])

    def forget_logs(self) -> None:
        """Start the record afresh (for the next test)."""
        self.collect_logs()
        self.console.clear()
        self.requests.clear()

    def viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = _find("CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    chromedriver = _find("CHROMEDRIVER", "chromedriver")
    if chromium is None or chromedriver is None:
        _unavailable(
            "no Chromium or chromedriver found (apt-get install chromium chromium-driver, "
            "or set CHROMIUM and CHROMEDRIVER)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (./run installs the dev extras)")
    assert chromium is not None and chromedriver is not None
    profile = tempfile.mkdtemp(prefix="outbox-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # containers and CI run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        # The browser's own traffic (updates, sync, safe browsing) stays off, and any
        # host other than 127.0.0.1 does not resolve: the page cannot reach out.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # An explicit driver: Selenium Manager is never asked to download one.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield Browser(driver)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --- Seeded data and a live dispatcher's heartbeat ------------------------------------------


async def _run_sql(url: str, statements: list[tuple[str, tuple[object, ...]]]) -> list[Any]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return [await conn.fetch(sql, *args) for sql, args in statements]
    finally:
        await conn.close()


def sql(url: str, statement: str, *args: object) -> list[asyncpg.Record]:
    records: list[asyncpg.Record] = asyncio.run(_run_sql(url, [(statement, args)]))[0]
    return records


_SEED = [
    # Two dispatchers; mail-2 could not reach its SMTP server a while ago, now fine.
    """INSERT INTO dispatchers (name, hostname, pid, started_at, last_beat_at) VALUES
       ('mail-1', 'app-1', 4211, now() - interval '3 hours 12 minutes', now()),
       ('mail-2', 'app-2', 3907, now() - interval '47 minutes', now())""",
    # An hour of welcome mail sent, 10 to 40 a minute, each with its attempt.
    f"""WITH minutes AS (
           SELECT m, (22 + 10 * sin(m / 6.0) + 6 * sin(m / 2.3))::int AS n
           FROM generate_series(0, 59) m
       ),
       sent AS (
           SELECT row_number() OVER () AS g,
                  least(now() - interval '1 second', date_trunc('minute', now())
                        - make_interval(mins => m) + (k * 59.0 / n) * interval '1 second') AS t
           FROM minutes, generate_series(1, n) k
       )
       INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject, body_text,
                           status, attempts, next_attempt_at, created_at, updated_at, sent_at,
                           recipient_domain, recipient_key)
       SELECT format('<seed.%s@example.org>', g), '{SENDER}', format('user%s@example.com', g),
              format('User %s', g), 'Welcome to Outbox', 'Hello!', 'sent', 1,
              t - interval '2 seconds', t - interval '2 seconds', t, t,
              'example.com', format('user%s@example.com', g)
       FROM sent""",
    """INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at,
                                    outcome, smtp_code, smtp_reply, smtp_stage)
       SELECT id, 1, CASE WHEN id % 3 = 0 THEN 'mail-2' ELSE 'mail-1' END,
              sent_at - interval '180 milliseconds', sent_at, 'sent', 250,
              '2.0.0 Ok: queued as ' || upper(to_hex(id * 7919)), 'end_of_data'
       FROM outbox WHERE status = 'sent'""",
]


@dataclass
class Seeded:
    failed: int
    pending: int
    deferred: int
    hostile: int


def _add(url: str, recipient: str, name: str, subject: str) -> int:
    from email.headerregistry import Address

    from outbox.dispatcher.outbox import Mail, enqueue

    async def run() -> int:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            local, _, domain = recipient.partition("@")
            mail = Mail(
                recipient=Address(name, local, domain),
                subject=subject,
                body_text=f"Hello {name},\n\nwelcome aboard.\n",
                body_html=f"<p>Hello {name},</p><p>welcome aboard.</p>",
            )
            async with conn.transaction():
                return (await enqueue(conn, mail, sender=SENDER)).id
        finally:
            await conn.close()

    return asyncio.run(run())


def seed(url: str) -> Seeded:
    """What an operator might find on an ordinary afternoon, plus one hostile row."""
    for statement in _SEED:
        sql(url, statement)
    people = [
        ("grace@navy.example", "Grace Hopper"),
        ("ada@analytical.example", "Ada Lovelace"),
        ("linus@kernel.example", "Linus Torvalds"),
        ("margaret@apollo.example", "Margaret Hamilton"),
        ("edsger@eindhoven.example", "Edsger Dijkstra"),
    ]
    ids = [_add(url, r, n, "Welcome to Outbox") for r, n in people]
    failed, deferred, sending_1, sending_2, pending = ids
    sql(
        url,
        """UPDATE outbox SET status = 'failed', attempts = 1, last_smtp_code = 550,
                  last_error = '5.1.1 <grace@navy.example>: Recipient address rejected: '
                               || 'User unknown in virtual mailbox table'
           WHERE id = $1""",
        failed,
    )
    sql(
        url,
        """INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at,
                                        finished_at, outcome, smtp_code, smtp_reply, smtp_stage)
           VALUES ($1, 1, 'mail-1', now() - interval '4 minutes 1 second',
                   now() - interval '4 minutes', 'failed', 550,
                   '5.1.1 <grace@navy.example>: Recipient address rejected: User unknown '
                   || 'in virtual mailbox table', 'rcpt')""",
        failed,
    )
    sql(
        url,
        """UPDATE outbox SET attempts = 2, next_attempt_at = now() + interval '6 minutes',
                  last_smtp_code = 451, last_error = '4.7.1 Greylisted, try again later'
           WHERE id = $1""",
        deferred,
    )
    for attempt, ago in ((1, timedelta(minutes=9)), (2, timedelta(minutes=3))):
        sql(
            url,
            """INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at,
                                            finished_at, outcome, smtp_code, smtp_reply,
                                            smtp_stage)
               VALUES ($1, $2, 'mail-2', now() - $3::interval - interval '1 second',
                       now() - $3::interval, 'deferred', 451,
                       '4.7.1 Greylisted, try again later', 'rcpt')""",
            deferred,
            attempt,
            ago,
        )
    for outbox_id, owner in ((sending_1, "mail-1"), (sending_2, "mail-2")):
        sql(
            url,
            """UPDATE outbox SET status = 'sending', attempts = 1, lease_owner = $2,
                      lease_token = gen_random_uuid(), leased_at = now(),
                      lease_expires_at = now() + interval '2 minutes' WHERE id = $1""",
            outbox_id,
            owner,
        )
    hostile = _add(url, "mallory@evil.example", "Mallory", "Your invoice")
    sql(
        url,
        """UPDATE outbox SET status = 'failed', attempts = 1, recipient_name = $2,
                  subject = $2, last_error = $2, last_smtp_code = 554 WHERE id = $1""",
        hostile,
        HOSTILE,
    )
    sql(
        url,
        """INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at,
                                        finished_at, outcome, smtp_code, smtp_reply, smtp_stage)
           VALUES ($1, 1, 'mail-1', now() - interval '2 seconds', now() - interval '1 second',
                   'failed', 554, $2, 'end_of_data')""",
        hostile,
        HOSTILE,
    )
    return Seeded(failed=failed, pending=pending, deferred=deferred, hostile=hostile)


@pytest.fixture
def heartbeat(database_url: str) -> Iterator[None]:
    """Keep the seeded dispatchers alive (a heartbeat each second) during the test."""
    stop = threading.Event()

    async def beat() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            while not stop.is_set():
                await conn.execute(
                    "UPDATE dispatchers SET last_beat_at = now() WHERE name LIKE 'mail-%'"
                )
                await asyncio.sleep(1)
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(beat(),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@pytest.fixture
def running(database_url: str, heartbeat: None, browser: Browser) -> Iterator[tuple[Api, Seeded]]:
    """``outbox api`` with ADMIN_TOKEN on a seeded database, and the browser's record of
    console messages and requests started afresh."""
    seeded = seed(database_url)
    with api(database_url, ADMIN_TOKEN=TOKEN) as process:
        browser.driver.delete_all_cookies()
        browser.forget_logs()
        yield process, seeded


# --- Helpers on pages -----------------------------------------------------------------------


def _wait(browser: Browser, condition: Any, timeout: float = 10) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page's own refresh may replace an element between finding and reading it.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    wait = WebDriverWait(browser.driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored)
    return wait.until(condition)


def _css(browser: Browser, selector: str) -> Any:
    """The element, once it is there: a click that submits a form returns before the
    next page has loaded."""
    from selenium.webdriver.common.by import By

    return _wait(browser, lambda driver: driver.find_element(By.CSS_SELECTOR, selector))


def _all(browser: Browser, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    found: list[Any] = browser.driver.find_elements(By.CSS_SELECTOR, selector)
    return found


def _button(browser: Browser, label: str) -> Any:
    from selenium.webdriver.common.by import By

    return browser.driver.find_element(By.XPATH, f"//main//button[normalize-space()='{label}']")


def _submit(browser: Browser, button: Any) -> None:
    """Click a form's button and wait for the page the POST redirects to."""
    from selenium.webdriver.support import expected_conditions

    page = _css(browser, "html")
    button.click()
    _wait(browser, expected_conditions.staleness_of(page))


def _stat(browser: Browser, status: str) -> str:
    text: str = _css(browser, f"a.stat.{status} .value").text
    return text


def _ids(browser: Browser) -> list[int]:
    return [int(cell.text) for cell in _all(browser, "td[data-label='Id']")]


def _sign_in(browser: Browser, url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.driver.get(f"{url}/admin")
    assert browser.driver.current_url == f"{url}/admin/sign-in"
    browser.driver.find_element(By.ID, "token").send_keys(TOKEN)
    _button(browser, "Sign in").click()
    _wait(browser, lambda d: d.current_url == f"{url}/admin")


def _status(url: str, outbox_id: int) -> str:
    value: str = sql(url, "SELECT status FROM outbox WHERE id = $1", outbox_id)[0]["status"]
    return value


def _assert_clean(browser: Browser, url: str) -> None:
    """No console errors (a CSP violation is one), and no request left 127.0.0.1."""
    browser.collect_logs()
    problems = [e for e in browser.console if e["level"] in ("SEVERE", "WARNING")]
    assert not problems, problems
    assert browser.requests, "the performance log recorded no request"
    # chrome:// and data: are the browser's own start page, made inside the browser.
    elsewhere = [u for u in browser.requests if not u.startswith((f"{url}/", "chrome://", "data:"))]
    assert not elsewhere, elsewhere


def _no_horizontal_scroll(browser: Browser) -> None:
    overflow = browser.driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page is {overflow}px wider than the screen"


# --- The tests ------------------------------------------------------------------------------


def test_operator_journey(
    browser: Browser, running: tuple[Api, Seeded], database_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    process, seeded = running
    url = process.url
    driver = browser.driver
    browser.viewport(1280, 900)

    # A wrong token first: refused, in words.
    driver.get(f"{url}/admin")
    driver.find_element(By.ID, "token").send_keys("not-the-token-at-all")
    _button(browser, "Sign in").click()
    assert "That is not the admin token." in _css(browser, ".flash.refused").text
    # The one error this journey expects: the browser logs the refused sign-in's 401.
    browser.collect_logs()
    assert [(e["level"], e["message"]) for e in browser.console] == [
        (
            "SEVERE",
            f"{url}/admin/sign-in - Failed to load resource: the server responded with a "
            "status of 401 (Unauthorized)",
        )
    ]
    browser.console.clear()
    driver.find_element(By.ID, "token").clear()
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    _button(browser, "Sign in").click()
    _wait(browser, lambda d: d.current_url == f"{url}/admin")
    # The session cookie is invisible to scripts.
    assert driver.execute_script("return document.cookie") == ""

    # The overview.
    assert _css(browser, "h1").text == "Overview"
    assert _stat(browser, "pending") == "2"  # the deferred one and the plain one
    assert _stat(browser, "sending") == "2"
    assert _stat(browser, "failed") == "2"
    sent = int(_stat(browser, "sent").replace(",", ""))
    assert sent > 600
    assert len(_all(browser, ".chart rect.bar")) == 60
    summary = _css(browser, ".chart svg").get_attribute("aria-label")
    charted = int(summary.partition(" mail sent in the last 60 minutes")[0].replace(",", ""))
    assert sent - 50 < charted <= sent  # a minute may have rolled out of the hour since
    names = [cell.text for cell in _all(browser, "td[data-label='Name']")]
    assert names == ["mail-1", "mail-2"]
    held = [cell.text for cell in _all(browser, "td[data-label='Sending now']")]
    assert held == ["1", "1"]
    assert _all(browser, "#limits")  # the place for what comes later
    _screenshot(browser, tmp_path)

    # The list, filtered by status and time, as the operator types it.
    _css(browser, "nav a[href='/admin/mail']").click()
    _wait(browser, lambda d: d.current_url == f"{url}/admin/mail")
    Select(driver.find_element(By.ID, "f-status")).select_by_value("failed")
    driver.find_element(By.ID, "f-since").send_keys("1h")
    _button(browser, "Filter").click()
    _wait(browser, lambda d: "status=failed" in d.current_url)
    assert _ids(browser) == [seeded.hostile, seeded.failed]
    # The hostile row is text: no image, no script ran (an alert would fail this call).
    assert not _all(browser, "main img")
    subject = _css(browser, f"td.subject a[href='/admin/mail/{seeded.hostile}']").text
    assert subject.startswith("<script>alert('x')</script>\"'><img src=x onerror=alert(1)>")
    assert "U+202E" in subject

    # A mail's page: the attempt timeline and why it has not gone; then Retry.
    _css(browser, f"td.subject a[href='/admin/mail/{seeded.failed}']").click()
    _wait(browser, lambda d: d.current_url == f"{url}/admin/mail/{seeded.failed}")
    assert _css(browser, "h1").text.startswith(f"Mail {seeded.failed}")
    assert _css(browser, ".why .summary").text
    timeline = _css(browser, "ol.timeline").text
    assert "Attempt 1" in timeline and "rcpt" in timeline and "550" in timeline
    assert "User unknown in virtual mailbox table" in timeline
    _submit(browser, _button(browser, "Retry"))
    assert _css(browser, ".flash.ok").text == f"Mail {seeded.failed} is queued again and due now."
    assert _status(database_url, seeded.failed) == "pending"
    # It is pending now: Retry is no longer offered, Cancel is.
    assert not driver.find_elements(By.XPATH, "//main//button[normalize-space()='Retry']")
    _submit(browser, _button(browser, "Cancel"))
    assert "is cancelled" in _css(browser, ".flash.ok").text
    assert _status(database_url, seeded.failed) == "cancelled"

    # Retry now on the deferred mail makes it due at once.
    driver.get(f"{url}/admin/mail/{seeded.deferred}")
    assert "Greylisted" in _css(browser, "ol.timeline").text
    _submit(browser, _button(browser, "Retry now"))
    assert (
        _css(browser, ".flash.ok").text
        == f"Mail {seeded.deferred} is due now: the next free dispatcher sends it."
    )
    due = sql(
        database_url,
        "SELECT next_attempt_at <= now() AS due FROM outbox WHERE id = $1",
        seeded.deferred,
    )
    assert due[0]["due"]

    # The hostile mail's own page.
    driver.get(f"{url}/admin/mail/{seeded.hostile}")
    assert not _all(browser, "main img")
    assert "onerror=alert(1)>" in _css(browser, ".why").text + _css(browser, "ol.timeline").text

    # Sign out: back to sign-in, and the pages are closed again.
    _submit(browser, _css(browser, "form.sign-out button"))
    assert driver.current_url == f"{url}/admin/sign-in"
    assert _css(browser, ".flash.ok").text == "Signed out."
    driver.get(f"{url}/admin/mail")
    assert driver.current_url == f"{url}/admin/sign-in"

    _assert_clean(browser, url)


def test_phone_width_and_live_refresh(
    browser: Browser, running: tuple[Api, Seeded], database_url: str
) -> None:
    from selenium.webdriver.common.by import By

    process, seeded = running
    url = process.url
    driver = browser.driver
    _sign_in(browser, url)

    # A phone: nothing wider than the screen, on any page.
    browser.viewport(390, 844, mobile=True)
    for path in (
        "/admin",
        "/admin/mail",
        f"/admin/mail/{seeded.failed}",
        f"/admin/mail/{seeded.hostile}",
    ):
        driver.get(f"{url}{path}")
        _no_horizontal_scroll(browser)
    browser.viewport(1280, 900)

    # The overview refreshes itself in place (no reload: the page's state survives).
    driver.get(f"{url}/admin")
    driver.execute_script("window.stillThisPage = true")
    assert _stat(browser, "failed") == "2"
    sql(database_url, "UPDATE outbox SET status = 'failed' WHERE id = $1", seeded.pending)
    _wait(browser, lambda d: _stat(browser, "failed") == "3", timeout=25)
    assert driver.execute_script("return window.stillThisPage") is True

    # While the operator is typing a filter, the list is left alone.
    driver.get(f"{url}/admin/mail")
    first = _ids(browser)[0]
    field = driver.find_element(By.ID, "f-recipient")
    field.send_keys("grace@")
    fresh = sql(
        database_url,
        f"""INSERT INTO outbox (message_id, sender, recipient, subject, body_text,
                                recipient_domain, recipient_key)
            VALUES ('<fresh@example.org>', '{SENDER}', 'fresh@example.com', 'Hi', 'Hi',
                    'example.com', 'fresh@example.com')
            RETURNING id""",
    )[0]["id"]
    driver.execute_script("window.stillThisPage = true")
    time.sleep(12)  # more than one refresh period
    assert _ids(browser)[0] == first
    assert driver.find_element(By.ID, "f-recipient").get_attribute("value") == "grace@"
    # Once the field is back as it was and left, the refresh resumes.
    driver.find_element(By.ID, "f-recipient").clear()
    driver.execute_script("document.activeElement.blur()")
    _wait(browser, lambda d: _ids(browser)[0] == fresh, timeout=25)
    assert driver.execute_script("return window.stillThisPage") is True

    _assert_clean(browser, url)


def _screenshot(browser: Browser, tmp_path: Path) -> None:
    """The whole overview at desktop width; kept as ADMIN_SCREENSHOT if that is set."""
    driver = browser.driver
    height = driver.execute_script("return document.documentElement.scrollHeight")
    browser.viewport(1280, int(height))
    driver.execute_script("window.scrollTo(0, 0)")
    path = tmp_path / "admin-overview.png"
    assert driver.save_screenshot(str(path))
    target = os.environ.get("ADMIN_SCREENSHOT")
    if target:
        shutil.copyfile(path, target)
    browser.viewport(1280, 900)
