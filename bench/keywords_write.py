"""What writing keywords (and OCR text) with a caption costs: write_caption with keywords vs the caption alone.

    python bench/keywords_write.py                 # 100 JPEGs of ~1 MB, 3 rounds
    python bench/keywords_write.py --files 200 --rounds 5 --person-keywords 2000

Corpus: random-noise JPEGs (~1 MB) given by ONE exiftool run a person's metadata: EXIF, IPTC (so the IPTC path with
its digest runs) and XMP with ``--person-keywords`` keywords in both dc:subject and IPTC Keywords (default 1000:
the merge must keep them all). Each contender starts from a fresh copy (not timed) and writes every file:

* caption            write_caption(caption) -- the anchor;
* caption+keywords   write_caption(caption, keywords=12 keywords) -- merged into dc:subject and IPTC 2:25;
* +keywords+text     the same plus 200 characters of OCR text (``write_text = true``);
* re-caption         a second caption + other keywords over the files written by caption+keywords (ours replaced).

The best of ``--rounds`` rounds is reported per contender as ms/file and as a ratio to the anchor.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capwatch.config import MetadataConfig  # noqa: E402
from capwatch.metadata import Journal, Provenance, write_caption  # noqa: E402

WORK = REPO / "bench" / "_work" / "keywords"
CAPTION = "a dog running on a sandy beach next to the ocean at sunset"
PROV = Provenance("onnx-community/Florence-2-base-ft", "bench", "2026-01-01T00:00:00Z")
LATER = Provenance("onnx-community/Florence-2-base-ft", "bench2", "2026-02-01T00:00:00Z")
KEYWORDS = ["dog", "beach", "sand", "ocean", "sunset", "wave", "sky", "person", "footprint", "cloud", "shore", "bird"]
OTHER = ["cat", "wall", "garden", "flower", "tree", "fence", "sun", "grass", "window", "roof", "pot", "leaf"]
TEXT = "EXIT 12  Gleis 3  Bahnhofstraße 7  OPEN 9-17  " * 4


def build_master(count: int, person_keywords: int) -> list[Path]:
    master = WORK / f"master-{count}-{person_keywords}"
    files = [master / f"IMG_{i:04d}.JPG" for i in range(count)]
    if all(f.exists() for f in files):
        return files
    shutil.rmtree(master, ignore_errors=True)
    master.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = master / "_base.jpg"
    Image.fromarray(rng.integers(0, 256, size=(700, 1000, 3), dtype=np.uint8), "RGB").save(base, "JPEG", quality=95)
    for f in files:
        shutil.copyfile(base, f)
    base.unlink()
    person = ",".join(f"person keyword {i:05d}" for i in range(person_keywords))
    subprocess.run(["exiftool", "-q", "-q", "-overwrite_original", "-m", "-charset", "iptc=UTF8", "-sep", ",",
                    "-Make=Canon", "-IPTC:City=Zürich", "-XMP-dc:Subject=" + person, "-IPTC:Keywords=" + person,
                    *map(str, files)], check=True)
    return files


def fresh(files: list[Path], name: str) -> list[Path]:
    target = WORK / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    out = []
    for f in files:
        shutil.copyfile(f, target / f.name)
        out.append(target / f.name)
    return out


def timed(files: list[Path], write: Callable[[Path], object]) -> float:
    start = time.perf_counter()
    for f in files:
        write(f)
    return (time.perf_counter() - start) / len(files) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--person-keywords", type=int, default=1000)
    args = parser.parse_args()
    master = build_master(args.files, args.person_keywords)
    journal = Journal(WORK / "journal")
    plain, with_text = MetadataConfig(), MetadataConfig(write_text=True)
    contenders: dict[str, Callable[[list[Path]], float]] = {
        "caption": lambda fs: timed(fs, lambda f: write_caption(f, CAPTION, PROV, plain, journal=journal)),
        "caption+keywords": lambda fs: timed(
            fs, lambda f: write_caption(f, CAPTION, PROV, plain, journal=journal, keywords=KEYWORDS)),
        "+keywords+text": lambda fs: timed(
            fs, lambda f: write_caption(f, CAPTION, PROV, with_text, journal=journal, keywords=KEYWORDS, text=TEXT)),
    }
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            files = fresh(master, name)
            best[name] = min(best.get(name, float("inf")), run(files))
        files = WORK / "caption+keywords"
        again = sorted(files.glob("*.JPG"))
        ms = timed(again, lambda f: write_caption(f, "a cat on a wall", LATER, plain, journal=journal,
                                                  keywords=OTHER))
        best["re-caption"] = min(best.get("re-caption", float("inf")), ms)
    anchor = best["caption"]
    print(f"{args.files} JPEGs, {args.person_keywords} person keywords each (XMP + IPTC), best of {args.rounds}")
    for name, ms in best.items():
        print(f"  {name:18s} {ms:7.2f} ms/file   {ms / anchor:5.2f}x caption alone")


if __name__ == "__main__":
    main()
