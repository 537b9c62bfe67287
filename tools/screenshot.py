"""Regenerate the README's screenshot of `capwatch serve` from the test fixtures.

    python tools/screenshot.py                 # writes docs/serve.png
    python tools/screenshot.py --out /tmp/x.png --query "red OR blue"

Copies tests/fixtures/images into a temporary library, writes captions into the files through capwatch's own
write path (a model's with provenance, one person's without), indexes them with the real reconcile, starts a real
`capwatch serve` on 127.0.0.1 (a free port), opens the address it printed (with the access token) and photographs
the search page with headless Debian chromium (Selenium + chromium-driver; no browser download).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capwatch.config import Config, IndexConfig, LibraryConfig, RootConfig  # noqa: E402
from capwatch.library.index import Index  # noqa: E402
from capwatch.library.scan import reconcile  # noqa: E402
from capwatch.metadata import Provenance, write_caption  # noqa: E402

CAPTIONS = {
    "blobs.jpg": ("a few red and blue balloons against a white wall", True),
    "gradient.jpg": ("a blue evening sky fading into orange over the sea", True),
    "oriented.jpg": ("a narrow red door in an old stone wall", True),
    "red.png": ("Anna's red bike, the summer we moved", False),
    "checker.png": ("a black and white checkered floor in the hall", True),
    "gray.png": ("fog over the lake, early morning", True),
    "alpha.png": ("a red kite in a blue sky", True),
}


def build(work: Path) -> Path:
    """The library and its index below ``work``; returns the config file for `capwatch serve`."""
    root = work / "Pictures"
    root.mkdir(parents=True)
    for name, (caption, ours) in CAPTIONS.items():
        target = root / name
        shutil.copy(REPO / "tests" / "fixtures" / "images" / name, target)
        provenance = Provenance("florence-2-base-ft", None, "2025-06-01T10:00:00Z") if ours else None
        write_caption(target, caption, provenance, Config().metadata)
    db = work / "index.db"
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)), index=IndexConfig(path=db))
    with Index.open(db) as index:
        reconcile(config.library.roots[0], config, index)
    path = work / "config.toml"
    path.write_text(f'[library]\nroots = ["{root}"]\n[index]\npath = "{db}"\n')
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serve.png")
    parser.add_argument("--query", default="red OR blue")
    parser.add_argument("--size", default="1100,640")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = build(work)
        env = {**os.environ, "CAPWATCH_OFFLINE": "1", "XDG_CACHE_HOME": str(work / "cache"),
               "XDG_STATE_HOME": str(work / "state")}
        proc = subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(config), "serve", "--port", "0"],
                                env=env, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=(\S+)", line)
            if match is None:
                raise SystemExit(f"capwatch serve did not start: {line}")
            options = Options()
            options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
            for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.size}", f"--user-data-dir={work / 'profile'}"):
                options.add_argument(arg)
            driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                                      options=options)
            try:
                from urllib.parse import quote

                # The address with the token, as `capwatch serve` printed it: the token moves into a cookie.
                driver.get(match.group(1) + "?token=" + match.group(2) + "&q=" + quote(args.query))
                driver.execute_script("return Promise.all(Array.from(document.images)"
                                      ".map(i => i.complete ? 0 : new Promise(r => i.onload = i.onerror = r)))")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
