"""The service's page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): upload a photo, wait for the matches, check they are the API's, take a screenshot."""

from __future__ import annotations

import contextlib

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from serve_server import running, tiny_map
from vprhub.serve import PlaceSearcher, ServeSettings, create_app

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"  # `make browser` installs both


@contextlib.contextmanager
def chromium(profile):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,760",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_page_shows_the_api_matches(tmp_path):
    pipe, index, queries = tiny_map(tmp_path)
    app = create_app(PlaceSearcher(pipe, index), ServeSettings(top_k=4))
    photo = queries[2]
    with running(app) as url, chromium(tmp_path / "profile") as browser:
        wait = WebDriverWait(browser, 60)
        browser.get(f"{url}/")
        wait.until(lambda b: "12 places" in b.find_element(By.ID, "info").text)
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
        shown = [(int(c.get_attribute("data-id")), c.find_element(By.CLASS_NAME, "score").text) for c in cards]

        api = httpx.post(f"{url}/search", files=[("images", (photo.name, photo.read_bytes(), "image/jpeg"))])
        hits = api.json()["results"][0]["hits"]
        assert shown == [(hit["id"], f"{hit['score']:.4f}") for hit in hits]
        assert browser.find_element(By.ID, "status").text == "4 matches"
        # Every thumbnail came from the map, every match has a dot in the scatter.
        thumbnails_loaded = "return [...document.querySelectorAll('#results img')].every(i => i.naturalWidth == 64)"
        wait.until(lambda b: b.execute_script(thumbnails_loaded))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#scatter circle.position")) == 4
        assert browser.execute_script("return document.getElementById('query').naturalWidth") == 64
        browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000
