"""Tests for vlm.uploads: hostile zips, label lists and questions from a public demo."""

import io
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from vlm.uploads import (
    UploadError,
    clean_question,
    collect_uploads,
    extract_zip,
    parse_labels,
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
