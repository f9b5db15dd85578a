"""DB mode's /ui pages in a real headless Chromium (Debian's chromium + chromium-driver, through selenium).

Log in with the master key, create a key (shown once), see it listed, block it; screenshots of each
page must show something. The session cookie and the forms' CSRF tokens are checked over plain HTTP.
"""

from __future__ import annotations

import http.client
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from authsvc.keydb.store import Store
from controller.model.wire import key_hash as hash_key
from support import MASTER, admin_app, serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def ui(tmp_path) -> Iterator[tuple[str, Store]]:
    store = Store.open(f"sqlite:///{tmp_path / 'llmgate.db'}")
    store.new_team(team_id="team-a", team_alias="Team A", max_budget=25.0)
    with serve(admin_app(store)) as base:
        yield base, store
    store.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: install Debian's chromium and chromium-driver (make test-deps)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def non_white_share(png: Path) -> float:
    from PIL import Image

    img = Image.open(png).convert("L")
    histogram = img.histogram()
    return sum(histogram[:235]) / (img.width * img.height)


def shot(driver, path: Path) -> float:
    assert driver.save_screenshot(str(path)), f"no screenshot at {path}"
    return non_white_share(path)


def submit(driver, button) -> None:
    """Click a button that submits a form, and wait until the next page replaced this one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    button.click()
    WebDriverWait(driver, 15).until(expected_conditions.staleness_of(page))


def test_log_in_create_list_and_block_a_key(ui, browser, tmp_path):
    from selenium.webdriver.common.by import By

    base, store = ui
    browser.get(base + "/ui")
    assert browser.find_element(By.ID, "master_key").get_attribute("type") == "password"
    assert shot(browser, tmp_path / "login.png") > 0.02

    browser.find_element(By.ID, "master_key").send_keys("sk-not-the-master-key")
    submit(browser, browser.find_element(By.ID, "login"))
    assert "not the master key" in browser.find_element(By.ID, "login-error").text
    assert browser.get_cookie("llmgate_ui") is None

    browser.find_element(By.ID, "master_key").send_keys(MASTER)
    submit(browser, browser.find_element(By.ID, "login"))
    cookie = browser.get_cookie("llmgate_ui")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert MASTER not in cookie["value"]
    assert browser.find_element(By.ID, "no-keys")
    assert shot(browser, tmp_path / "dashboard-empty.png") > 0.05

    for field, value in (("key_alias", "ci-bot"), ("team_id", "team-a"), ("models", "llama-3.1-8b-instruct, qwen"),
                         ("rpm_limit", "60"), ("max_budget", "5"), ("budget_duration", "30d"), ("duration", "90d")):
        browser.find_element(By.ID, field).send_keys(value)
    submit(browser, browser.find_element(By.ID, "create-key-submit"))

    raw_key = browser.find_element(By.ID, "raw-key").text.strip()
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{40,}", raw_key)
    assert "not shown again" in browser.page_source
    assert shot(browser, tmp_path / "key-created.png") > 0.05
    record = store.key_by_hash(hash_key(raw_key))
    assert record is not None and record.key_alias == "ci-bot" and record.team_id == "team-a"
    assert record.models == ("llama-3.1-8b-instruct", "qwen") and record.rpm_limit == 60
    assert record.max_budget == 5.0 and record.budget_duration == "30d" and record.expires is not None

    submit(browser, browser.find_element(By.ID, "back"))
    row = browser.find_element(By.CSS_SELECTOR, "#keys tr[data-alias='ci-bot']")
    assert record.key_name in row.text and "team-a" in row.text and "active" in row.text
    assert raw_key not in browser.page_source  # listed, never shown again
    assert browser.find_element(By.CSS_SELECTOR, "#teams tr[data-team-id='team-a']")
    assert shot(browser, tmp_path / "dashboard-one-key.png") > 0.05

    submit(browser, row.find_element(By.XPATH, ".//button[text()='Block']"))
    row = browser.find_element(By.CSS_SELECTOR, "#keys tr[data-alias='ci-bot']")
    assert "blocked" in row.find_element(By.CSS_SELECTOR, "td.state").text
    assert store.key_by_hash(hash_key(raw_key)).blocked
    assert shot(browser, tmp_path / "dashboard-blocked.png") > 0.05

    submit(browser, row.find_element(By.XPATH, ".//button[text()='Unblock']"))
    assert not store.key_by_hash(hash_key(raw_key)).blocked
    row = browser.find_element(By.CSS_SELECTOR, "#keys tr[data-alias='ci-bot']")
    submit(browser, row.find_element(By.XPATH, ".//button[text()='Delete']"))
    assert browser.find_element(By.ID, "no-keys")
    assert store.key_by_hash(hash_key(raw_key)) is None

    browser.find_element(By.ID, "key_alias").send_keys("bad")
    browser.find_element(By.ID, "budget_duration").send_keys("1 year")
    submit(browser, browser.find_element(By.ID, "create-key-submit"))
    assert "budget_duration" in browser.find_element(By.ID, "form-error").text
    assert store.list_keys(1, 10)[1] == 0

    submit(browser, browser.find_element(By.ID, "logout"))
    assert browser.find_element(By.ID, "master_key")
    assert browser.get_cookie("llmgate_ui") is None


def test_a_blank_page_is_caught_by_the_pixel_check(tmp_path):
    from PIL import Image

    Image.new("RGB", (200, 100), "white").save(tmp_path / "blank.png")
    assert non_white_share(tmp_path / "blank.png") == 0.0


def _post(base: str, path: str, form: dict, cookie: str | None = None) -> http.client.HTTPResponse:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookie:
        headers["Cookie"] = cookie
    conn.request("POST", path, body=urlencode(form), headers=headers)
    response = conn.getresponse()
    response.read()
    return response


def _get(base: str, path: str, cookie: str) -> tuple[int, str]:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", path, headers={"Cookie": cookie})
    response = conn.getresponse()
    return response.status, response.read().decode()


def test_forms_need_the_session_and_its_csrf_token(ui):
    base, store = ui
    _, key = store.generate_key(key_alias="victim")
    assert _post(base, "/ui/login", {"master_key": "wrong"}).status == 401
    login = _post(base, "/ui/login", {"master_key": MASTER})
    assert login.status == 303
    set_cookie = login.getheader("Set-Cookie")
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and MASTER not in set_cookie
    cookie = set_cookie.split(";", 1)[0]

    status, page = _get(base, "/ui", cookie)
    assert status == 200 and "victim" in page
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)

    # No session, a forged session, or a missing or wrong token: the key is not touched.
    assert _post(base, "/ui/keys/block", {"token_hash": key.token_hash, "csrf": csrf}).status == 303
    forged = "llmgate_ui=1700000000." + "0" * 64
    assert _post(base, "/ui/keys/block", {"token_hash": key.token_hash, "csrf": csrf}, forged).status == 303
    assert _post(base, "/ui/keys/block", {"token_hash": key.token_hash}, cookie).status == 403
    assert _post(base, "/ui/keys/delete", {"token_hash": key.token_hash, "csrf": "0" * 64}, cookie).status == 403
    assert _post(base, "/ui/keys", {"key_alias": "sneaky", "csrf": "x"}, cookie).status == 403
    assert not store.key_by_hash(key.token_hash).blocked and store.list_keys(1, 10)[1] == 1

    assert _post(base, "/ui/keys/block", {"token_hash": key.token_hash, "csrf": csrf}, cookie).status == 303
    assert store.key_by_hash(key.token_hash).blocked
    status, page = _get(base, "/ui", cookie)
    assert "Content-Security-Policy" not in page  # headers, not markup
    headers = _headers(base, "/ui", cookie)
    assert headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in headers["content-security-policy"]


def _headers(base: str, path: str, cookie: str) -> dict[str, str]:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", path, headers={"Cookie": cookie})
    response = conn.getresponse()
    response.read()
    return {k.lower(): v for k, v in response.getheaders()}
