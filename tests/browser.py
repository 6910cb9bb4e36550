"""Headless Chromium for UI tests: Debian's chromium + chromium-driver driven by Selenium.

Everything is installed on demand and idempotently (apt-get for the browser when we are root, pip for Selenium);
where that is impossible the calling test is skipped with the reason. Selenium is pointed at /usr/bin/chromedriver
and /usr/bin/chromium explicitly, so Selenium Manager never downloads a browser or a driver.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1600,1200",
]


def ensure_chromium(timeout: float = 900) -> None:
    """Install Debian's chromium and chromium-driver if either is missing, or skip the test saying why."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing and we cannot apt-get install chromium chromium-driver "
                    "(not root, or no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"`{' '.join(exc.cmd)}` failed ({exc.returncode}): {(exc.stderr or exc.stdout or '')[-800:]}")
    except subprocess.TimeoutExpired as exc:
        pytest.skip(f"`{' '.join(exc.cmd)}` took over {timeout:.0f} s")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"apt-get installed chromium but {CHROMIUM} or {CHROMEDRIVER} is still missing")


def ensure_selenium() -> None:
    """Import Selenium, pip-installing it into this interpreter's environment first if needed, or skip."""
    try:
        importlib.import_module("selenium.webdriver")
        return
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "selenium"], capture_output=True, text=True, timeout=600)
    importlib.invalidate_caches()
    try:
        importlib.import_module("selenium.webdriver")
    except ImportError:
        pytest.skip(f"selenium is not installed and `pip install selenium` failed ({proc.returncode}): {proc.stderr[-800:]}")


def make_driver(user_data_dir: Path):
    """A headless Chromium WebDriver with its own profile directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    return driver


def wait_for(driver, condition: Callable[[Any], Any], what: str, timeout: float = 30,
             detail: Callable[[Any], str] | None = None) -> Any:
    """WebDriverWait for `condition(driver)` to be truthy and return it; on timeout fail with what the page showed
    (and `detail(driver)`, if given)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # The UI is a single-page app that re-renders as data arrives: an element found in one poll may be replaced
    # before the condition reads it; that poll simply does not count.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25, ignored_exceptions=ignored).until(condition)
    except TimeoutException:
        text = driver.execute_script("return document.body ? document.body.innerText : ''") or ""
        extra = f"\n{detail(driver)}" if detail else ""
        pytest.fail(f"timed out after {timeout} s waiting for {what} at {driver.current_url}{extra}\n"
                    f"the page shows:\n{text[:2000]}")


def screenshot(driver, name: str, *dirs: Path) -> list[Path]:
    """Save a PNG of the viewport as `name` in each of `dirs` (created as needed); print and return the paths."""
    time.sleep(0.5)  # let transitions and late layout settle
    png = driver.get_screenshot_as_png()
    paths = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(png)
        paths.append(d / name)
    print("screenshot:", *paths)
    return paths
