"""A headless Debian chromium through chromium-driver (Selenium), with the network beyond loopback cut, and the
waits and lookups the browser tests share (tests/test_console.py; the sweeps page in tests/test_platform.py)."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@contextlib.contextmanager
def chromium():
    """A 1280x800 headless chromium whose performance and console logs the test can read."""
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-gpu", "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # the network beyond loopback is cut
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, what, timeout: float = 30, every: float = 0.2):
    """Poll `what(driver)` until it is truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = what(driver)
            if got:
                return got
        except Exception:  # noqa: BLE001 - not there yet (stale or missing element)
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {getattr(what, '__name__', what)}")
        time.sleep(every)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def all_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


