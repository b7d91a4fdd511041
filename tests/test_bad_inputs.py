"""Every kind of input a public demo gets, at the library level: each one gives a clear
ImageError / UploadError / ValueError, or a correct result. Never a crash, never a hang.

The builders below make each input in a folder; tests/test_app_bad_inputs.py reuses them."""

from __future__ import annotations

import dataclasses
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOR_QUESTION
from PIL import Image
from test_app import pinned_env

from vlm import Pipeline
from vlm.images import ImageError, load_image
from vlm.limits import Limits
from vlm.uploads import UploadError, clean_question, parse_labels

ROOT = Path(__file__).resolve().parent.parent
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)

# ----------------------------------------------------------------------------- image builders


def halves(size=(60, 40)) -> Image.Image:
    """Left half red, right half blue: shows which way an image was turned."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    return image


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit side×side PNG (400 MP for 20000) of ~50 kB, written row by row: building
    it never holds the image; decoding it would take gigabytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )
    return path


HEIC_BYTES = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64


def make_truncated_jpeg(d: Path) -> Path:
    data = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), "u1")))
    (path := d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return path


def make_random_png(d: Path) -> Path:
    (path := d / "random.png").write_bytes(np.random.default_rng(1).bytes(4096))
    return path


def make_empty(d: Path) -> Path:
    (path := d / "empty.png").write_bytes(b"")
    return path


def make_text_jpg(d: Path) -> Path:
    (path := d / "notes.jpg").write_text("dear diary, this is not a picture\n")
    return path


def make_heic(d: Path) -> Path:
    (path := d / "IMG_0001.heic").write_bytes(HEIC_BYTES)
    return path


def make_heic_named_jpg(d: Path) -> Path:  # phones and chat apps rename them
    (path := d / "IMG_0002.jpg").write_bytes(HEIC_BYTES)
    return path


def make_bomb(d: Path) -> Path:
    return bomb_png(d / "bomb.png")


def make_1x1(d: Path) -> Path:
    Image.new("RGB", (1, 1), RED).save(path := d / "pixel.png")
    return path


def make_cmyk_jpeg(d: Path) -> Path:
    halves().convert("CMYK").save(path := d / "cmyk.jpg", quality=95)
    return path


def make_gray16_png(d: Path) -> Path:
    ramp = np.tile(np.linspace(0, 65535, 60).astype(np.uint16), (40, 1))
    Image.fromarray(ramp).save(path := d / "gray16.png")
    return path


def make_palette_transparent_png(d: Path) -> Path:
    image = halves().quantize(colors=2)
    red = image.getpixel((0, 0))  # the red half's palette entry becomes transparent
    image.save(path := d / "palette.png", transparency=red)
    return path


def make_rgba_png(d: Path) -> Path:
    image = halves().convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, 30, 40))  # the red half fully transparent
    image.putalpha(alpha)
    image.save(path := d / "rgba.png")
    return path


def make_exif_jpeg(orientation: int):
    def make(d: Path) -> Path:
        exif = Image.Exif()
        exif[0x0112] = orientation
        (path := d / f"exif{orientation}.jpg").write_bytes(jpeg_bytes(halves(), exif=exif))
        return path

    make.__name__ = f"make_exif{orientation}_jpeg"
    return make


def make_animated_gif(d: Path) -> Path:
    frames = [Image.new("RGB", (30, 20), color) for color in (RED, BLUE, BLUE)]
    frames[0].save(path := d / "anim.gif", save_all=True, append_images=frames[1:], duration=80)
    return path


def make_webp(d: Path) -> Path:
    halves().save(path := d / "photo.webp", quality=95)
    return path


# ----------------------------------------------------------------------------- checks


def close(pixel, color, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, color, strict=True))


def check_1x1(image):
    assert image.size == (1, 1) and image.getpixel((0, 0)) == RED


def check_halves(image):  # not turned: red on the left, blue on the right
    assert image.size == (60, 40)
    assert close(image.getpixel((5, 20)), RED) and close(image.getpixel((55, 20)), BLUE)


def check_exif6(image):  # orientation 6: shown turned 90° clockwise, the left half on top
    assert image.size == (40, 60)
    assert close(image.getpixel((20, 5)), RED) and close(image.getpixel((20, 55)), BLUE)


def check_exif8(image):  # orientation 8: shown turned 90° counter-clockwise, left half below
    assert image.size == (40, 60)
    assert close(image.getpixel((20, 55)), RED) and close(image.getpixel((20, 5)), BLUE)


def check_gray16(image):  # scaled from 16 bits, not clipped to white
    row = [image.getpixel((x, 20))[0] for x in (0, 30, 59)]
    assert row[0] == 0 and 120 <= row[1] <= 135 and row[2] == 255


def check_transparent_on_white(image):
    assert image.size == (60, 40)
    assert image.getpixel((5, 20)) == WHITE and close(image.getpixel((55, 20)), BLUE)


def check_first_frame(image):
    assert image.size == (30, 20) and image.getpixel((10, 10)) == RED


# (builder, expected): a tuple of words the ImageError must contain, or a check of the image
IMAGE_CASES = {
    "truncated-jpeg": (make_truncated_jpeg, ("truncated.jpg", "damaged or truncated")),
    "random-bytes-png": (make_random_png, ("random.png", "not an image")),
    "zero-byte": (make_empty, ("empty.png", "empty")),
    "text-as-jpg": (make_text_jpg, ("notes.jpg", "not an image")),
    "heic": (make_heic, ("IMG_0001.heic", "HEIC", "JPEG or PNG")),
    "heic-named-jpg": (make_heic_named_jpg, ("IMG_0002.jpg", "HEIC")),
    "1x1": (make_1x1, check_1x1),
    "cmyk-jpeg": (make_cmyk_jpeg, check_halves),
    "gray16-png": (make_gray16_png, check_gray16),
    "palette-transparency-png": (make_palette_transparent_png, check_transparent_on_white),
    "rgba-png": (make_rgba_png, check_transparent_on_white),
    "exif6-jpeg": (make_exif_jpeg(6), check_exif6),
    "exif8-jpeg": (make_exif_jpeg(8), check_exif8),
    "animated-gif": (make_animated_gif, check_first_frame),
    "webp": (make_webp, check_halves),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_image_input(trained, tmp_path, case):
    make, expected = IMAGE_CASES[case]
    path = make(tmp_path)
    if isinstance(expected, tuple):
        with pytest.raises(ImageError) as error:
            load_image(path)
        assert all(word in str(error.value) for word in expected), str(error.value)
        with pytest.raises(ImageError):  # the pipeline refuses it the same way
            trained.caption([path])
        return
    image = load_image(path)
    assert image.mode == "RGB"
    expected(image)
    # every way the library takes an image decodes to the same picture: the same caption
    captions = [trained.caption([s], max_new_tokens=5)[0] for s in (path, path.read_bytes(), image)]
    assert captions[0] == captions[1] == captions[2], captions


def test_heic_bytes_without_a_name_say_heic():
    with pytest.raises(ImageError, match="HEIC"):
        load_image(HEIC_BYTES)


@pytest.mark.parametrize(
    "array, words",
    [
        (np.zeros((2, 2, 2, 2)), "shape (2, 2, 2, 2)"),
        (np.zeros((0, 0, 3), np.uint8), "shape (0, 0, 3)"),
        (np.zeros((4, 4, 5), np.uint8), "with 1, 3 or 4 channels"),
        (np.array(["a", "b"]), "is not an image"),
    ],
)
def test_arrays_that_are_not_images(array, words):
    with pytest.raises(ImageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_image(array)


@pytest.mark.parametrize(
    "array, pixel",
    [
        (np.full((4, 4, 3), np.nan), (0, 0, 0)),
        (np.ones((4, 4, 1), np.float32), WHITE),
        (np.zeros((4, 4), bool), (0, 0, 0)),
        (np.full((4, 4, 4), 255, np.uint8), WHITE),
    ],
)
def test_arrays_that_are_images(trained, array, pixel):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (4, 4) and image.getpixel((0, 0)) == pixel
    assert trained.caption([array], max_new_tokens=3) == trained.caption([image], max_new_tokens=3)


BOMB_CHILD = """
import resource, sys
from vlm.images import ImageError, load_image

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize")))
limit = (vm << 10) + (512 << 20)  # a guard that broke would fail here, not swap the machine
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = rss_mb()
try:
    load_image(sys.argv[1])
    print("LOADED")
except ImageError as error:
    print("REFUSED", error)
except MemoryError:
    print("MEMORY")
print("GROWTH_MB", rss_mb() - before)
"""


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    """20000×20000 (400 MP, ~50 kB on disk): refused before decoding, in a fresh process so
    that its peak memory is measurable; decoding it would need about 2 GB."""
    path = make_bomb(tmp_path)
    assert path.stat().st_size < 200_000
    env = pinned_env(tmp_path, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", BOMB_CHILD, str(path)],
        capture_output=True, text=True, timeout=600, env=env,  # a hang guard, not a deadline
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert "REFUSED" in lines, result.stdout
    assert "bomb.png" in lines["REFUSED"] and "too large" in lines["REFUSED"]
    assert "pixels" in lines["REFUSED"]
    assert int(lines["GROWTH_MB"]) < 64


def test_just_over_the_pixel_limit_is_refused_by_our_own_check(tmp_path):
    """Under Pillow's own limit (a process-wide setting vlm leaves alone: 89 MP by default)
    and just over ours, our header check refuses it, naming the size and the limit."""
    most = Limits().max_image_pixels  # the default (the tests run without VLM_* set)
    side = int(most**0.5) + 1
    assert side * side < Image.MAX_IMAGE_PIXELS
    path = bomb_png(tmp_path / "big.png", side)
    with pytest.raises(ImageError) as error:
        load_image(path)
    assert f"{side}×{side}" in str(error.value) and f"{most:,}" in str(error.value)


# ----------------------------------------------------------------------------- labels

APP_MAX_LABELS = 2000  # the demo's limit (app.py: VLM_MAX_LABELS)


@pytest.mark.parametrize("text", ["", "   ", " , ,\n\n,", "\x00\x1b\x07", '""', None])
def test_no_labels_is_a_clear_error(text):
    with pytest.raises(UploadError, match="no labels given"):
        parse_labels(text)


def test_one_label_gets_probability_one(trained, images):
    labels = parse_labels("a large red square")
    assert labels == ["a large red square"]
    [probs] = trained.classify([images["a large red square"]], labels)
    assert probs == pytest.approx({"a large red square": 1.0})
    # "sum" pooling: each template is a sub-class of its label; one label still gets all of it
    summed = dataclasses.replace(trained.config, template_pooling="sum")
    pipeline = Pipeline(trained.encoder, trained.lm, trained.tokenizer, trained.mapper, summed)
    [probs] = pipeline.classify([images["a large blue circle"]], labels, ["a {}", "the {}", "{}"])
    assert probs == pytest.approx({"a large red square": 1.0}, abs=1e-6)


def test_2000_labels_work_and_sum_to_one(trained, images):
    text = "\n".join(f"label number {i}" for i in range(APP_MAX_LABELS))
    labels = parse_labels(text, max_labels=APP_MAX_LABELS)
    assert len(labels) == APP_MAX_LABELS
    # one template keeps it quick: the point is the number of classes
    [probs] = trained.classify([images["a large red square"]], labels, ["{}"])
    assert len(probs) == APP_MAX_LABELS and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(UploadError, match="too many labels .*2,001.*the limit is 2,000"):
        parse_labels(text + "\none more", max_labels=APP_MAX_LABELS)


LABEL_CASES = {
    "duplicates": ("red, Red, red ,RED\nred\nblue, blue", ["red", "blue"]),
    "commas-in-quotes": ('"red, large", blue\n"small, yellow star"', ["red, large", "blue",
                                                                       "small, yellow star"]),
    "quotes": ('say "cheese", it\'s a star, "a ""quoted"" word"',
               ['say "cheese"', "it's a star", 'a "quoted" word']),
    "unbalanced-quote": ('"red circle, blue', ["red circle, blue"]),
    "emoji": ("🐱 cat, 🐶, 🚀 rocket 🚀, 👩🏽‍🚀", ["🐱 cat", "🐶", "🚀 rocket 🚀", "👩🏽‍🚀"]),
    "rtl": ("قطة, כלב אדום, ‏mixed עברית text", ["قطة", "כלב אדום", "‏mixed עברית text"]),
    "braces": ("{}, {0}, {label}, a {} star", ["{}", "{0}", "{label}", "a {} star"]),
    "control-chars": ("red\x00 circle\x1b, blue\tstar\r\nyellow\x07", ["red circle",
                                                                       "blue star", "yellow"]),
    "very-long": ("star " * 2000, ["star " * 1999 + "star"]),
}  # fmt: skip


@pytest.mark.parametrize("case", LABEL_CASES)
def test_labels(trained, images, case):
    text, expected = LABEL_CASES[case]
    labels = parse_labels(text)
    assert labels == expected
    [probs] = trained.classify([images["a large blue circle"]], labels)
    assert list(probs) == sorted(labels, key=lambda label: -probs[label])
    assert set(probs) == set(labels) and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- questions


@pytest.mark.parametrize("text", ["", "   \n\t ", "\x00\x1b\x07", None])
def test_empty_question_is_a_clear_error(text):
    with pytest.raises(UploadError, match="the question is empty"):
        clean_question(text)


def test_10000_character_question_names_the_limit():
    with pytest.raises(UploadError, match=r"too long \(10,000 characters; the limit is 500\)"):
        clean_question("x" * 10_000)


QUESTION_CASES = {
    "control-chars": ("what\x00 color\x1b is\x07 it?\r\n", "what color is it?"),
    "braces": ("what {question} is {0} it?", "what {question} is {0} it?"),
    "emoji-rtl": ("what 🎨 color is it? ما اللون", "what 🎨 color is it? ما اللون"),
}


@pytest.mark.parametrize("case", QUESTION_CASES)
def test_questions_are_cleaned_and_answered(trained, images, case):
    text, expected = QUESTION_CASES[case]
    question = clean_question(text)
    assert question == expected
    [answer] = trained.answer([images["a large red square"]], [question])
    if question == COLOR_QUESTION:  # cleaned into the question the model knows: answered
        assert answer == "red"
    else:  # an answer, cleaned like any text the LM writes (no control characters, trimmed)
        assert answer == answer.strip() and answer.isprintable()


def test_a_question_at_the_length_limit_is_refused_clearly(trained, images):
    """500 characters pass clean_question, but need more positions than the tiny LM has (64):
    a clear error naming both numbers, before the LM runs past its position table."""
    question = clean_question("what color is it? " * 27, max_chars=500)
    positions = trained.lm.config.n_positions
    with pytest.raises(
        ValueError, match=rf"too long for this model: \d+ tokens .* at most {positions}"
    ):
        trained.answer([images["a large red square"]], [question])
    with pytest.raises(ValueError, match="too long"):  # with choices, scored: the same check
        trained.answer([images["a large red square"]], [question], ["red", "blue"])
