"""`capwatch serve` over HTTP (Starlette's TestClient): every page, every bad input, the caption edit read back by
exiftool, the safety rules (which files may be served, CSRF, Host, token, body limits)."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from capwatch.errors import ConfigError, QueryError
from capwatch.library.index import Index
from capwatch.library.search import parse_query
from capwatch.models.captioner import open_captioner
from capwatch.web.app import MAX_BODY, ServeSettings, create_app
from capwatch.web.security import AccessToken, is_loopback, load_or_create_token
from tests.conftest import CliRunner
from tests.web_helpers import (
    GRANDMA,
    MODEL,
    RED_CAPTION,
    Library,
    build_library,
    csrf_of,
    exif_fields,
    serving,
    start_serve,
    token_file,
)

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")
CSRF = "test-csrf-0123456789abcdefghijklmnop"
BASE = "http://127.0.0.1:8765"


def _settings(lib: Library, tmp_path: Path, **changes: Any) -> ServeSettings:
    settings = ServeSettings(config=lib.config, csrf=CSRF, cache_dir=tmp_path / "cache",
                             open_captioner=lambda: open_captioner(MODEL, lib.config.model),
                             live_state=lambda: None)
    return dataclasses.replace(settings, **changes)


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    return build_library(tmp_path)


@pytest.fixture
def client(lib: Library, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(lib, tmp_path)), base_url=BASE, follow_redirects=False) as c:
        yield c


def _row(lib: Library, name: str) -> Any:
    with Index.open(lib.config.index_path(), readonly=True) as index:
        return index.get_by_id(lib.ids[name])


# -- search ---------------------------------------------------------------------------------------------------


def test_search_shows_a_grid_of_thumbnails_with_matched_words_highlighted(client: TestClient, lib: Library) -> None:
    page = client.get("/", params={"q": "bicycle wall"})
    assert page.status_code == 200
    html = page.text
    red = lib.ids["red.jpg"]
    assert f'href="/photo/{red}"' in html and f'src="/thumb/{red}"' in html
    assert "<mark>bicycle</mark>" in html and "<mark>wall</mark>" in html
    assert f'/photo/{lib.ids["grandma.jpg"]}"' not in html


def test_query_errors_are_the_clis_words_on_the_page_not_a_500(client: TestClient) -> None:
    for bad in ['"unbalanced', "-only", "OR cat", "b*ke"]:
        with pytest.raises(QueryError) as cli_error:
            parse_query(bad)
        page = client.get("/", params={"q": bad})
        assert page.status_code == 400, bad
        assert str(cli_error.value).replace("'", "&#39;").replace('"', "&#34;") in page.text, (bad, page.text)
    page = client.get("/", params={"q": "cat", "since": "last tuesday"})
    assert page.status_code == 400 and "--since: cannot read date" in page.text
    page = client.get("/", params={"q": "cat", "source": "robot"})
    assert page.status_code == 400 and "--source" in page.text
    assert client.get("/", params={"q": "x" * 5000}).status_code == 400
    assert client.get("/", params={"q": "cat", "folder": "relative/dir"}).status_code == 400
    assert client.get("/", params={"status": "nonsense"}).status_code == 400


def test_a_caption_with_markup_is_shown_as_text(client: TestClient, lib: Library) -> None:
    for url in ("/?q=party", f"/photo/{lib.ids['xss.jpg']}", "/?status="):
        html = client.get(url).text
        assert "<script>alert" not in html, url
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, url
        assert "&amp; cake" in html


def test_paging_works_without_javascript(lib: Library, tmp_path: Path) -> None:
    small = dataclasses.replace(lib, config=dataclasses.replace(
        lib.config, serve=dataclasses.replace(lib.config.serve, page_size=2)))
    with TestClient(create_app(_settings(small, tmp_path)), base_url=BASE) as client:
        first = client.get("/", params={"q": "jpg"}).text  # every path holds the word jpg
        assert 'rel="next" href="/?q=jpg&amp;page=2"' in first and 'rel="prev"' not in first
        second = client.get("/?q=jpg&page=2").text
        assert 'rel="prev" href="/?q=jpg&amp;page=1"' in second
        seen: list[str] = []
        for page in range(1, 5):
            seen += _ids(client.get(f"/?q=jpg&page={page}").text)
        servable = {"red.jpg", "grandma.jpg", "xss.jpg", "rotated.jpg", "broken.jpg"}
        assert sorted(seen) == sorted(str(lib.ids[n]) for n in servable)  # each once, over the pages
        assert 'rel="next"' not in client.get("/?q=jpg&page=4").text
        assert client.get("/?q=jpg&page=abc").status_code == 200  # a bad page number is page 1
        assert client.get("/?q=jpg&page=99999999999999999999").status_code == 200


def _ids(html: str) -> list[str]:
    import re

    return re.findall(r'href="/photo/(\d+)"', html)


def test_filters_by_source_folder_date_and_status(client: TestClient, lib: Library) -> None:
    human = _ids(client.get("/", params={"q": "jpg", "source": "human"}).text)
    assert sorted(human) == sorted(str(lib.ids[n]) for n in ("grandma.jpg", "xss.jpg"))
    below = _ids(client.get("/", params={"q": "jpg", "folder": str(lib.root / "sub")}).text)
    assert below == [str(lib.ids["grandma.jpg"])]
    dated = _ids(client.get("/", params={"q": "jpg", "since": "2021-06", "until": "2021-06"}).text)
    assert sorted(dated) == sorted(str(lib.ids[n]) for n in ("grandma.jpg", "xss.jpg"))
    pending = _ids(client.get("/", params={"status": "pending"}).text)
    assert str(lib.ids["rotated.jpg"]) in pending and str(lib.ids["red.jpg"]) not in pending
    failed = client.get("/", params={"status": "error"}).text
    assert _ids(failed) == [str(lib.ids["broken.jpg"])] and "<em>failed</em>" in failed
    # Without words: everything (that may be served), newest first.
    listing = _ids(client.get("/").text)
    assert str(lib.ids["red.jpg"]) in listing and str(lib.ids["escape.jpg"]) not in listing


# -- photo page and edits ---------------------------------------------------------------------------------------


def test_photo_page_shows_caption_source_path_and_preview(client: TestClient, lib: Library) -> None:
    red = lib.ids["red.jpg"]
    html = client.get(f"/photo/{red}").text
    assert RED_CAPTION in html and "vit-gpt2-tiny-greedy" in html and str(lib.path("red.jpg")) in html
    assert f'src="/preview/{red}"' in html and 'id="source">model' in html
    assert client.get(f"/photo/{lib.ids['grandma.jpg']}").text.count("Grandma&#39;s 80th birthday") >= 1


def test_edited_caption_lands_in_the_file_as_a_persons_words(client: TestClient, lib: Library,
                                                              run_cli: CliRunner) -> None:
    red = lib.ids["red.jpg"]
    before = exif_fields(lib.path("red.jpg"))
    assert before["XMP-capwatch:Source"] == "capwatch"
    token = csrf_of(client.get(f"/photo/{red}").text)
    answer = client.post(f"/photo/{red}/caption", data={"csrf": token, "caption": "  Anna's  red bike,\nsummer "})
    assert answer.status_code == 303 and answer.headers["location"] == f"/photo/{red}?done=saved"
    tags = exif_fields(lib.path("red.jpg"))
    assert tags["XMP-dc:Description"] == "Anna's red bike, summer"
    assert tags["IFD0:ImageDescription"] == "Anna's red bike, summer"
    assert not [k for k in tags if k.startswith("XMP-capwatch")], tags  # no provenance: a person's words
    row = _row(lib, "red.jpg")
    assert row.source == "human" and row.caption == "Anna's red bike, summer" and row.status == "described"
    page = client.get(answer.headers["location"]).text
    assert "Saved" in page and "human (a person's words" in page
    assert _ids(client.get("/", params={"q": "anna"}).text) == [str(red)]
    # capwatch itself never replaces it afterwards.
    data = lib.path("red.jpg").read_bytes()
    result = run_cli("--db", lib.config.index_path(), "--model", MODEL, "caption", "--json", lib.path("red.jpg"))
    assert result.code == 0, result.err
    assert '"written": []' in result.out and lib.path("red.jpg").read_bytes() == data


def test_edit_refuses_missing_or_wrong_csrf_foreign_origin_and_bad_bodies(client: TestClient, lib: Library) -> None:
    red = lib.ids["red.jpg"]
    original = lib.path("red.jpg").read_bytes()
    url = f"/photo/{red}/caption"
    assert client.post(url, data={"caption": "hacked"}).status_code == 403
    assert client.post(url, data={"caption": "hacked", "csrf": "wrong"}).status_code == 403
    assert client.post(url, data={"caption": "hacked", "csrf": CSRF},
                       headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.get(url).status_code == 405
    assert client.post(url, content=f"csrf={CSRF}&caption=x".encode(),
                       headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.post(url, data={"csrf": CSRF, "caption": "x" * (MAX_BODY + 10)}).status_code == 413

    def chunks() -> Iterator[bytes]:
        yield f"csrf={CSRF}&caption=".encode()
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"y" * 1024

    chunked = client.post(url, content=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert chunked.status_code == 413
    assert client.post(url, content=b"csrf=" + CSRF.encode() + b"&caption=%ff%fe",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 400
    assert client.post(url, data={"csrf": CSRF, "caption": "   "}).status_code == 422
    assert client.post(url, data={"csrf": CSRF, "caption": "z" * 2001}).status_code == 422
    assert client.post(f"/photo/{lib.ids['escape.jpg']}/caption", data={"csrf": CSRF, "caption": "x"}).status_code \
        == 404
    assert lib.path("red.jpg").read_bytes() == original
    assert not (lib.outside / "secret.jpg.xmp").exists()


def test_recaption_runs_the_model_but_keeps_a_persons_words(client: TestClient, lib: Library) -> None:
    red = lib.ids["red.jpg"]
    answer = client.post(f"/photo/{red}/recaption", data={"csrf": CSRF})
    assert answer.status_code == 303, answer.text
    row = _row(lib, "red.jpg")
    assert row.source == "model" and row.caption and row.caption != RED_CAPTION
    assert exif_fields(lib.path("red.jpg"))["XMP-dc:Description"] == row.caption
    grandma = lib.path("sub/grandma.jpg")
    before = grandma.read_bytes()
    kept = client.post(f"/photo/{lib.ids['grandma.jpg']}/recaption", data={"csrf": CSRF})
    assert kept.status_code == 303 and "Not captioned again" in client.get(kept.headers["location"]).text
    assert grandma.read_bytes() == before and _row(lib, "grandma.jpg").caption == GRANDMA
    assert client.post(f"/photo/{red}/recaption", data={"csrf": ""}).status_code == 403


# -- thumbnails -----------------------------------------------------------------------------------------------


def test_thumbnails_are_oriented_webp_cached_and_revalidated(client: TestClient, lib: Library,
                                                             tmp_path: Path) -> None:
    rotated = lib.ids["rotated.jpg"]
    first = client.get(f"/thumb/{rotated}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(first.content))
    assert image.format == "WEBP" and image.size == (30, 60)  # stored 60x30 with orientation 6
    etag = first.headers["etag"]
    assert "max-age" in first.headers["cache-control"]
    cached = list((tmp_path / "cache" / "thumbnails").rglob("*.webp"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = client.get(f"/thumb/{rotated}")
    assert again.content == first.content and cached[0].stat().st_mtime_ns == stamp
    not_modified = client.get(f"/thumb/{rotated}", headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not not_modified.content
    preview = client.get(f"/preview/{rotated}")
    assert preview.status_code == 200 and preview.headers["etag"] != etag
    assert client.get(f"/thumb/{lib.ids['broken.jpg']}").status_code == 415


def test_a_changed_photo_gets_a_new_thumbnail(client: TestClient, lib: Library) -> None:
    red = lib.ids["red.jpg"]
    etag = client.get(f"/thumb/{red}").headers["etag"]
    Image.new("RGB", (40, 40), (0, 0, 255)).save(lib.path("red.jpg"))
    os.utime(lib.path("red.jpg"), ns=(1, 2_000_000_000_000_000_000))
    fresh = client.get(f"/thumb/{red}", headers={"If-None-Match": etag})
    assert fresh.status_code == 200 and fresh.headers["etag"] != etag
    assert Image.open(io.BytesIO(fresh.content)).convert("RGB").getpixel((5, 5))[2] > 200


# -- what may be served -----------------------------------------------------------------------------------------


def test_only_indexed_files_below_a_root_are_served(client: TestClient, lib: Library) -> None:
    secret_bytes = (lib.outside / "secret.jpg").read_bytes()
    for row in ("escape.jpg", "stray.jpg"):  # a symlink out of the root; a row below no configured root
        for url in (f"/thumb/{lib.ids[row]}", f"/preview/{lib.ids[row]}", f"/photo/{lib.ids[row]}"):
            answer = client.get(url)
            assert answer.status_code == 404, url
    for url in ("/thumb/0", "/thumb/999999", "/thumb/-1", f"/thumb/{2**64}", "/thumb/1.0", "/photo/abc",
                "/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb/%2e%2e/%2e%2e/etc/passwd", "/thumb//etc/passwd",
                "/thumb/1%2F..%2F2", "/preview/%2Fetc%2Fpasswd", "/static/..%2F..%2Fweb%2Fapp.py",
                "/static/../app.py", "/static/%2e%2e/app.py", "/static//etc/passwd",
                f"/thumb/{lib.outside / 'secret.jpg'}", "/photo/1/../../../etc/passwd"):
        answer = client.get(url)
        assert answer.status_code in (404, 400), (url, answer.status_code)
        assert secret_bytes not in answer.content and b"root:" not in answer.content
        assert b"ServeSettings" not in answer.content
    assert client.get("/static/style.css").status_code == 200
    search = client.get("/", params={"q": "jpg"}).text
    assert f'/photo/{lib.ids["escape.jpg"]}"' not in search and f'/photo/{lib.ids["stray.jpg"]}"' not in search
    assert '<p class="empty" id="hidden">2 matches are not shown' in search


def test_a_loopback_server_answers_only_to_loopback_names(client: TestClient) -> None:
    assert client.get("/", headers={"Host": "evil.example:8765"}).status_code == 421
    assert client.get("/", headers={"Host": "localhost:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "[::1]:8765"}).status_code == 200
    answer = client.get("/")
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_a_server_with_a_token_lets_nobody_in_without_it(lib: Library, tmp_path: Path) -> None:
    token = AccessToken("t" * 43, tmp_path / "serve-token", created=False)
    app = create_app(_settings(lib, tmp_path, token=token, allowed_hosts=None))
    with TestClient(app, base_url="http://photos.lan:8765", follow_redirects=False) as client:
        assert client.get("/").status_code == 401
        assert client.get(f"/thumb/{lib.ids['red.jpg']}").status_code == 401
        assert client.get("/?token=" + "t" * 42 + "u").status_code == 401
        assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/", headers={"Authorization": "Bearer " + "t" * 43}).status_code == 200
        assert client.post(f"/photo/{lib.ids['red.jpg']}/caption",
                           data={"csrf": CSRF, "caption": "x"}).status_code == 401
        entry = client.get("/?q=red&token=" + "t" * 43)
        assert entry.status_code == 303 and entry.headers["location"] == "/?q=red"
        assert "httponly" in entry.headers["set-cookie"].lower() and "samesite=strict" in \
            entry.headers["set-cookie"].lower()
        assert client.get("/?q=red").status_code == 200  # the cookie now


def test_the_token_file_is_made_once_private_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    made = load_or_create_token(state)
    assert made.created and (made.path.stat().st_mode & 0o777) == 0o600 and len(made.value) >= 40
    again = load_or_create_token(state)
    assert not again.created and again.value == made.value
    assert again.matches(made.value) and not again.matches(made.value[:-1]) and not again.matches(None)
    made.path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_token(state)
    made.path.unlink()
    made.path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError):
        load_or_create_token(state)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("::", False),
                                                ("192.168.1.5", False), ("photos.lan", False)])
def test_which_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# -- status ---------------------------------------------------------------------------------------------------


def test_status_page_shows_counts_errors_and_the_daemon_and_refreshes_itself(lib: Library, tmp_path: Path) -> None:
    with TestClient(create_app(_settings(lib, tmp_path)), base_url=BASE) as client:
        html = client.get("/status").text
        assert '<meta http-equiv="refresh"' in html and "not running" in html
        assert 'id="images">7<' in html and 'id="errors">1<' in html and "broken.jpg" in html
    live = {"pid": 4242, "started": "2026-01-01T00:00:00", "state": "watching", "queue": 3, "backfill_total": 10,
            "backfill_done": 4, "rate_per_minute": 6.5, "model_status": "loaded", "model": "vit-gpt2-tiny"}
    app = create_app(_settings(lib, tmp_path, live_state=lambda: live))
    with TestClient(app, base_url=BASE) as client:
        html = client.get("/status").text
        assert "pid 4242" in html and "4 / 10" in html and "6.5 images/min" in html and "vit-gpt2-tiny" in html


# -- the command ----------------------------------------------------------------------------------------------


def _config_file(lib: Library, tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[library]\nroots = ["{lib.root}"]\n[index]\npath = "{lib.config.index_path()}"\n')
    return path


def test_serve_prints_its_address_with_the_token_at_every_start(lib: Library, tmp_path: Path,
                                                                  run_cli: CliRunner) -> None:
    config = _config_file(lib, tmp_path)
    tokens = []
    for host in ("127.0.0.1", "0.0.0.0"):
        with serving(tmp_path, config, "--host", host) as server:
            tokens.append(server.token)
            assert server.first_line.startswith(f"capwatch: serving http://{host}:{server.port}/?token=")
    value = token_file(tmp_path).read_text().strip()
    assert tokens == [value, value] and (token_file(tmp_path).stat().st_mode & 0o777) == 0o600
    token_file(tmp_path).chmod(0o640)
    refused = run_cli("--config", config, "serve", "--host", "0.0.0.0", "--port", "0", timeout=30)
    assert refused.code == 2 and len(refused.err_lines) == 1 and "readable by others" in refused.err


def test_serve_bad_setups_are_one_line_errors(lib: Library, tmp_path: Path, run_cli: CliRunner) -> None:
    missing = run_cli("--db", tmp_path / "none.db", "serve", "--port", "0", timeout=30)
    assert missing.code == 2 and len(missing.err_lines) == 1 and "no index" in missing.err
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        taken = run_cli("--config", _config_file(lib, tmp_path), "serve", "--port", port, timeout=30)
    assert taken.code == 2 and len(taken.err_lines) == 1 and "cannot listen" in taken.err
    bad = run_cli("--db", lib.config.index_path(), "serve", "--port", "70000", timeout=30)
    assert bad.code == 2 and "Traceback" not in bad.err


def test_the_page_can_run_inside_the_daemon(lib: Library, tmp_path: Path) -> None:
    import signal

    config = _config_file(lib, tmp_path)
    config.write_text(config.read_text() + "[serve]\nin_daemon = true\nport = 0\n")
    server = start_serve(tmp_path, config, command=("watch", "--no-caption"))
    try:
        # Inside the daemon (whose output is a log) the token is not printed, only where to get it.
        assert "?token=" not in server.first_line and "--print-url" in server.first_line
        assert server.token and server.token not in server.first_line
        assert server.get("/?q=bicycle", token=False).status == 401
        page = server.get("/?q=bicycle").text
        assert "<mark>bicycle</mark>" in page
        status = server.get("/status").text
        assert "not running" not in status  # the page sees the daemon it runs in
    finally:
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=30)
    assert code == 0


def test_a_missing_index_is_a_message_not_a_500(lib: Library, tmp_path: Path) -> None:
    gone = dataclasses.replace(lib, config=dataclasses.replace(
        lib.config, index=dataclasses.replace(lib.config.index, path=tmp_path / "absent.db")))
    with TestClient(create_app(_settings(gone, tmp_path)), base_url=BASE) as client:
        for url in ("/", "/?q=cat", "/photo/1", "/thumb/1", "/status"):
            answer = client.get(url)
            assert answer.status_code in (200, 503), (url, answer.status_code)
            assert "Traceback" not in answer.text
        assert "no index" in client.get("/photo/1").text


def test_raw_and_heic_thumbnails_come_through_capwatchs_decoders(lib: Library, tmp_path: Path) -> None:
    from tests.test_raw_heif_decoding import _jpeg, tiff_raw_with_preview

    raw = lib.root / "IMG_0001.CR2"
    raw.write_bytes(tiff_raw_with_preview(_jpeg((120, 80), (200, 20, 20)), orientation=6))
    names = ["IMG_0001.CR2"]
    pillow_heif = pytest.importorskip("pillow_heif")
    try:
        pillow_heif.from_pillow(Image.new("RGB", (64, 48), (30, 160, 60))).save(lib.root / "phone.heic", quality=90)
        names.append("phone.heic")
    except (OSError, KeyError, ValueError):  # a pillow-heif build without an HEVC encoder: RAW only
        pass
    from capwatch.library.scan import reconcile

    with Index.open(lib.config.index_path()) as index:
        reconcile(lib.config.library.roots[0], lib.config, index)
        ids = index.ids_for(str(lib.root / n) for n in names)
    with TestClient(create_app(_settings(lib, tmp_path)), base_url=BASE) as client:
        thumb = client.get(f"/thumb/{ids[str(raw)]}")
        assert thumb.status_code == 200
        image = Image.open(io.BytesIO(thumb.content)).convert("RGB")
        assert image.size == (80, 120)  # the RAW's orientation 6 applied to its preview
        assert image.getpixel((70, 5)) == pytest.approx((255, 255, 255), abs=30)  # white corner now top right
        if "phone.heic" in names:
            heic = client.get(f"/thumb/{ids[str(lib.root / 'phone.heic')]}")
            assert heic.status_code == 200 and Image.open(io.BytesIO(heic.content)).size == (64, 48)


@pytest.mark.parametrize(("text", "html"), [
    ("a \ue000red\ue001 bike", "a <mark>red</mark> bike"),
    ("<b>\ue000x\ue001</b> & y", "&lt;b&gt;<mark>x</mark>&lt;/b&gt; &amp; y"),
    ("stray \ue001 close", "stray  close"),
    ("open \ue000 never closed", "open <mark> never closed</mark>"),
    ("", ""),
])
def test_highlight_marks_become_mark_tags_around_escaped_text(text: str, html: str) -> None:
    from capwatch.web.routes import marked

    assert str(marked(text)) == html


@pytest.mark.parametrize(("typed", "stored"), [
    ("  two  words \n", "two words"),
    ("tab\there\x00nul", "tab here nul"),
    ("cafe\u0301", "caf\u00e9"),  # NFC
])
def test_a_persons_caption_is_cleaned_like_every_caption(typed: str, stored: str) -> None:
    from capwatch.web.editing import clean_person_caption

    assert clean_person_caption(typed) == stored


def test_keywords_and_text_in_the_image_show_on_the_photo_page_and_explain_a_hit(
        client: TestClient, lib: Library) -> None:
    with Index.open(lib.config.index_path()) as index:
        red = index.get(lib.path("red.jpg"))
        assert red is not None
        index.upsert(dataclasses.replace(red, keywords=("Barn", "tractor"), model_keywords=("tractor",),
                                         ocr_text="FARM SHOP\nOPEN <8>"))
    photo = client.get(f"/photo/{lib.ids['red.jpg']}").text
    assert '<span class="keyword" title="a person\'s">Barn</span>' in photo
    assert '<span class="keyword ours" title="from the model">tractor</span>' in photo
    assert "FARM SHOP\nOPEN &lt;8&gt;" in photo  # text as text, escaped
    grid = client.get("/", params={"q": "kw:tractors"}).text
    assert f'href="/photo/{lib.ids["red.jpg"]}"' in grid
    assert '<span class="why">keywords: Barn, <mark>tractor</mark></span>' in grid
    grid = client.get("/", params={"q": "text:shop"}).text
    assert '<span class="why">text in image: FARM <mark>SHOP</mark> OPEN &lt;8&gt;</span>' in grid


def test_search_results_by_date_newest_first(client: TestClient, lib: Library) -> None:
    with Index.open(lib.config.index_path()) as index:
        for name, taken in (("red.jpg", "2019-05-01T10:00:00"), ("xss.jpg", "2023-01-01T10:00:00")):
            row = index.get(lib.path(name))
            assert row is not None
            index.upsert(dataclasses.replace(row, caption=f"a shared word {name}", taken_at=taken))
    newest = client.get("/", params={"q": "shared", "sort": "date"}).text
    ranked = client.get("/", params={"q": "shared"}).text
    first, second = f'/photo/{lib.ids["xss.jpg"]}"', f'/photo/{lib.ids["red.jpg"]}"'
    assert newest.index(first) < newest.index(second)
    assert 'value="date" selected' in newest and "sort=date" not in ranked
    assert first in ranked and second in ranked
