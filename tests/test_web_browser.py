"""`capwatch serve` in a real browser: Debian's chromium, headless, driven by Selenium through chromium-driver.

A real `capwatch serve` process listens on 127.0.0.1 (a free port); the browser opens the address it printed (with
the access token, which moves into a cookie), loads the page, types a query,
sees thumbnails, opens a photo, edits its caption, and exiftool then reads the new words from the file on disk.
On failure a screenshot of the page is saved (path printed; also copied to $CAPWATCH_SCREENSHOT_DIR if set).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.web_helpers import RED_CAPTION, Library, Served, build_library, exif_fields, serving, write_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver")
pytestmark = [
    # In CI (.ci/run installs them) a missing browser must fail the test, never skip it quietly.
    pytest.mark.skipif(not os.environ.get("CI") and not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="chromium and chromium-driver are not installed (apt-get install chromium "
                              "chromium-driver)"),
    pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed"),
]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Library, Served]]:
    lib = build_library(tmp_path)
    with serving(tmp_path, write_config(lib, tmp_path)) as server:
        yield lib, server


@pytest.fixture
def browser(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    failed_before = request.session.testsfailed
    try:
        yield driver
    finally:
        # The call's report is counted before fixtures are torn down: a higher count means this test failed.
        if request.session.testsfailed > failed_before:
            shot = tmp_path / "failure.png"
            driver.save_screenshot(str(shot))
            target = os.environ.get("CAPWATCH_SCREENSHOT_DIR")
            if target:
                Path(target).mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, Path(target) / f"{request.node.name}.png")
            print(f"screenshot of the page at the failure: {shot}")
        driver.quit()


def _wait(driver: Any, condition: Any, timeout: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_search_open_a_photo_and_edit_its_caption_in_chromium(served: tuple[Library, Served], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    lib, server = served
    url = server.url
    browser.get(url)
    assert "needs its access token" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(server.login_url)  # the address `capwatch serve` printed: the token goes into a cookie
    assert browser.current_url == url and "token" not in browser.current_url
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("/")  # the keyboard shortcut focuses the search box
    box = browser.switch_to.active_element
    assert box.get_attribute("id") == "q"
    box.send_keys("bicycle", Keys.ENTER)
    _wait(browser, lambda d: "q=bicycle" in d.current_url)
    tiles = browser.find_elements(By.CSS_SELECTOR, "#results .tile img")
    assert len(tiles) == 1
    # The thumbnail really loaded (a decoded WebP, not a broken image).
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                              tiles[0]))
    assert browser.find_element(By.CSS_SELECTOR, "#results mark").text == "bicycle"
    # Arrow keys move through the results; Enter opens the photo.
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    focused = browser.switch_to.active_element
    assert focused.get_attribute("class") == "hit"
    focused.send_keys(Keys.ENTER)
    _wait(browser, lambda d: "/photo/" in d.current_url)
    assert browser.find_element(By.ID, "caption").text == RED_CAPTION
    preview = browser.find_element(By.CSS_SELECTOR, ".preview img")
    _wait(browser, lambda d: d.execute_script("return arguments[0].naturalWidth > 0", preview))
    text = browser.find_element(By.ID, "caption-text")
    text.clear()
    text.send_keys("Anna's red bike against the old wall")
    browser.find_element(By.ID, "save").click()
    _wait(browser, lambda d: "done=saved" in d.current_url)
    assert "Saved" in browser.find_element(By.CSS_SELECTOR, ".notice").text
    assert browser.find_element(By.ID, "caption").text == "Anna's red bike against the old wall"
    tags = exif_fields(lib.path("red.jpg"))
    assert tags["XMP-dc:Description"] == "Anna's red bike against the old wall"
    assert not [k for k in tags if k.startswith("XMP-capwatch")]
    # The new words are searchable at once.
    browser.get(url + "?q=anna")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .tile")) == 1


def test_a_conflict_page_lets_the_person_choose_in_chromium(served: tuple[Library, Served], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    lib, server = served
    url = server.url
    browser.get(server.login_url)
    red = lib.path("red.jpg")
    browser.get(f"{url}photo/{lib.ids['red.jpg']}")
    text = browser.find_element(By.ID, "caption-text")
    text.clear()
    text.send_keys("Anna's red bike")
    # Someone else writes a description while the page is open.
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=Grandma's cat Mimi", str(red)],
                   check=True)
    browser.find_element(By.ID, "save").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "conflict"))
    assert "Grandma's cat Mimi" in browser.find_element(By.ID, "theirs").text
    assert "Anna's red bike" in browser.find_element(By.ID, "mine").text
    assert exif_fields(red)["XMP-dc:Description"] == "Grandma's cat Mimi"
    # Edit again: back on the photo page with my words in the box and theirs listed; then save.
    browser.find_element(By.ID, "edit-again").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "in-file"))
    assert browser.find_element(By.ID, "caption-text").get_attribute("value") == "Anna's red bike"
    assert "Grandma's cat Mimi" in browser.find_element(By.ID, "in-file").text
    browser.find_element(By.ID, "save").click()
    _wait(browser, lambda d: "done=saved" in d.current_url)
    assert exif_fields(red)["XMP-dc:Description"] == "Anna's red bike"
