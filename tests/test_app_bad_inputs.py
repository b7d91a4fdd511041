"""The bad-input matrix through the demo's API (gradio_client), on one app serving the bundled
model: every request gets a clear AppError or a correct result, and the server keeps serving."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from test_app import start_app
from test_bad_inputs import IMAGE_CASES, halves, make_bomb, make_empty

from vlm.examples import shapeworld_examples


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app-bad-inputs")
    process, url, _ = start_app(tmp)
    yield process, Client(url, verbose=False), tmp
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(served):
    return served[1]


@pytest.fixture(scope="module")
def example():
    """A bundled example with one object, and its truth."""
    return next((p, t) for p, t in shapeworld_examples() if " left of " not in t["caption"])


def expect_error(call, *words: str) -> str:
    with pytest.raises(AppError) as error:
        call()
    message = str(error.value)
    assert all(word in message for word in words), message
    assert "Something went wrong" not in message, message  # a clear message, not a crash
    return message


# ----------------------------------------------------------------------------- /caption

# app.py's UploadedImage decodes uploads with vlm.images, so a bad image gets our message,
# not Gradio's generic "The upstream Gradio app has raised an exception …".
BAD_IMAGES = ["truncated-jpeg", "random-bytes-png", "text-as-jpg", "heic"]
GOOD_IMAGES = ["1x1", "cmyk-jpeg", "gray16-png", "palette-transparency-png", "rgba-png",
               "exif6-jpeg", "animated-gif", "webp"]  # fmt: skip


def upload(tmp_path: Path, case: str):
    return handle_file(str(IMAGE_CASES[case][0](tmp_path)))


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_caption_bad_image(client, tmp_path, case):
    words = IMAGE_CASES[case][1]
    expect_error(lambda: client.predict(upload(tmp_path, case), api_name="/caption"), *words)


@pytest.mark.parametrize("case", GOOD_IMAGES)
def test_caption_unusual_image(client, tmp_path, case):
    caption = client.predict(upload(tmp_path, case), api_name="/caption")
    assert isinstance(caption, str) and caption.strip()


@pytest.mark.parametrize("make, words", [(make_bomb, "too large"), (make_empty, "empty")])
def test_caption_bomb_and_empty_file(client, tmp_path, make, words):
    path = make(tmp_path)
    expect_error(lambda: client.predict(handle_file(str(path)), api_name="/caption"), words)


@pytest.mark.parametrize("api_name", ["/classify", "/answer"])
def test_bad_image_on_other_endpoints(client, tmp_path, api_name):
    image = upload(tmp_path, "truncated-jpeg")
    call = lambda: client.predict(image, "red circle", "", api_name=api_name)  # noqa: E731
    expect_error(call, "truncated.jpg", "damaged or truncated")


# ----------------------------------------------------------------------------- /classify

LABELS = {
    "empty": (" , ,\n", "no labels given"),
    "too-many": ("\n".join(f"label {i}" for i in range(2001)), "the limit is 2,000"),
    "one": ("red circle", ["red circle"]),
    "duplicates": ("red circle, Red Circle\nred circle, blue star", ["red circle", "blue star"]),
    "quotes-and-commas": ('"red, large circle", say "hi"', ["red, large circle", 'say "hi"']),
    "emoji-rtl-braces": ("🔴 circle, كرة حمراء, עיגול, {} {0}",
                         ["🔴 circle", "كرة حمراء", "עיגול", "{} {0}"]),
    "2000": ("\n".join(f"label {i}" for i in range(2000)), None),
}  # fmt: skip


@pytest.mark.parametrize("case", LABELS)
def test_classify_label_matrix(client, example, case):
    text, expected = LABELS[case]
    call = lambda: client.predict(handle_file(str(example[0])), text, "", api_name="/classify")  # noqa: E731
    if isinstance(expected, str):
        expect_error(call, expected)
        return
    result, _ = call()
    confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
    if expected is None:
        assert len(confidences) == 5 and set(confidences) <= {f"label {i}" for i in range(2000)}
    else:
        assert set(confidences) == set(expected)
        assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-3)
    assert result["label"] == max(confidences, key=confidences.get)


# ----------------------------------------------------------------------------- /answer

QUESTIONS = [
    pytest.param("  \n ", "the question is empty", id="empty"),
    pytest.param("x" * 10_000, "the limit is 500", id="10000-chars"),
    pytest.param("what\x00 color\x1b is\x07 the shape?", None, id="control-chars"),
    pytest.param("what color is it? " * 27, "too long", id="at-the-limit"),
]  # fmt: skip


@pytest.mark.parametrize("question, expected", QUESTIONS)
def test_answer_question_matrix(client, example, question, expected):
    call = lambda: client.predict(handle_file(str(example[0])), question, "", api_name="/answer")  # noqa: E731
    if expected is None:
        answer, _ = call()
        assert isinstance(answer, str) and answer.strip()
    else:
        expect_error(call, expected)


# ----------------------------------------------------------------------------- /index_add


def png(color=(255, 0, 0), size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return path


def declare_huge(path: Path) -> Path:
    """Rewrite each central-directory entry to claim ~4 GB uncompressed; nothing is inflated."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        struct.pack_into("<I", data, at + 24, 0xFFFFFFF0)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    return path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def halves_png() -> bytes:
    buffer = io.BytesIO()
    halves().save(buffer, "PNG")
    return buffer.getvalue()


ZIPS = {
    "traversal-and-absolute": (
        lambda d: make_zip(d / "evil.zip", {"../../etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
                                            "/etc/passwd": b"root", "../../evil.png": png(),
                                            "good.png": png((0, 200, 0))}),
        1, ["passwd (path traversal)", "passwd (absolute path)", "evil.png (path traversal)"],
    ),
    "non-images-mixed-in": (
        lambda d: make_zip(d / "mixed.zip", {"a.png": png((0, 0, 200)), "readme.txt": b"hi",
                                             "run.sh": b"rm -rf /", "fake.png": b"not a png",
                                             "b.jpg": halves_png()}),
        2, ["readme.txt (not an image)", "run.sh (not an image)", "fake.png", "not an image"],
    ),
    "declares-huge-size": (
        lambda d: declare_huge(make_zip(d / "huge.zip", {"big.png": png((200, 200, 0))})),
        0, ["huge.zip (too large when unpacked"],
    ),
    "ratio-bomb": (
        lambda d: make_zip(d / "bomb.zip", {"zeros.png": b"\x00" * (4 << 20)}),
        0, ["bomb.zip (refused as a possible zip bomb"],
    ),
    "duplicates": (
        lambda d: make_zip(d / "dups.zip", {"one.png": png((9, 9, 9)), "two.png": png((9, 9, 9)),
                                            "again.png": shapeworld_examples()[0][0].read_bytes()}),
        1, ["duplicate of an image already in the index"],
    ),
    "not-a-zip": (
        lambda d: write(d / "photos.zip", b"PK but not a zip"),
        0, ["photos.zip (not a zip archive"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", ZIPS)
def test_index_add_zip_matrix(served, tmp_path, case):
    _, client, app_tmp = served
    make, added, reasons = ZIPS[case]
    _, status = client.predict([handle_file(str(make(tmp_path)))], api_name="/index_add")
    assert status.startswith(f"Added {added} image(s)"), status
    assert all(reason in status for reason in reasons), status
    # nothing escaped the index folder
    assert not [p for p in app_tmp.rglob("*passwd*")] and not (Path("/etc") / "evil.png").exists()
    assert not [p for p in app_tmp.rglob("evil.png")]


def test_index_add_without_files_is_a_clear_error(client):
    expect_error(lambda: client.predict([], api_name="/index_add"), "Drop images or a .zip")


# ----------------------------------------------------------------------------- still serving


def test_after_all_that_the_server_still_captions(served, example):
    process, client, _ = served
    path, truth = example
    assert process.poll() is None
    assert client.predict(handle_file(str(path)), api_name="/caption") == truth["caption"]
