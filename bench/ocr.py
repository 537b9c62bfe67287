"""OCR cost per 12 MP photo: the rapidocr engine vs the florence engine, with and without text in the photo.

    python bench/ocr.py [--threads 2] [--repeat 3] [--florence-tokens 20,40] [--precision int8]

Makes (once, into bench/_work/ocr/, gitignored) two 4000x3000 JPEGs from a real photo (tests/fixtures/photos/
coffee.jpg scaled up): one plain, one with a sign, a number and a small label drawn on it. Then, per photo, with
``--threads`` onnxruntime threads:

* ``rapidocr``: ``RapidOcrReader.read_file`` -- draft-mode decode to ``[ocr] max_pixels`` (default 4 MP), EXIF
  orientation, PP-OCR detection, and classification + recognition per detected line; decode and OCR timed apart;
* ``florence``: ``FlorenceTextReader.read_file`` on the Florence-2-base-size random model that
  bench/caption_florence.py builds (bench/_work/florence2-base-random; run that first): vision encoder + the <OCR>
  task. Random weights never emit </s>, so <OCR> runs to ``--florence-tokens`` (a real sign is 5-20 tokens); also
  the marginal cost of the text inside the caption's pass (describe with text vs caption alone, features shared).

Prints milliseconds per photo (median of ``--repeat``) and the words rapidocr found.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
sys.path.insert(0, str(ROOT))

from capwatch.config import ModelConfig  # noqa: E402
from capwatch.text.reader import load_for_text  # noqa: E402

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def photos() -> dict[str, Path]:
    out = WORK / "ocr"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"no text": out / "plain-12mp.jpg", "with text": out / "sign-12mp.jpg"}
    if all(p.is_file() for p in paths.values()):
        return paths
    with Image.open(ROOT / "tests" / "fixtures" / "photos" / "coffee.jpg") as src:
        big = src.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    big.save(paths["no text"], quality=90)
    draw = ImageDraw.Draw(big)
    draw.rectangle((300, 250, 2300, 1000), fill=(250, 245, 230), outline=(40, 40, 40), width=20)
    draw.text((380, 300), "CORNER BAKERY", fill=(150, 20, 20), font=ImageFont.truetype(FONT, 220))
    draw.text((380, 650), "OPEN DAILY 7-19", fill=(20, 20, 20), font=ImageFont.truetype(FONT, 160))
    draw.text((2800, 2300), "EXIT 12", fill=(255, 255, 0), font=ImageFont.truetype(FONT, 260), stroke_width=10,
              stroke_fill=(0, 0, 0))
    draw.rectangle((300, 2600, 1500, 2760), fill=(255, 255, 255))
    draw.text((330, 2620), "Best before 2027-03-14", fill=(0, 0, 0), font=ImageFont.truetype(FONT, 90))
    big.save(paths["with text"], quality=90)
    return paths


def median_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-pixels", type=int, default=4_000_000)
    parser.add_argument("--florence-tokens", default="20,40")
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    args = parser.parse_args()
    paths = photos()
    print(f"12 MP JPEG (4000x3000), {args.threads} threads, max_pixels {args.max_pixels}, median of {args.repeat}")
    print(f"{'engine':22s} {'photo':10s} {'decode ms':>10s} {'read ms':>9s} {'total ms':>9s}  text")

    from capwatch.text.rapid import RapidOcrReader

    rapid = RapidOcrReader(threads=args.threads, max_pixels=args.max_pixels)
    rapid.read_file(paths["with text"])  # warm-up: the models load on the first read
    for label, path in paths.items():
        decode, image = median_ms(lambda p=path: load_for_text(p, args.max_pixels), args.repeat)
        read, text = median_ms(lambda i=image: rapid.read(i), args.repeat)
        print(f"{'rapidocr':22s} {label:10s} {decode:10.0f} {read:9.0f} {decode + read:9.0f}  {text!r}", flush=True)
    rapid.close()

    model_dir = WORK / "florence2-base-random"
    if not model_dir.is_dir():
        print("florence: skipped (run bench/caption_florence.py --export-only first)")
        return
    from capwatch.models.captioner import DescribeOptions, open_captioner
    from capwatch.models.florence2 import OCR_TASK, Florence2Captioner
    from capwatch.text.florence import FlorenceTextReader

    cap = open_captioner(model_dir, ModelConfig(precision=args.precision, threads=args.threads,  # type: ignore[arg-type]
                                                idle_unload_seconds=0))
    assert isinstance(cap, Florence2Captioner)
    reader = FlorenceTextReader(cap, max_pixels=args.max_pixels)
    base = cap.task_settings[OCR_TASK]
    for budget in (int(b) for b in args.florence_tokens.split(",")):
        cap.task_settings[OCR_TASK] = dataclasses.replace(base, max_length=budget + 1, max_new_tokens=budget)
        reader.read_file(paths["no text"])  # warm-up
        for label, path in paths.items():
            decode, image = median_ms(lambda p=path: load_for_text(p, args.max_pixels), args.repeat)
            read, _text = median_ms(lambda i=image: reader.read(i), args.repeat)
            name = f"florence {args.precision} {budget}tok"
            print(f"{name:22s} {label:10s} {decode:10.0f} {read:9.0f} {decode + read:9.0f}  (random weights)",
                  flush=True)
        image = load_for_text(paths["with text"], args.max_pixels)
        alone, _ = median_ms(lambda i=image: cap.describe_batch([i], DescribeOptions(keywords=False)), args.repeat)
        both, _ = median_ms(lambda i=image: cap.describe_batch([i], DescribeOptions(keywords=False, text=True)),
                            args.repeat)
        print(f"{'  in the caption pass':22s} {'':10s} caption {alone:.0f} ms, caption + text {both:.0f} ms: "
              f"text adds {both - alone:.0f} ms ({both / alone:.2f}x)", flush=True)
    cap.close()


if __name__ == "__main__":
    main()
