"""`capwatch serve` shows the folders the index's owner scanned (recorded in the index) beside the configured
roots; a hit it still hides comes with where the configuration file is."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from web_helpers import SERVING, make_jpeg

from capwatch.config import Config, RootConfig
from capwatch.library.index import Index
from capwatch.library.scan import reconcile
from tests.conftest import CliRunner, isolated_env

pytest.importorskip("starlette")


@contextmanager
def _serving(tmp_path: Path, *args: str) -> Iterator[tuple[str, str]]:
    """A real `capwatch serve` without a configuration file: its address and its access token."""
    proc = subprocess.Popen([sys.executable, "-m", "capwatch", *args, "serve", "--port", "0"],
                            env=isolated_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        said = ""
        match = None
        while match is None and (line := proc.stderr.readline()):
            said += line
            match = SERVING.search(line)
        assert match is not None and match.group(3), f"capwatch serve did not start: {said}"
        assert "no photo can be shown" not in said, said
        yield match.group(1), match.group(3)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _get(url: str, token: str) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(answer.read().decode("utf-8"))


def test_the_page_serves_a_folder_scanned_without_a_configuration(tmp_path: Path, run_cli: CliRunner) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, color in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
        make_jpeg(photos / f"p{i}.jpg", color)
    other = tmp_path / "elsewhere"
    other.mkdir()
    make_jpeg(other / "stray.jpg", (90, 90, 90))
    scanned = run_cli("scan", "--no-caption", photos)  # no configuration file anywhere: the default index
    assert scanned.code == 0, scanned.err
    home = tmp_path / "home"
    [db] = list(home.rglob("index.db"))
    with Index.open(db) as index:
        assert index.owner_roots() == (photos,)
        # A row below no folder the owner scanned (put there by another tool): never served.
        reconcile(RootConfig(path=other), Config(), index)
        assert index.owner_roots() == (photos,)

    with _serving(tmp_path) as (base, token):
        html = _get(base + "?q=jpg", token)
        ids = re.findall(r'href="/photo/(\d+)"', html)
        assert len(ids) == 3, html
        assert 'id="hidden"' in html  # stray.jpg
        config_file = home / ".config" / "capwatch" / "config.toml"
        hidden = re.search(r'<p class="empty" id="hidden">(.*?)</p>', html, re.S)
        assert hidden is not None and str(config_file) in hidden.group(1), hidden
        for row_id in ids:
            assert "p" in _get(f"{base}photo/{row_id}", token)
