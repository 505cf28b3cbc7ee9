"""A real browser for the portal tests: Debian's headless Chromium driven by Selenium
through chromium-driver, trusting exactly the portal's test certificate, and the
helpers that drive it from async tests (every browser call in a thread: the portal
it talks to runs on the test's event loop)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import leaf_files


def spki_hash(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def portal_cert(pki, tmp_path):
    leaf = pki.ca.issue_cert("127.0.0.1")
    chain, key = leaf_files(leaf, tmp_path, "portal")
    return chain, key, spki_hash(leaf.cert_chain_pems[0].bytes())


@pytest.fixture
def browser(portal_cert, tmp_path):
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",  # only loopback, ever
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        # trust exactly the portal's test certificate (issued by the test CA)
        f"--ignore-certificate-errors-spki-list={portal_cert[2]}",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    # a browser that outlived its driver (a failed test) must not linger
    subprocess.run(["pkill", "-f", str(tmp_path / "chromium-profile")], check=False)


async def on_page(driver, action):
    """Every browser call runs in a thread: a call on the event loop, while the
    browser waits for the portal (on that same loop), would wait for ever."""
    return await asyncio.to_thread(action, driver)


def press(driver, selector: str) -> None:
    """Click a form's button and wait for the page it leads to (after redirects): the
    old document carries a mark the new one does not.  Errors while the page changes
    (an element or a script context that just went away) mean "not yet"."""
    driver.execute_script("window.sealgateOldPage = true")
    driver.find_element(By.CSS_SELECTOR, selector).click()
    WebDriverWait(driver, 20, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return !window.sealgateOldPage && document.readyState === 'complete'"
        )
    )


async def source(driver) -> str:
    return await on_page(driver, lambda d: d.page_source)


async def title(driver) -> str:
    return await on_page(driver, lambda d: d.title)


async def world_with_plain_recipient(world):
    plain = await world.mta("mx.plain.test", "127.0.0.91", cert=None)  # no STARTTLS
    clinic = await world.mta("mx.clinic.test", "127.0.0.92")
    world.dns.add("plain.test", "MX", "10 mx.plain.test.")
    world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
    return plain, clinic


async def start_portal(gateway_factory, world, pki, portal_cert, policy=None, **overrides):
    chain, key, _ = portal_cert
    config = world.config(
        {
            "delivery.retry_schedule": ["1s"],
            "portal.cert_file": str(chain),
            "portal.key_file": str(key),
            "portal.organization": "Example Clinic",
            "portal.from_address": "secure@clinic.test",
            **overrides,
        },
        policy=policy,
    )
    return await gateway_factory(config)
