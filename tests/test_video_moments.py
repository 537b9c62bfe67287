"""Issue 23: a video's moments in search by meaning. Schema 9 (made from 8, killed midway), each chosen frame of a
video embedded by every path that embeds, a search that hits a moment (``"at"`` in JSON) with a video collapsed to
one hit, ``similar``/``duplicates`` that never pair a video with its own frames, and the frame cache passed in.

Videos are made by ffmpeg in the run; embeddings by the tiny SigLIP fixture (random weights: what a test can rely
on is that different pictures give different vectors, and that capwatch's vectors equal the embedder's own)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from migration_helpers import open_killed_in_migration
from PIL import Image
from video_helpers import EXIFTOOL, FFMPEG, scenes_video

from capwatch.config import Config, EmbedConfig
from capwatch.library.index import ImageRecord, Index
from capwatch.library.meaning import QueryVector
from capwatch.library.meaning import search as meaning_search
from capwatch.library.migrations import SCHEMA_VERSION
from capwatch.library.moments import VideoMoments, nearest_assets
from capwatch.library.search import SearchFilters, make_filters, parse_query
from capwatch.library.vectors import Vectors
from tests.conftest import CliRunner

pytest.importorskip("av")
pytestmark = pytest.mark.skipif(not (FFMPEG and EXIFTOOL), reason="ffmpeg makes the videos, exiftool reads them")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
CAPTIONER = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
EMBEDDER = FIXTURES / "models" / "siglip-tiny"


def _rec(path: str, **kw: object) -> ImageRecord:
    base: dict[str, object] = {"size": 1, "mtime_ns": 1_600_000_000 * 10**9, "status": "captioned",
                               "fingerprint": f"fp-{path}", "caption": "something"}
    base.update(kw)
    return ImageRecord(path=path, **base)  # type: ignore[arg-type]


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _moments(db: Path) -> dict[str, tuple[float | None, list[tuple[float, np.ndarray]]]]:
    """path -> (poster's time, [(time, vector)] of the other frames) for every embedded row."""
    conn = sqlite3.connect(db)
    out: dict[str, tuple[float | None, list[tuple[float, np.ndarray]]]] = {}
    for image_id, path, at in conn.execute(
            "SELECT v.image_id, i.path, v.at FROM image_vectors AS v JOIN images AS i ON i.id = v.image_id"):
        frames = [(float(t), np.frombuffer(blob, dtype=np.float32)) for t, blob in conn.execute(
            "SELECT at, vector FROM frame_vectors WHERE image_id = ? ORDER BY at", (image_id,))]
        out[path] = (at, frames)
    conn.close()
    return out


@pytest.fixture
def index(tmp_path: Path) -> Index:
    ix = Index.open(tmp_path / "i.db")
    yield ix
    ix.close()


# -- schema 9 ---------------------------------------------------------------------------------------------------


def test_a_new_index_has_schema_9_with_moments_and_live_photo_pairs(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        assert index.schema_version() == SCHEMA_VERSION >= 9
    conn = sqlite3.connect(tmp_path / "i.db")
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"frame_vectors", "live_pairs", "frame_vectors_image_gone", "frame_vectors_insert"} <= names
    assert "at" in {r[1] for r in conn.execute("PRAGMA table_info(image_vectors)")}
    assert "frames" in {r[1] for r in conn.execute("PRAGMA table_info(vector_models)")}


def _schema_8_with_vectors(db: Path, videos: int = 3, photos: int = 300) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    Index(conn, db, 1.0).migrate(target=8)
    conn.execute("PRAGMA journal_mode = WAL")
    names = [f"/lib/{i:04d}.jpg" for i in range(photos)] + [f"/lib/clip{i}.{s}" for i, s in
                                                              zip(range(videos), ("mp4", "MOV", "m4v"), strict=False)]
    conn.executemany("INSERT INTO images (path, size, mtime_ns, sort_date, caption, status, updated_at, fingerprint) "
                     "VALUES (?, 1, 1, '2020-01-01T00:00:00', 'harbour with boats', 'captioned', 'x', 'fp')",
                     ((n,) for n in names))
    conn.execute("INSERT INTO vector_models (model, dim) VALUES ('m', 2)")
    conn.execute("INSERT INTO image_vectors (image_id, model, fingerprint, vector) "
                 "SELECT id, 'm', 'fp', ? FROM images", (np.array([1, 0], dtype="<f4").tobytes(),))
    conn.close()


def test_an_upgrade_from_8_has_videos_embedded_again_with_their_moments_and_keeps_photos(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    _schema_8_with_vectors(db)
    with Index.open(db) as index:
        assert index.schema_version() == SCHEMA_VERSION
        vectors = Vectors(index)
        # The videos' vectors (their poster only) are stale: the next scan's fill-in embeds them with moments.
        assert [p for p, _ in vectors.missing("m")] == ["/lib/clip0.mp4", "/lib/clip1.MOV", "/lib/clip2.m4v"]
        assert vectors.count("m") == 303  # still searchable meanwhile


@pytest.mark.parametrize("stop_after", [1, 5, 99])
def test_migration_9_killed_midway_leaves_schema_8_whole_and_runs_again(tmp_path: Path, stop_after: int) -> None:
    db = tmp_path / "index.db"
    _schema_8_with_vectors(db)
    assert open_killed_in_migration(db, 9, stop_after) == -9  # it really died inside migration 9
    check = sqlite3.connect(db)
    assert check.execute("SELECT max(version) FROM capwatch_migrations").fetchone()[0] == 8
    names = {r[0] for r in check.execute("SELECT name FROM sqlite_master")}
    assert not names & {"frame_vectors", "live_pairs", "frame_vectors_image_gone"}
    assert "at" not in {r[1] for r in check.execute("PRAGMA table_info(image_vectors)")}
    assert check.execute("SELECT count(*) FROM image_vectors WHERE fingerprint IS NULL").fetchone()[0] == 0
    check.close()
    with Index.open(db) as index:
        assert index.schema_version() == SCHEMA_VERSION
        assert len(Vectors(index).missing("m")) == 3
        assert len(index.search(parse_query("boat"), SearchFilters(), limit=3)) == 3


# -- the search over moments (constructed vectors) --------------------------------------------------------------


def _library_with_a_video(index: Index, dim: int = 32, photos: int = 200, seed: int = 3
                          ) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """Photos with random vectors under /lib/photos, one video /lib/videos/clip.mp4 whose poster (at 1.0 s) and two
    other moments (3.0 s, 6.0 s) point elsewhere. Returns the poster's vector and the moments' by time."""
    rng = np.random.default_rng(seed)
    index.upsert_many([_rec(f"/lib/photos/{i:03d}.jpg") for i in range(photos)] + [_rec("/lib/videos/clip.mp4")])
    vectors = Vectors(index)
    vectors.put_many([(f"/lib/photos/{i:03d}.jpg", "m", f"fp-/lib/photos/{i:03d}.jpg", rng.standard_normal(dim))
                      for i in range(photos)])
    poster = _unit(rng.standard_normal(dim))
    moments = {3.0: _unit(rng.standard_normal(dim)), 6.0: _unit(rng.standard_normal(dim))}
    vectors.put_many([("/lib/videos/clip.mp4", "m", "fp-/lib/videos/clip.mp4", poster)],
                     {"/lib/videos/clip.mp4": VideoMoments(1.0, tuple(moments.items()))})
    return poster, moments


def test_a_search_by_meaning_hits_a_videos_moment_and_says_when_it_is(index: Index) -> None:
    poster, moments = _library_with_a_video(index)
    query = parse_query("waves")
    for at, vector in [(1.0, poster), *moments.items()]:
        hits = meaning_search(index, query, SearchFilters(), by="meaning", vector=QueryVector("m", vector), limit=10)
        assert hits[0].path == "/lib/videos/clip.mp4" and hits[0].at == at
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)
        # One video, one hit (its other moments do not come back as hits of their own); photos have no moment.
        assert [h.path for h in hits].count("/lib/videos/clip.mp4") == 1 and len(hits) == 10
        assert all(h.at is None for h in hits[1:])


def test_a_video_with_one_usable_frame_is_found_at_its_posters_time(index: Index) -> None:
    # A short or dark clip may keep a single frame: no moments besides its poster, still a moment to give.
    rng = np.random.default_rng(9)
    index.upsert_many([_rec("/lib/a.jpg"), _rec("/lib/short.mov")])
    Vectors(index).put_many([("/lib/a.jpg", "m", None, rng.standard_normal(8))])
    poster = _unit(rng.standard_normal(8))
    Vectors(index).put_many([("/lib/short.mov", "m", None, poster)], {"/lib/short.mov": VideoMoments(0.75)})
    hits = meaning_search(index, parse_query("dusk"), SearchFilters(), by="meaning", vector=QueryVector("m", poster))
    assert [(h.path, h.at) for h in hits] == [("/lib/short.mov", 0.75), ("/lib/a.jpg", None)]


def test_a_videos_moments_fill_no_places_of_other_hits(index: Index) -> None:
    _, moments = _library_with_a_video(index, photos=5)
    # Every entry asked for: 6 assets, however many entries the video holds.
    hits = nearest_assets(Vectors(index), index, "m", moments[6.0], limit=6)
    assert len(hits) == 6 and len({h.image_id for h in hits}) == 6


def test_steady_videos_whose_every_moment_matches_still_give_as_many_assets_as_asked(index: Index) -> None:
    rng = np.random.default_rng(5)
    query = _unit(rng.standard_normal(16))
    index.upsert_many([_rec(f"/lib/v{i}.mp4") for i in range(6)] + [_rec(f"/lib/p{i}.jpg") for i in range(30)])
    vectors = Vectors(index)
    vectors.put_many([(f"/lib/p{i}.jpg", "m", None, rng.standard_normal(16)) for i in range(30)])
    for i in range(6):
        near = [_unit(query + 0.05 * rng.standard_normal(16)) for _ in range(3)]
        vectors.put_many([(f"/lib/v{i}.mp4", "m", None, near[0])],
                         {f"/lib/v{i}.mp4": VideoMoments(0.0, ((1.0, near[1]), (2.0, near[2])))})
    ids = index.ids_for([f"/lib/v{i}.mp4" for i in range(6)])
    hits = nearest_assets(vectors, index, "m", query, limit=5)
    assert len(hits) == 5 and {h.image_id for h in hits} <= set(ids.values())
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)


def test_filters_and_exclusions_apply_to_the_video_a_moment_belongs_to(index: Index) -> None:
    _, moments = _library_with_a_video(index)
    outside = make_filters(in_dir="/lib/photos")
    hits = meaning_search(index, parse_query("waves"), outside, by="meaning", vector=QueryVector("m", moments[3.0]))
    assert hits and all(h.path.startswith("/lib/photos/") for h in hits)
    own = index.ids_for(["/lib/videos/clip.mp4"])["/lib/videos/clip.mp4"]
    near = nearest_assets(Vectors(index), index, "m", moments[3.0], limit=20, exclude=[own])
    assert own not in {h.image_id for h in near} and len(near) == 20


def test_a_videos_moments_are_replaced_with_it_and_go_with_its_row(index: Index) -> None:
    _, moments = _library_with_a_video(index, photos=80)
    vectors = Vectors(index)
    conn = index.connection
    assert conn.execute("SELECT count(*) FROM frame_vectors").fetchone()[0] == 2
    fresh = _unit(np.ones(32))
    vectors.put_many([("/lib/videos/clip.mp4", "m", "fp2", fresh)],
                     {"/lib/videos/clip.mp4": VideoMoments(0.5, ((2.5, -fresh),))})
    assert conn.execute("SELECT at FROM frame_vectors").fetchall() == [(2.5,)]
    assert conn.execute("SELECT frames FROM vector_models WHERE model = 'm'").fetchone()[0] == 1
    with index.transaction():
        vectors.rebuild_blocks("m")  # the blocks rebuilt from the tables keep the moment
    hit = nearest_assets(vectors, index, "m", -fresh, limit=1)[0]
    assert hit.at == 2.5 and hit.similarity == pytest.approx(1.0, abs=1e-5)
    # The old moments are never found again.
    assert nearest_assets(vectors, index, "m", moments[6.0], limit=1)[0].at != 6.0
    index.remove("/lib/videos/clip.mp4")
    assert conn.execute("SELECT count(*) FROM frame_vectors").fetchone()[0] == 0
    assert conn.execute("SELECT frames FROM vector_models WHERE model = 'm'").fetchone()[0] == 0


# -- real videos through the CLI --------------------------------------------------------------------------------


@pytest.fixture
def env() -> dict[str, str]:
    return {"CAPWATCH_EMBED_MODEL": str(EMBEDDER), "CAPWATCH_MODEL": str(CAPTIONER)}


def _embedder():  # type: ignore[no-untyped-def]
    from capwatch.models.embedding import open_embedder

    return open_embedder(Config(embed=EmbedConfig(model=str(EMBEDDER), precision="fp32")), {})


def test_scan_embeds_each_chosen_frame_and_search_json_gives_the_best_moment(run_cli: CliRunner, tmp_path: Path,
                                                                             env: dict[str, str]) -> None:
    from capwatch.models.frames import choose_frames

    lib = tmp_path / "lib"
    lib.mkdir()
    video = scenes_video(lib / "clip.mp4")
    Image.new("RGB", (64, 48), (200, 40, 40)).save(lib / "red.png")
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "scan", lib, env=env)
    assert result.code == 0, result.err
    chosen = choose_frames(video).chosen
    assert len(chosen) == 3
    embedder = _embedder()
    want = embedder.embed_images([f.image for f in chosen])
    stored = _moments(db)
    poster_at, frames = stored[str(video)]
    assert poster_at == pytest.approx(chosen[0].at)
    assert [t for t, _ in frames] == pytest.approx([f.at for f in chosen[1:]])
    for (_, got), expected in zip(frames, want[1:], strict=True):
        assert float(got @ expected) > 1 - 1e-5
    assert stored[str(lib / "red.png")] == (None, [])
    # The moment given is the frame whose embedding is nearest the query's.
    for words in ("a test pattern", "colour bars on a screen", "a fractal"):
        found = run_cli("--db", db, "search", words, "--by", "meaning", "--json", env=env)
        assert found.code == 0, found.err
        hits = {h["path"]: h for h in map(json.loads, found.out.splitlines())}
        sims = want @ embedder.embed_texts([words])[0]
        assert hits[str(video)]["at"] == pytest.approx(chosen[int(np.argmax(sims))].at, abs=1e-3)
        assert hits[str(video)]["similarity"] == pytest.approx(float(sims.max()), abs=1e-4)
        assert hits[str(lib / "red.png")]["at"] is None
    # The text output says where in the video.
    best = hits[str(video)]["at"]
    shown = run_cli("--db", db, "search", words, "--by", "meaning", env=env).out
    assert f"{video}  (video)" in shown and f") at {int(best) // 60}:{int(best) % 60:02d}\n" in shown, shown
    # A hit by words alone has no moment.
    words = run_cli("--db", db, "search", "path:clip", "--by", "words", "--json", env=env)
    assert json.loads(words.out.splitlines()[0])["at"] is None


def test_caption_recaption_and_the_scans_fill_in_embed_a_videos_moments(run_cli: CliRunner, tmp_path: Path,
                                                                        env: dict[str, str]) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    first = scenes_video(lib / "one.mp4")
    second = scenes_video(lib / "two.mov", "smptebars", "testsrc", "rgbtestsrc")
    db = tmp_path / "index.db"
    # `caption FILE` embeds the moments.
    assert run_cli("--db", db, "caption", first, env=env).code == 0
    assert len(_moments(db)[str(first)][1]) == 2
    # A library captioned without embeddings gets its moments from the scan's fill-in, not captioned again.
    off = run_cli("--db", db, "scan", lib, env={**env, "CAPWATCH_EMBED_MODEL": "off"})
    assert off.code == 0, off.err
    assert str(second) not in _moments(db)
    filled = run_cli("--db", db, "scan", lib, env=env)
    assert filled.code == 0 and "1 embedded" in filled.out, filled.out
    assert len(_moments(db)[str(second)][1]) == 2
    # recaption replaces them (never doubles them).
    again = run_cli("--db", db, "recaption", "--before", "2100-01-01", lib, env=env)
    assert again.code == 0, again.err
    after = _moments(db)
    assert {p: len(f) for p, (_, f) in after.items()} == {str(first): 2, str(second): 2}
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT frames FROM vector_models").fetchone()[0] == 4
    conn.close()


def test_similar_and_duplicates_never_pair_a_video_with_its_own_frames(run_cli: CliRunner, tmp_path: Path,
                                                                       env: dict[str, str]) -> None:
    from capwatch.models.frames import choose_frames

    lib = tmp_path / "lib"
    lib.mkdir()
    # One scene all along: its frames are near-identical to each other.
    steady = scenes_video(lib / "steady.mp4", "testsrc2", seconds=4)
    other = scenes_video(lib / "other.mp4")
    # A still of one of `other`'s moments (not its poster).
    moment = choose_frames(other).chosen[2]
    moment.image.save(lib / "still.png")
    db = tmp_path / "index.db"
    assert run_cli("--db", db, "scan", lib, env=env).code == 0
    assert len(_moments(db)[str(steady)][1]) == 2
    alike = run_cli("--db", db, "similar", steady, "--json", env=env)
    assert alike.code == 0, alike.err
    paths = [json.loads(line)["path"] for line in alike.out.splitlines()]
    assert str(steady) not in paths and sorted(paths) == sorted([str(other), str(lib / "still.png")])
    # The still finds the video once, through the moment it shows.
    near = run_cli("--db", db, "similar", lib / "still.png", "--json", env=env)
    hits = [json.loads(line) for line in near.out.splitlines()]
    assert [h["path"] for h in hits].count(str(other)) == 1
    assert hits[0]["path"] == str(other) and hits[0]["similarity"] > 0.999
    groups = run_cli("--db", db, "duplicates", "--threshold", "0.999", "--json", env=env)
    assert groups.code == 0, groups.err
    found = [json.loads(line)["paths"] for line in groups.out.splitlines()]
    assert all(len(set(g)) == len(g) > 1 for g in found)
    assert all(str(steady) not in g for g in found)


def test_the_frames_module_keeps_no_cache_of_its_own() -> None:
    from capwatch.models import frames

    # Decoded frames are cached by whoever processes files, passed in (no module-level state).
    assert not [name for name, value in vars(frames).items() if isinstance(value, frames.FrameCache)]


def test_a_scan_of_videos_says_so_in_its_summary(run_cli: CliRunner, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    scenes_video(lib / "clip.mp4")
    Image.new("RGB", (64, 48), (20, 40, 200)).save(lib / "blue.png")
    result = run_cli("--db", tmp_path / "index.db", "--model", CAPTIONER, "scan", "--no-caption", lib)
    assert result.code == 0, result.err
    assert result.out.startswith("2 files (1 video): 2 new, 0 changed"), result.out
    photos = tmp_path / "photos"
    shutil.copytree(lib, photos, ignore=shutil.ignore_patterns("*.mp4"))
    plain = run_cli("--db", tmp_path / "other.db", "--model", CAPTIONER, "scan", "--no-caption", photos)
    assert plain.out.startswith("1 images: 1 new"), plain.out


@pytest.mark.timeout(240)
def test_the_daemon_embeds_a_new_videos_moments_and_answers_searches_with_them(run_cli: CliRunner,
                                                                               tmp_path: Path) -> None:
    from daemon_helpers import start_daemon, stop_daemon, wait_until
    from daemon_helpers import write_config as daemon_config

    from capwatch.daemon.textserver import ask
    from capwatch.models.frames import choose_frames

    lib = tmp_path / "lib"
    lib.mkdir()
    db = tmp_path / "index.db"
    config = daemon_config(tmp_path / "config.toml", db=db, roots=[lib], model_dir=CAPTIONER,
                           extra=f'\n[embed]\nmodel = "{EMBEDDER}"\n')
    daemon = start_daemon(config)
    try:
        source = scenes_video(tmp_path / "clip.mp4")
        shutil.copy(source, lib / "new.mp4")
        video = lib / "new.mp4"
        def embedded() -> bool:
            try:
                return len(_moments(db).get(str(video), (None, []))[1]) == 2
            except sqlite3.OperationalError:  # the daemon is still making the index
                return False

        wait_until(embedded, timeout=180, what="the daemon embedding the video's moments")
        wait_until(lambda: ask(db, "a test", nearest=5) is not None, timeout=60, what="the daemon's query socket")
        # The search is answered from the daemon's codes (moments included) and gives the best moment.
        chosen = choose_frames(video).chosen
        embedder = _embedder()
        words = "colour bars on a screen"
        sims = embedder.embed_images([f.image for f in chosen]) @ embedder.embed_texts([words])[0]
        found = run_cli("--config", config, "search", words, "--by", "meaning", "--json")
        assert found.code == 0, found.err
        (hit,) = [json.loads(line) for line in found.out.splitlines()]
        assert hit["path"] == str(video) and hit["at"] == pytest.approx(chosen[int(np.argmax(sims))].at, abs=1e-3)
    finally:
        stop_daemon(daemon)


def test_keywords_filled_in_later_for_a_video_are_merged_over_its_frames_as_a_caption_makes_them(
        run_cli: CliRunner, tmp_path: Path) -> None:
    florence = FIXTURES / "models" / "florence2-tiny"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    scenes_video(fresh / "clip.mp4", "smptebars", "testsrc2", "rgbtestsrc")
    later = tmp_path / "later"
    shutil.copytree(fresh, later)
    on = tmp_path / "on.toml"
    on.write_text('[model]\nkeywords = true\n[ocr]\nengine = "florence"\n')
    off = tmp_path / "off.toml"
    off.write_text('[model]\nkeywords = false\n[ocr]\nengine = "off"\n')
    assert run_cli("--config", on, "--db", tmp_path / "fresh.db", "--model", florence, "scan", fresh).code == 0
    assert run_cli("--config", off, "--db", tmp_path / "later.db", "--model", florence, "scan", later).code == 0
    filled = run_cli("--config", on, "--db", tmp_path / "later.db", "--model", florence, "scan", later)
    assert filled.code == 0 and "1 filled in" in filled.out, filled.out

    def found(db: Path, root: Path) -> tuple[object, ...]:
        with Index.open(db, readonly=True) as index:
            (row,) = list(index.iter_records(root))
        return row.keywords, row.ocr_text

    assert found(tmp_path / "later.db", later) == found(tmp_path / "fresh.db", fresh)
    assert found(tmp_path / "fresh.db", fresh)[0]


def test_each_video_of_a_batch_is_decoded_once_for_caption_keywords_text_and_moments(tmp_path: Path) -> None:
    import dataclasses

    from capwatch.config import ModelConfig, OcrConfig
    from capwatch.library.process import Processor
    from capwatch.models.captioner import open_captioner

    florence = FIXTURES / "models" / "florence2-tiny"
    lib = tmp_path / "lib"
    lib.mkdir()
    sources = ("testsrc", "smptebars", "rgbtestsrc", "testsrc2", "yuvtestsrc")
    videos = [scenes_video(lib / f"v{i}.mp4", *sources[i:], *sources[:i], seconds=0.75) for i in range(5)]
    config = Config(model=ModelConfig(dir=florence, precision="fp32", keywords=True, batch_size=8),
                    embed=EmbedConfig(model=str(EMBEDDER), precision="fp32"), ocr=OcrConfig(engine="florence"))
    config = dataclasses.replace(config, index=dataclasses.replace(config.index, path=tmp_path / "index.db"))
    with Index.open(tmp_path / "index.db") as index, open_captioner(florence, config.model) as captioner:
        processor = Processor(config, index, captioner, embedder=_embedder())
        try:
            outcomes = processor.process_batch(videos)
        finally:
            processor.close()
        assert [o.error for o in outcomes] == [None] * 5
        assert processor.frames.decoded == 5
        assert index.connection.execute("SELECT count(*) FROM frame_vectors").fetchone()[0] == 10
