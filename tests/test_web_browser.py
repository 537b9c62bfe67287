"""`capwatch serve` in a real browser: Debian's chromium, headless, driven by Selenium through chromium-driver.

A real `capwatch serve` process listens on 127.0.0.1 (a free port); the browser opens the address it printed (with
the access token, which moves into a cookie), loads the page, types a query,
sees thumbnails, opens a photo, edits its caption, and exiftool then reads the new words from the file on disk.
On failure a screenshot of the page is saved (path printed; also copied to $CAPWATCH_SCREENSHOT_DIR if set).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import isolated_env
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


def _scanned_with_meaning_and_served(tmp_path: Path, root: Path) -> Iterator[tuple[Path, Served]]:
    """``root`` scanned by a real `capwatch scan` with the tiny captioner and the tiny SigLIP embedder, then served
    by a real `capwatch serve` whose [embed] model is that embedder."""
    fixtures = Path(__file__).parent / "fixtures"
    config = tmp_path / "config.toml"
    config.write_text(f'[library]\nroots = ["{root}"]\n[index]\npath = "{tmp_path / "index.db"}"\n'
                      f'[model]\ndir = "{fixtures / "models" / "vit-gpt2-tiny-greedy"}"\nprecision = "fp32"\n'
                      f'[embed]\nmodel = "{fixtures / "models" / "siglip-tiny"}"\n')
    env = isolated_env(tmp_path)
    scan = subprocess.run([sys.executable, "-m", "capwatch", "--config", str(config), "scan"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert scan.returncode == 0, scan.stderr
    with serving(tmp_path, config) as server:
        yield root, server


@pytest.fixture
def served_with_meaning(tmp_path: Path) -> Iterator[tuple[Path, Served]]:
    """A library scanned with the tiny captioner and the tiny SigLIP embedder (astronaut, a copy of it, a cat, a
    cup of coffee), served by a real `capwatch serve` whose [embed] model is that embedder."""
    fixtures = Path(__file__).parent / "fixtures"
    root = tmp_path / "photos"
    root.mkdir()
    for name, source in (("astronaut.jpg", "astronaut.jpg"), ("astronaut-copy.jpg", "astronaut.jpg"),
                         ("chelsea.jpg", "chelsea.jpg"), ("coffee.jpg", "coffee.jpg")):
        shutil.copy(fixtures / "photos" / source, root / name)
    yield from _scanned_with_meaning_and_served(tmp_path, root)


def test_meaning_hits_similar_photos_and_duplicates_in_chromium(served_with_meaning: tuple[Path, Served],
                                                                 browser: Any) -> None:
    from selenium.webdriver.common.by import By

    root, server = served_with_meaning
    url = server.url
    browser.get(server.login_url)
    # No caption or path has these words: every tile is a hit by meaning, and says so.
    browser.get(url + "?q=zebra+grazing")
    tiles = browser.find_elements(By.CSS_SELECTOR, "#results .tile")
    assert len(tiles) == 4
    labels = [t.find_element(By.CSS_SELECTOR, ".why.meaning").text for t in tiles]
    assert all(label.startswith("by meaning · similarity") for label in labels)
    # A word hit is still marked as one.
    browser.get(url + "?q=path:coffee")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .tile")) == 1
    assert not browser.find_elements(By.CSS_SELECTOR, "#results .why.meaning")
    # The photo page shows the most similar photos first: the copy of the astronaut.
    browser.get(url + "?q=path:astronaut.jpg")
    browser.find_element(By.CSS_SELECTOR, "#results .tile a").click()
    _wait(browser, lambda d: "/photo/" in d.current_url)
    section = browser.find_element(By.ID, "similar")
    assert section.find_element(By.TAG_NAME, "h2").text == "Similar photos"
    similar = section.find_elements(By.CSS_SELECTOR, ".tile")
    assert len(similar) == 3
    first = similar[0].find_element(By.TAG_NAME, "img")
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                              first))
    similar[0].find_element(By.TAG_NAME, "a").click()
    _wait(browser, lambda d: "/photo/" in d.current_url)
    assert browser.find_element(By.CSS_SELECTOR, "dd.path").text == str(root / "astronaut-copy.jpg")
    # The duplicates view, reached from the header, groups the copy with its original.
    browser.find_element(By.LINK_TEXT, "Duplicates").click()
    _wait(browser, lambda d: "/duplicates" in d.current_url)
    groups = browser.find_elements(By.CSS_SELECTOR, "section.duplicates")
    assert len(groups) == 1
    assert [p.text for p in groups[0].find_elements(By.CSS_SELECTOR, ".path")] == \
        [str(root / "astronaut-copy.jpg"), str(root / "astronaut.jpg")]
    browser.get(url + "duplicates?threshold=1.5")
    assert "threshold" in browser.find_element(By.TAG_NAME, "body").text


@pytest.fixture
def served_with_a_video(tmp_path: Path) -> Iterator[tuple[Path, Served]]:
    """A video of three scenes and two photos, scanned with the tiny captioner and SigLIP, served by a real
    `capwatch serve` with that embedder."""
    pytest.importorskip("av")
    from tests.video_helpers import scenes_video

    fixtures = Path(__file__).parent / "fixtures"
    root = tmp_path / "photos"
    root.mkdir()
    scenes_video(root / "clip.mp4", seconds=3)
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(fixtures / "photos" / name, root / name)
    yield from _scanned_with_meaning_and_served(tmp_path, root)


def test_a_video_found_at_a_moment_plays_from_that_moment_in_chromium(served_with_a_video: tuple[Path, Served],
                                                                      browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    root, server = served_with_a_video
    words = "zebra grazing"
    # What `search --json` says the best moment is: the page links to the same one.
    found = subprocess.run([sys.executable, "-m", "capwatch", "--config", str(tmp_path / "config.toml"), "search",
                            words, "--by", "meaning", "--json"], env=isolated_env(tmp_path), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    at = next(json.loads(line)["at"] for line in found.stdout.splitlines()
              if json.loads(line)["path"] == str(root / "clip.mp4"))
    assert isinstance(at, float) and at > 0
    browser.get(server.login_url)
    browser.get(server.url + "?q=zebra+grazing")
    tiles = browser.find_elements(By.CSS_SELECTOR, "#results .tile")
    assert len(tiles) == 3
    video_tile = next(t for t in tiles if t.find_elements(By.CSS_SELECTOR, ".badge.video"))
    link = video_tile.find_element(By.CSS_SELECTOR, "a.hit")
    assert link.get_attribute("href").endswith(f"?t={at:.3f}")
    minutes, seconds = divmod(int(at), 60)
    assert video_tile.find_element(By.CSS_SELECTOR, ".why.moment").text == f"at {minutes}:{seconds:02d}"
    # The photos' tiles have no moment.
    assert sum(bool(t.find_elements(By.CSS_SELECTOR, ".why.moment")) for t in tiles) == 1
    link.click()
    _wait(browser, lambda d: "/photo/" in d.current_url)
    video = browser.find_element(By.ID, "video")
    assert video.get_attribute("src").endswith(f"#t={at:.3f}")
    # The browser starts it at the moment (the media fragment), not at the beginning.
    _wait(browser, lambda d: d.execute_script("return arguments[0].readyState >= 1 || arguments[0].error", video))
    assert browser.execute_script("return arguments[0].error && arguments[0].error.message", video) is None
    assert browser.execute_script("return arguments[0].currentTime", video) == pytest.approx(at, abs=0.05)
