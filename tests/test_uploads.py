"""Tests for vlm.uploads and vlm.inputs: hostile zips, label lists, templates, questions and
image references (paths, URLs, data URLs) from a public demo."""

import base64
import io
import math
import os
import stat
import struct
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from vlm.images import ImageError
from vlm.inputs import ImageGate, InputRefused, PathGuard, data_url_bytes, number
from vlm.limits import parse_size
from vlm.uploads import (
    ScratchFolder,
    UploadError,
    check_length,
    check_prompt_count,
    clean_question,
    collect_uploads,
    extract_zip,
    parse_labels,
    parse_templates,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"not decoded here" * 4  # extract_zip never decodes images


def make_zip(path: Path, entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "sandbox" / "out"


# -----------------------------------------------------------------------------
# extract_zip


@pytest.mark.parametrize(
    "name, reason",
    [
        ("../../evil.png", "path traversal"),
        ("photos/../../../evil.png", "path traversal"),
        ("..\\..\\evil.png", "path traversal"),
        ("/tmp/evil.png", "absolute path"),
        ("C:/Windows/evil.png", "absolute path"),
        ("\\\\server\\share\\evil.png", "absolute path"),
        ("photos/", "directory"),
        ("__MACOSX/photos/._cat.png", "macOS metadata"),
        ("notes.txt", "not an image"),
        ("nested.zip", "not an image"),
        ("photo.png.exe", "not an image"),
        ("empty.png", "empty file"),
    ],
)
def test_unsafe_and_unwanted_entries_are_skipped(tmp_path, dest, name, reason):
    data = b"" if name == "empty.png" else PNG
    archive = make_zip(tmp_path / "upload.zip", {"good.png": PNG, name: data})
    extracted, skipped = extract_zip(archive, dest)
    assert extracted == [dest.resolve() / "good.png"]
    assert (extracted[0].read_bytes(), skipped) == (PNG, [(name, reason)])
    # nothing was written anywhere but dest
    assert files_under(tmp_path) == sorted([archive, dest.resolve() / "good.png"])


def test_symlinks_are_skipped(tmp_path, dest):
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as z:
        link = zipfile.ZipInfo("link.png")
        link.create_system = 3  # unix
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
        z.writestr("real.png", PNG)
    extracted, skipped = extract_zip(archive, dest)
    assert [p.name for p in extracted] == ["real.png"]
    assert skipped == [("link.png", "symbolic link")]
    assert not (dest / "link.png").is_symlink()


def test_names_are_flattened_and_deduplicated(tmp_path, dest):
    entries = {
        "a/cat.png": PNG,
        "b/cat.png": PNG,
        "c/CAT.PNG": PNG,
        "deep/er/still/dog.jpg": PNG,
        "weird name; rm -rf $HOME.png": PNG,
        "ünïcode 猫.webp": PNG,
        "...png": PNG,
    }
    extracted, skipped = extract_zip(make_zip(tmp_path / "u.zip", entries), dest)
    assert skipped == []
    names = [p.name for p in extracted]
    assert names[:4] == ["cat.png", "cat-2.png", "CAT-3.png", "dog.jpg"]
    assert names[4] == "weird name_ rm -rf _HOME.png"
    assert names[5] == "ünïcode 猫.webp"
    assert names[6] == "image.png"
    assert all(p.parent == dest.resolve() and p.read_bytes() == PNG for p in extracted)


def test_existing_files_in_dest_are_never_overwritten(tmp_path, dest):
    dest.mkdir(parents=True)
    (dest / "cat.png").write_bytes(b"mine")
    extracted, _ = extract_zip(make_zip(tmp_path / "u.zip", {"cat.png": PNG}), dest)
    assert [p.name for p in extracted] == ["cat-2.png"]
    assert (dest / "cat.png").read_bytes() == b"mine"


@pytest.mark.parametrize(
    "content", [b"", b"hello, I am a text file", b"PK\x03\x04 truncated", PNG * 100]
)
def test_not_a_zip(tmp_path, dest, content):
    path = tmp_path / "fake.zip"
    path.write_bytes(content)
    with pytest.raises(UploadError, match="fake.zip: not a zip archive"):
        extract_zip(path, dest)
    assert not dest.exists()


def test_too_many_files(tmp_path, dest):
    archive = make_zip(tmp_path / "many.zip", {f"{i}.png": PNG for i in range(11)})
    with pytest.raises(UploadError, match=r"too many files \(11; the limit is 10\)"):
        extract_zip(archive, dest, max_files=10)
    assert sorted(p.name for p in extract_zip(archive, dest, max_files=11)[0]) == sorted(
        f"{i}.png" for i in range(11)
    )


def test_declared_total_size_limit(tmp_path, dest):
    archive = make_zip(tmp_path / "big.zip", {"a.png": PNG * 10, "b.txt": b"x" * 1000})
    with pytest.raises(UploadError, match="too large when unpacked"):
        extract_zip(archive, dest, max_total_bytes=1000)
    assert not dest.exists()


def test_zip_bomb(tmp_path, dest):
    """20 MB of zeros deflate to ~20 KB: a 1000x ratio, written in a streaming way."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z, z.open("zeros.png", "w") as f:
        for _ in range(20):
            f.write(bytes(1 << 20))
    assert archive.stat().st_size < 100_000
    with pytest.raises(UploadError, match="bomb.zip: refused as a possible zip bomb"):
        extract_zip(archive, dest)
    assert not dest.exists()


def test_small_compressible_files_are_not_bombs(tmp_path, dest):
    archive = make_zip(tmp_path / "blank.zip", {"blank.bmp": bytes(500_000)})
    extracted, _ = extract_zip(archive, dest)
    assert extracted[0].stat().st_size == 500_000


def lie_about_size(path: Path, declared: int) -> None:
    """Rewrite the uncompressed size in the zip's central directory and local header."""
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, declared)
    struct.pack_into("<I", data, data.index(b"PK\x03\x04") + 22, declared)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_lying_header_never_writes_more_than_declared(tmp_path, dest, method):
    archive = make_zip(tmp_path / "liar.zip", {"liar.png": b"y" * 100_000}, method)
    lie_about_size(archive, 100)
    extracted, skipped = extract_zip(archive, dest, max_total_bytes=1000)
    assert extracted == []
    assert skipped[0][0] == "liar.png" and skipped[0][1].startswith("damaged")
    assert files_under(dest) == []


def test_running_byte_budget(tmp_path, dest, monkeypatch):
    """Even if the zip reader produced more bytes than declared, extraction stops and cleans up."""
    archive = make_zip(tmp_path / "u.zip", {"first.png": PNG, "second.png": PNG})
    real_open = zipfile.ZipFile.open

    def open_member(self, info, *args, **kwargs):
        if getattr(info, "filename", info) == "second.png":
            return io.BytesIO(b"z" * 1_000_000)
        return real_open(self, info, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_member)
    with pytest.raises(UploadError, match="more data than its header declares"):
        extract_zip(archive, dest)
    assert files_under(dest) == []  # the first, complete file is removed too


# -----------------------------------------------------------------------------
# collect_uploads


def test_collect_uploads(tmp_path):
    photo = tmp_path / "photo.JPG"
    photo.write_bytes(b"any bytes: decoding is the indexer's job")
    notes = tmp_path / "notes.pdf"
    notes.write_bytes(b"%PDF")
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"nope")
    good = make_zip(tmp_path / "good.zip", {"a/cat.png": PNG, "readme.md": b"hi"})
    bomb = make_zip(tmp_path / "many.zip", {f"{i}.png": PNG for i in range(5)})
    uploads = [photo, notes, str(fake), good, bomb, tmp_path / "gone.png"]

    images, skipped = collect_uploads(uploads, tmp_path / "out", max_files=3)
    assert images == [photo, (tmp_path / "out").resolve() / "cat.png"]
    assert skipped == [
        ("notes.pdf", "not an image"),
        ("fake.zip", "not a zip archive (or a damaged one)"),
        ("good.zip/readme.md", "not an image"),
        ("many.zip", "too many files (5; the limit is 3)"),
        ("gone.png", "no such file"),
    ]


# -----------------------------------------------------------------------------
# parse_labels


@pytest.mark.parametrize(
    "text, labels",
    [
        ("cat, dog\nbird", ["cat", "dog", "bird"]),
        ("cat\r\n\n  dog  \n\n", ["cat", "dog"]),
        ('"Washington, D.C.", Paris', ["Washington, D.C.", "Paris"]),
        ('a photo of "a cat", the "best" dog', ['a photo of "a cat"', 'the "best" dog']),
        ('"say ""cheese""", smile', ['say "cheese"', "smile"]),
        ('"unterminated, quote', ["unterminated, quote"]),
        ("cat, Cat, CAT , dog, cat", ["cat", "dog"]),
        ("red   circle,\tred circle", ["red circle"]),
        ("🐱, 🐶\n👨‍👩‍👧 family", ["🐱", "🐶", "👨‍👩‍👧 family"]),
        ("قطة, كلب\nחתול", ["قطة", "كلب", "חתול"]),
        ("\u202bمرحبا\u202c, ok", ["\u202bمرحبا\u202c", "ok"]),
        ("ca\x00t, d\x1bog", ["cat", "dog"]),
        (",,, a ,,,\n,", ["a"]),
    ],
)
def test_parse_labels(text, labels):
    assert parse_labels(text) == labels


@pytest.mark.parametrize("text", ["", "   ", "\n\n", ", , ,", '""', None])
def test_parse_labels_empty(text):
    with pytest.raises(UploadError, match="no labels"):
        parse_labels(text)


def test_parse_labels_too_many():
    assert len(parse_labels(",".join(map(str, range(1000))))) == 1000
    with pytest.raises(UploadError, match=r"too many labels \(1,001; the limit is 1,000\)"):
        parse_labels("\n".join(map(str, range(1001))))
    with pytest.raises(UploadError, match="limit is 2"):
        parse_labels("a, b, c", max_labels=2)


# -----------------------------------------------------------------------------
# clean_question


@pytest.mark.parametrize(
    "text, question",
    [
        ("  what color is the star?  ", "what color is the star?"),
        ("what\tcolor\n\nis   it?", "what color is it?"),
        ("wh\x00at is\x07 th\x1b[31mis?\x7f", "what is th[31mis?"),
        ("¿qué es esto? 🐱", "¿qué es esto? 🐱"),
        ("ما هذا؟", "ما هذا؟"),
    ],
)
def test_clean_question(text, question):
    assert clean_question(text) == question


@pytest.mark.parametrize("text", ["", "   \n\t ", "\x00\x01\x02", None])
def test_clean_question_empty(text):
    with pytest.raises(UploadError, match="the question is empty"):
        clean_question(text)


def test_clean_question_too_long():
    assert clean_question("a" * 500) == "a" * 500
    with pytest.raises(UploadError, match=r"too long \(10,000 characters; the limit is 500\)"):
        clean_question("a" * 10_000)
    with pytest.raises(UploadError, match="the limit is 20"):
        clean_question("why " * 10, max_chars=20)


# -----------------------------------------------------------------------------
# text limits: checked before any other work


def test_label_length_and_total_text_are_limited():
    assert parse_labels("a" * 30 + ", b", max_labels=5, max_label_chars=30) == ["a" * 30, "b"]
    with pytest.raises(UploadError, match=r"label 2 is too long \(31 characters; the limit is 30"):
        parse_labels("b, " + "a" * 31, max_labels=5, max_label_chars=30)
    # a huge text is refused by its length before it is parsed (5 labels of 30: 170 characters)
    with pytest.raises(UploadError, match=r"the list of labels is too long \(1,000,000 char"):
        parse_labels("a," * 500_000, max_labels=5, max_label_chars=30)


def test_templates():
    assert parse_templates(None) == []
    assert parse_templates("a photo of {}\n\n  {} again \n") == ["a photo of {}", "{} again"]
    with pytest.raises(UploadError, match=r"too many templates \(4; the limit is 3\)"):
        parse_templates("{}\n" * 4, max_templates=3)
    with pytest.raises(UploadError, match=r"template 2 is too long \(12 characters; the limit"):
        parse_templates("{}\n{}" + "x" * 10, max_chars=11)
    with pytest.raises(UploadError, match="Each template needs a {}"):
        parse_templates("a photo of {}\na photo")
    with pytest.raises(UploadError, match="the templates is too long"):
        parse_templates("{}" * 1_000_000)


def test_check_length_and_prompt_count():
    assert check_length(None, "x", 3) == "" and check_length("abc", "x", 3) == "abc"
    with pytest.raises(UploadError, match=r"^Text 1 is too long \(4 characters; the limit is 3\)$"):
        check_length("abcd", "Text 1", 3)
    check_prompt_count(2000, 10, 20_000)
    with pytest.raises(UploadError, match=r"2,000 × 11 = 22,000 texts to encode; the limit is 20,"):
        check_prompt_count(2000, 11, 20_000)


def test_a_huge_question_is_refused_before_it_is_cleaned(monkeypatch):
    import vlm.uploads

    monkeypatch.setattr(vlm.uploads, "_collapse", lambda text: pytest.fail("cleaned"))
    with pytest.raises(UploadError, match=r"\(5,000,000 characters; the limit is 500\)"):
        clean_question("x" * 5_000_000)


def test_scratch_folder_keeps_only_recent_files(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    scratch = ScratchFolder("vlm-test-", max_age=60)
    first = scratch.new_file("captions.csv")
    first.write_text("a")
    second = scratch.new_file("captions.csv")
    assert first.exists() and second.parent != first.parent and second.name == "captions.csv"
    old = time.time() - 120
    os.utime(first.parent, (old, old))
    scratch.new_file("captions.csv")  # sweeps the folder older than a minute
    assert not first.parent.exists() and second.parent.exists()
    assert [p.name for p in tmp_path.iterdir()] == [first.parent.parent.name]


# -----------------------------------------------------------------------------
# vlm.inputs: the gate every image a request names passes


def png_bytes(size=(8, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture
def gate(tmp_path) -> ImageGate:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "ok.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    return ImageGate(PathGuard([tmp_path / "root"]), max_bytes=1000)


def test_parse_size_is_gradios():
    from gradio.utils import _parse_file_size

    for text in ["50mb", "1 GB", "7kb", "3b"]:
        assert parse_size(text) == _parse_file_size(text)
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_the_gate_reads_every_form_inside_the_roots(gate, tmp_path):
    ok = tmp_path / "root" / "ok.png"
    for source in [str(ok), ok, {"path": str(ok)}, {"path": str(ok), "meta": {}},
                   {"url": data_url(png_bytes())}, data_url(png_bytes()), png_bytes()]:  # fmt: skip
        assert gate.open(source).size == (8, 8)


def test_outside_the_roots_one_message_whether_or_not_the_file_exists(gate, tmp_path):
    messages = set()
    for name in ["secret.png", "missing.png"]:
        path = str(tmp_path / name)
        for source in [path, Path(path), {"path": path}, f"{tmp_path}/root/../{name}"]:
            with pytest.raises(InputRefused) as error:
                gate.open(source)
            messages.add(str(error.value).replace(name, "<name>"))
    assert len(messages) == 2  # the two spellings of the path; nothing else differs
    assert all("does not read" in m and "Upload the file instead" in m for m in messages)


@pytest.mark.parametrize("url", ["http://169.254.169.254/x.png", "https://example.com/a.png",
                                 "file:///etc/passwd", "ftp://host/x.png"])  # fmt: skip
def test_urls_are_never_fetched(gate, url, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("fetched"))
    for source in [url, {"url": url}, {"path": url}, {"path": url, "url": url}]:
        with pytest.raises(InputRefused, match="does not fetch URLs"):
            gate.open(source)


def test_a_data_url_over_the_byte_limit_is_refused_before_decoding(gate, monkeypatch):
    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(InputRefused, match=r"too large .* as a data URL.*the limit is"):
        gate.open(data_url(b"x" * 1500))
    with pytest.raises(InputRefused, match="too large"):
        data_url_bytes("data:image/png," + "%00" * 900 + "x" * 2200, max_bytes=1000)


def test_data_urls_get_the_pixel_limit_from_the_header(tmp_path):
    gate = ImageGate(PathGuard([tmp_path]), max_bytes=1 << 20)
    with pytest.raises(ImageError, match=r"too large \(400,000,000 pixels; the limit is 64,000,"):
        gate.open(data_url(png_bytes((20000, 20000), "1")))
    with pytest.raises(ImageError, match="not valid base64"):
        gate.open("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="not a valid data URL"):
        gate.open("data:image/png;base64")


def test_a_file_over_the_byte_limit_is_refused(gate, tmp_path):
    (tmp_path / "root" / "big.png").write_bytes(png_bytes() + b"\0" * 1000)
    with pytest.raises(InputRefused, match=r"big.png: the file is too large"):
        gate.open(str(tmp_path / "root" / "big.png"))
    with pytest.raises(InputRefused, match="too large"):
        gate.open(b"\0" * 1001)


@pytest.mark.parametrize(
    "value, ok", [(1, True), (60, True), ("7", True), (0, False), (61, False),
                  (math.nan, False), (math.inf, False), (-math.inf, False), (None, False)],
)  # fmt: skip
def test_number(value, ok):
    if ok:
        assert number(value, "Max length", 1, 60) == float(value)
    else:
        with pytest.raises(ValueError, match=r"^Max length must be between 1 and 60"):
            number(value, "Max length", 1, 60)
