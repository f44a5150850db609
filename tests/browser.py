"""Headless Chromium for the browser tests: Debian's chromium and chromedriver, as `make test`
installs them (scripts/browser.sh), with the flags this closed network needs and a fresh profile per test."""

import os
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BROWSER_AVAILABLE = os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)
CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium(tmp_path: Path, *, width: int = 1280, height: int = 1000) -> webdriver.Chrome:
    options = Options()
    options.binary_location = CHROMIUM
    for argument in [
        *CHROME_ARGS,
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={width},{height}",
    ]:
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver
