"""Text in images: the rapidocr engine with its real PP-OCR models on real photos with text drawn on them, image
loading for OCR (draft mode, EXIF orientation, pixel cap), the florence engine, and the engine choice."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from capwatch.config import Config, ModelConfig, OcrConfig
from capwatch.errors import ConfigError, ImageError
from capwatch.models.captioner import open_captioner
from capwatch.models.session import physical_cores
from capwatch.text import load_for_text, open_text_reader
from capwatch.text.florence import FlorenceTextReader
from capwatch.text.rapid import RapidOcrReader, keep_lines
from capwatch.text.reader import fitted_size

FIXTURES = Path(__file__).parent / "fixtures"
PHOTOS = FIXTURES / "photos"
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")

pytestmark = pytest.mark.skipif(not FONT.is_file(), reason="needs fonts-dejavu-core (.ci/run installs it)")


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), size)


def _photo(name: str) -> Image.Image:
    with Image.open(PHOTOS / f"{name}.jpg") as img:
        return img.convert("RGB")


def _words(text: str) -> set[str]:
    return set(text.replace("\n", " ").split())


@pytest.fixture(scope="module")
def reader() -> Iterator[RapidOcrReader]:
    engine = RapidOcrReader(threads=2)
    yield engine
    engine.close()


# -- real model, real photos -----------------------------------------------------------------------------------


def test_sign_on_a_photo(reader: RapidOcrReader) -> None:
    img = _photo("coffee")
    draw = ImageDraw.Draw(img)
    draw.rectangle((60, 40, 380, 170), fill=(250, 245, 230), outline=(40, 40, 40), width=4)
    draw.text((80, 55), "BAKERY", fill=(150, 20, 20), font=_font(48))
    draw.text((80, 115), "OPEN 24H", fill=(20, 20, 20), font=_font(36))
    assert {"BAKERY", "OPEN", "24H"} <= _words(reader.read(img))


def test_number_painted_on_a_photo(reader: RapidOcrReader) -> None:
    img = _photo("astronaut")
    ImageDraw.Draw(img).text((40, 400), "EXIT 12", fill=(255, 255, 0), font=_font(56), stroke_width=3,
                             stroke_fill=(0, 0, 0))
    assert {"EXIT", "12"} <= _words(reader.read(img))


def test_rotated_line(reader: RapidOcrReader) -> None:
    img = _photo("chelsea")
    layer = Image.new("RGBA", (400, 80), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((10, 10), "HARBOUR ROAD", fill=(255, 255, 255, 255), font=_font(40), stroke_width=2,
                               stroke_fill=(0, 0, 0, 255))
    layer = layer.rotate(12, expand=True, resample=Image.Resampling.BICUBIC)
    img.paste(layer, (20, 120), layer)
    assert {"HARBOUR", "ROAD"} <= _words(reader.read(img))


def test_small_label_text(reader: RapidOcrReader) -> None:
    img = _photo("coffee").resize((1200, 800))
    draw = ImageDraw.Draw(img)
    draw.rectangle((30, 30, 330, 60), fill=(255, 255, 255))
    draw.text((36, 34), "Best before 2027-03-14", fill=(0, 0, 0), font=_font(18))
    assert "2027-03-14" in reader.read(img)


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut"])
def test_photo_without_text_reads_nothing(reader: RapidOcrReader, name: str) -> None:
    assert reader.read(_photo(name)) == ""


def test_mixed_scripts_give_what_the_model_knows_without_failing(reader: RapidOcrReader) -> None:
    img = _photo("coffee")
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 20, 580, 110), fill=(255, 255, 255))
    draw.text((30, 35), "Café Москва Αθήνα 2024", fill=(0, 0, 0), font=_font(36))
    text = reader.read(img)
    assert "Café" in text and "2024" in text


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (7, 7)])
def test_tiny_images_read_empty(reader: RapidOcrReader, size: tuple[int, int]) -> None:
    assert reader.read(Image.new("RGB", size, (255, 255, 255))) == ""


def test_one_pixel_file_reads_empty(reader: RapidOcrReader, tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (0, 0, 0)).save(path)
    assert reader.read_file(path) == ""


def test_50_megapixel_panorama_is_scaled_down_in_draft_mode(reader: RapidOcrReader, tmp_path: Path) -> None:
    path = tmp_path / "panorama.jpg"
    pano = Image.new("L", (12000, 4200), 200)
    ImageDraw.Draw(pano).text((600, 1500), "SUMMIT 4810", fill=0, font=_font(400))
    pano.save(path, quality=80)
    del pano
    loaded = load_for_text(path, 4_000_000)
    assert loaded.mode == "RGB"
    assert loaded.size[0] * loaded.size[1] <= 4_000_000
    assert loaded.size == fitted_size((12000, 4200), 4_000_000)
    assert {"SUMMIT", "4810"} <= _words(reader.read_file(path))


def test_exif_orientation_is_applied_before_reading(reader: RapidOcrReader, tmp_path: Path) -> None:
    upright = _photo("coffee")
    draw = ImageDraw.Draw(upright)
    draw.rectangle((40, 150, 560, 250), fill=(255, 255, 255))
    draw.text((60, 165), "PLATFORM 9", fill=(0, 0, 0), font=_font(56))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote; Orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    stored.save(path, quality=92, exif=exif)
    assert load_for_text(path, 4_000_000).size == upright.size
    assert {"PLATFORM", "9"} <= _words(reader.read_file(path))


def test_png_files_read_too(reader: RapidOcrReader, tmp_path: Path) -> None:
    img = _photo("astronaut")
    ImageDraw.Draw(img).text((30, 30), "NASA 1999", fill=(255, 255, 255), font=_font(48), stroke_width=2,
                             stroke_fill=(0, 0, 0))
    path = tmp_path / "poster.png"
    img.save(path)
    assert {"NASA", "1999"} <= _words(reader.read_file(path))


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 truncated jpeg", b"not an image at all"])
def test_undecodable_file_is_one_image_error(reader: RapidOcrReader, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        reader.read_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_is_an_image_error(reader: RapidOcrReader, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        reader.read_file(tmp_path / "gone.jpg")


# -- pure parts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "limit", "fitted"), [
    ((4000, 3000), 12_000_000, (4000, 3000)), ((4000, 3000), 3_000_000, (2000, 1500)),
    ((1, 100_000), 1000, (1, 1000)), ((12000, 4200), 4_000_000, (3380, 1183)),
])
def test_fitted_size(size: tuple[int, int], limit: int, fitted: tuple[int, int]) -> None:
    assert fitted_size(size, limit) == fitted
    assert fitted[0] * fitted[1] <= max(limit, 1)


def test_lone_characters_need_a_sure_reading() -> None:
    texts = ["0", " EXIT 12 ", "", "7", "ab", "-"]
    scores = [0.69, 0.99, 0.99, 0.97, 0.6, 0.95]
    assert keep_lines(texts, scores) == ["EXIT 12", "7", "ab"]


# -- engine choice ----------------------------------------------------------------------------------------------


def test_off_is_no_reader() -> None:
    assert open_text_reader(Config()) is None


def test_rapidocr_threads_follow_the_model_setting() -> None:
    config = Config(model=ModelConfig(threads=3), ocr=OcrConfig(engine="rapidocr", max_pixels=1000))
    chosen = open_text_reader(config)
    assert isinstance(chosen, RapidOcrReader) and chosen.threads == 3 and chosen.max_pixels == 1000
    default = open_text_reader(Config(ocr=OcrConfig(engine="rapidocr")))
    assert isinstance(default, RapidOcrReader) and default.threads == physical_cores()


def test_missing_extra_is_one_config_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # as if the ocr extra were not installed
    with pytest.raises(ConfigError, match=r"capwatch\[ocr\]"):
        open_text_reader(Config(ocr=OcrConfig(engine="rapidocr")))


def test_models_come_from_the_wheel() -> None:
    import rapidocr

    reader = RapidOcrReader()
    models = Path(rapidocr.__file__).parent / "models"
    for stage in ("Det", "Cls", "Rec"):
        path = Path(reader._params[f"{stage}.model_path"])
        assert path.parent == models and path.is_file()


def test_florence_engine_needs_a_florence_model() -> None:
    config = Config(ocr=OcrConfig(engine="florence"))
    with pytest.raises(ConfigError, match="Florence-2"):
        open_text_reader(config)
    vit = open_captioner(FIXTURES / "models" / "vit-gpt2-tiny-greedy", ModelConfig(precision="fp32"))
    with pytest.raises(ConfigError, match="Florence-2"):
        open_text_reader(config, captioner=vit)


def test_florence_engine_reads_as_transformers_post_processes() -> None:
    model = FIXTURES / "models" / "florence2-tiny"
    goldens = json.loads((model / "goldens_tasks.json").read_text())
    captioner = open_captioner(model, ModelConfig(precision="fp32"))
    chosen = open_text_reader(Config(ocr=OcrConfig(engine="florence")), captioner=captioner)
    assert isinstance(chosen, FlorenceTextReader)
    for name, answer in zip(goldens["images"], goldens["tasks"]["<OCR>"]["answer_beam"], strict=True):
        with Image.open(model / "goldens" / f"{name}.png") as img:
            assert chosen.read(img.convert("RGB")) == answer


def test_photo_without_text_costs_the_detector_only() -> None:
    fresh = RapidOcrReader(threads=2)
    assert fresh.read(_photo("astronaut")) == ""
    engine = fresh._engine
    # the detector ran; the angle classifier and the recogniser were never even loaded
    assert engine.text_det is not None and engine.text_cls is None and engine.text_rec is None


# -- configuration ----------------------------------------------------------------------------------------------


def test_ocr_section_is_read_and_checked(tmp_path: Path) -> None:
    from capwatch.config import load_config_file

    path = tmp_path / "config.toml"
    path.write_text('[ocr]\nengine = "rapidocr"\nmax_pixels = 2000000\n[metadata]\nmax_keywords = 5\n'
                    '[model]\nkeywords = false\n')
    config = load_config_file(path)
    assert config.ocr == OcrConfig(engine="rapidocr", max_pixels=2_000_000)
    assert config.metadata.max_keywords == 5 and config.model.keywords is False
    for bad, key in (('[ocr]\nengine = "tesseract"\n', "ocr.engine"), ("[ocr]\nmax_pixels = 0\n", "ocr.max_pixels"),
                     ("[metadata]\nmax_keywords = -1\n", "metadata.max_keywords"),
                     ('[model]\nkeywords = "yes"\n', "model.keywords")):
        path.write_text(bad)
        with pytest.raises(ConfigError) as err:
            load_config_file(path)
        assert key in str(err.value) and "\n" not in str(err.value)
