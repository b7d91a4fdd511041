"""Safe handling of what users upload to a public demo: zips of images, label lists, questions.

Zips are checked before anything is written (not a zip, too many files, too large, zip bombs) and
then extracted entry by entry: only image files, flattened into one folder under safe names, each
stream-copied under a byte budget so a lying header cannot fill the disk. Images are not decoded
here; the indexer does that and reports the ones that fail.
"""

from __future__ import annotations

import atexit
import csv
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import unicodedata
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import InputError
from .images import is_image_path

CHUNK = 1 << 16  # bytes per read when stream-copying a zip member
RATIO_FLOOR = 1 << 20  # entries smaller than this (uncompressed) are never called zip bombs
MAX_NAME = 100  # characters kept of an extracted file's stem
# errors reading one member: it is skipped as damaged (UploadError is not among them)
DAMAGED = (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, zlib.error)

Skipped = list[tuple[str, str]]  # (name as uploaded, reason)


class UploadError(InputError):
    """An upload that is refused as a whole; the message says why, for the user."""


def _strip_controls(text: str) -> str:
    """Drop control characters (NUL, escapes, ...) but keep whitespace and all other unicode."""
    return "".join(c for c in text if c.isspace() or unicodedata.category(c) != "Cc")


def _collapse(text: str) -> str:
    """Control characters removed, runs of whitespace made one space, ends stripped."""
    return " ".join(_strip_controls(text).split())


def _display(name: str) -> str:
    """An archive entry's name, safe to show: no control characters, at most 200 characters."""
    name = _collapse(name)
    return name if len(name) <= 200 else name[:199] + "…"


# -----------------------------------------------------------------------------
# zip archives


def _unsafe_reason(info: zipfile.ZipInfo, accept=is_image_path, kind="an image") -> str | None:
    """Why an entry must not be extracted, or None if it is fine to look at (a file whose name
    `accept` takes: an image by default)."""
    name = info.filename.replace("\\", "/")
    mode = info.external_attr >> 16
    if info.is_dir():
        return "directory"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path traversal"
    if info.flag_bits & 0x1:
        return "encrypted"
    base = PurePosixPath(name).name
    if name.startswith("__MACOSX/") or base.startswith("._"):
        return "macOS metadata"
    if not accept(base):
        return f"not {kind}"
    if info.file_size == 0:
        return "empty file"
    return None


def safe_name(entry: str, taken: set[str]) -> str:
    """The entry's base name made safe (letters, digits, '._- '), unique in `taken` (casefolded)."""
    path = PurePosixPath(entry.replace("\\", "/"))
    suffix = path.suffix.lower()
    stem = re.sub(r"[^\w.\- ]", "_", _collapse(path.stem)).strip(" .")[:MAX_NAME] or "image"
    name, i = f"{stem}{suffix}", 1
    while name.casefold() in taken:
        i += 1
        name = f"{stem}-{i}{suffix}"
    taken.add(name.casefold())
    return name


def _copy(source, target: Path, limit: int) -> int:
    """Stream `source` into a new file at `target`, refusing to write more than `limit` bytes.
    On any error the partial file is removed."""
    written = 0
    try:
        with open(target, "xb") as out:  # 'x': never overwrite anything
            while chunk := source.read(CHUNK):
                written += len(chunk)
                if written > limit:
                    raise UploadError("an entry holds more data than its header declares")
                out.write(chunk)
    except FileExistsError:
        raise  # not ours to remove
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return written


def extract_zip(
    zip_path: str | os.PathLike,
    dest: Path,
    max_files: int = 2000,
    max_total_bytes: int = 500_000_000,
    max_ratio: float = 200.0,
    accept=is_image_path,
    kind: str = "an image",
    renamed: dict[str, str] | None = None,
) -> tuple[list[Path], Skipped]:
    """
    Extract the image files of a zip (the files whose name `accept` takes, `kind` in the
    reasons of the others), flattened, into `dest`; `renamed`, if given, gets each extracted
    entry's name mapped to its file's.
    Returns (extracted paths, [(entry, reason) for each entry skipped]). Raises UploadError,
    leaving nothing behind, for anything that is not a zip, breaks a limit, or looks like a bomb.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    label = zip_path.name
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise UploadError(f"{label}: not a zip archive (or a damaged one)") from None

    with archive:
        infos = archive.infolist()
        files = [i for i in infos if not i.is_dir()]
        if len(files) > max_files:
            raise UploadError(
                f"{label}: too many files ({len(files):,}; the limit is {max_files:,})"
            )
        total = sum(i.file_size for i in files)
        if total > max_total_bytes:
            raise UploadError(
                f"{label}: too large when unpacked ({total:,} bytes; "
                f"the limit is {max_total_bytes:,})"
            )
        for i in files:
            ratio = i.file_size / max(i.compress_size, 1)
            if i.file_size > RATIO_FLOOR and ratio > max_ratio:
                raise UploadError(
                    f"{label}: refused as a possible zip bomb ({_display(i.filename)} "
                    f"expands {ratio:,.0f}x; the limit is {max_ratio:,.0f}x)"
                )

        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        taken = {p.name.casefold() for p in dest.iterdir()}
        extracted: list[Path] = []
        skipped: Skipped = []
        budget = max_total_bytes
        try:
            for info in infos:
                reason = _unsafe_reason(info, accept, kind)
                if reason is not None:
                    skipped.append((_display(info.filename), reason))
                    continue
                target = root / safe_name(info.filename, taken)
                if target.parent != root:  # cannot happen with flattened names; never trust it
                    skipped.append((_display(info.filename), "unsafe name"))
                    continue
                try:
                    with archive.open(info) as source:
                        budget -= _copy(source, target, min(info.file_size, budget))
                except DAMAGED as error:
                    skipped.append((_display(info.filename), f"damaged or unsupported ({error})"))
                    continue
                extracted.append(target)
                if renamed is not None:
                    renamed[info.filename.replace("\\", "/")] = target.name
        except UploadError as error:
            for path in extracted:
                path.unlink(missing_ok=True)
            raise UploadError(f"{label}: {error}") from None
    return extracted, skipped


CAPTIONS_CSV = "captions.csv"


def _training_file(name: str) -> bool:
    return is_image_path(name) or name.lower().endswith(".txt") or name.lower() == CAPTIONS_CSV


def extract_training_zip(zip_path: str | os.PathLike, dest: Path, **limits) -> tuple[Path, Skipped]:
    """A zip of captioned images for training, through the same gate as the index's zips
    (`extract_zip`'s limits and checks), flattened into `dest`: images with a `.txt` of
    captions beside each (one per line), or a `captions.csv` (columns `image_path`, `caption`)
    whose image paths are mapped to the flattened files. Returns (what `vlm train --data`
    reads: `dest`, or the csv rewritten with those paths; [(entry, reason) skipped])."""
    renamed: dict[str, str] = {}
    extract_zip(zip_path, dest, accept=_training_file, kind="an image, a .txt or captions.csv",
                renamed=renamed, **limits)  # fmt: skip
    tables = [entry for entry in renamed if PurePosixPath(entry).name.lower() == CAPTIONS_CSV]
    skipped: Skipped = []
    if not tables:
        return dest, skipped
    by_entry = {entry: name for entry, name in renamed.items() if is_image_path(entry)}
    by_base = {PurePosixPath(entry).name: name for entry, name in by_entry.items()}
    source = dest / renamed[tables[0]]
    rows = list(csv.DictReader(source.open(newline="", encoding="utf-8")))
    folder = PurePosixPath(tables[0]).parent
    table = dest / f"_{CAPTIONS_CSV}"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "caption"])
        for number, row in enumerate(rows, 2):
            image = row.get("image_path") or row.get("image") or row.get("file_name") or ""
            caption = (row.get("caption") or row.get("text") or "").strip()
            entry = str(folder / image.strip().replace("\\", "/")).removeprefix("./")
            name = by_entry.get(entry) or by_entry.get(image.strip()) or by_base.get(
                PurePosixPath(image.strip()).name)  # fmt: skip
            if name and caption:
                writer.writerow([name, caption])
                continue
            why = "no caption" if name else f"no image {image!r} in the zip"
            skipped.append((f"{CAPTIONS_CSV} row {number}", why))
    return table, skipped


def collect_uploads(paths: list[str | Path], dest: Path, **limits) -> tuple[list[Path], Skipped]:
    """
    Image paths from uploaded files: images are kept as they are (not decoded here), zips are
    extracted into `dest` with extract_zip(**limits). Returns (images, [(name, reason), ...]).
    """
    images: list[Path] = []
    skipped: Skipped = []
    for path in map(Path, paths):
        if not path.is_file():
            skipped.append((path.name, "no such file"))
        elif path.suffix.lower() == ".zip":
            try:
                found, rejected = extract_zip(path, dest, **limits)
            except UploadError as error:
                skipped.append((path.name, str(error).removeprefix(f"{path.name}: ")))
                continue
            images.extend(found)
            skipped.extend((f"{path.name}/{name}", reason) for name, reason in rejected)
        elif is_image_path(path):
            images.append(path)
        else:
            skipped.append((path.name, "not an image"))
    return images, skipped


class ScratchFolder:
    """One folder for a server's short-lived output files (a CSV to download, …), so that
    requests leave nothing behind: each file gets its own subfolder, removed once it is
    older than `max_age` seconds (by every new file, and by a sweeper thread every quarter of
    that age while the folder exists), and the folder is removed when the process exits. It
    holds at most what `max_age` seconds of requests write."""

    def __init__(self, prefix: str = "vlm-", max_age: float = 600.0):
        self.prefix, self.max_age = prefix, max_age
        self._root: Path | None = None
        self._lock = threading.Lock()

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(max(0.5, self.max_age / 4))
            with self._lock:
                self.sweep()

    def new_file(self, name: str) -> Path:
        """A path named `name` in a new subfolder (not created: the caller writes it)."""
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix=self.prefix))
                atexit.register(shutil.rmtree, self._root, ignore_errors=True)
                threading.Thread(target=self._sweep_forever, daemon=True).start()
            self.sweep()
            folder = self._root / uuid.uuid4().hex
            folder.mkdir()
            return folder / name

    def sweep(self, max_age: float | None = None) -> None:
        """Remove the subfolders older than `max_age` (default: the folder's)."""
        if self._root is None:
            return
        cutoff = time.time() - (self.max_age if max_age is None else max_age)
        for folder in self._root.iterdir():
            try:
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:  # swept by another process meanwhile
                pass


# -----------------------------------------------------------------------------
# text


def check_length(text: str | None, what: str, max_chars: int) -> str:
    """`text` (None as ""), refused with a clear message, before any other work, when it is
    longer than `max_chars` characters."""
    text = text or ""
    if len(text) > max_chars:
        raise UploadError(
            f"{what} is too long ({len(text):,} characters; the limit is {max_chars:,})"
        )
    return text


def parse_labels(
    text: str | None, max_labels: int = 1000, max_label_chars: int | None = None
) -> list[str]:
    """
    Labels from one-per-line and/or comma-separated text; "double quotes" allow commas inside
    a label. Whitespace is tidied, empties dropped, duplicates (ignoring case) dropped in order.
    With `max_label_chars`, a longer label is refused, and so is a text too long to hold only
    `max_labels` such labels (checked first, before parsing).
    """
    if max_label_chars is not None:
        check_length(text, "the list of labels", max_labels * (max_label_chars + 4))
    labels: list[str] = []
    seen: set[str] = set()
    for line in _strip_controls(text or "").splitlines():
        for field in next(csv.reader([line], skipinitialspace=True), []):
            label = _collapse(field)
            if label and label.casefold() not in seen:
                seen.add(label.casefold())
                labels.append(label)
    if not labels:
        raise UploadError("no labels given: write one per line, or separate them with commas")
    if len(labels) > max_labels:
        raise UploadError(f"too many labels ({len(labels):,}; the limit is {max_labels:,})")
    for number, label in enumerate(labels, 1):
        if max_label_chars is not None:
            check_length(label, f"label {number}", max_label_chars)
    return labels


def parse_templates(text: str | None, max_templates: int = 100, max_chars: int = 200) -> list[str]:
    """Zero-shot prompt templates, one per line, each with a "{}" where the label goes; blank
    lines are dropped. Too many, too long or without "{}": UploadError, before any work."""
    check_length(text, "the templates", max_templates * (max_chars + 2))
    templates = [t.strip() for t in _strip_controls(text or "").splitlines() if t.strip()]
    if len(templates) > max_templates:
        raise UploadError(
            f"too many templates ({len(templates):,}; the limit is {max_templates:,})"
        )
    for number, template in enumerate(templates, 1):
        check_length(template, f"template {number}", max_chars)
        if "{}" not in template:
            raise UploadError(f"Each template needs a {{}} where the label goes: {template!r}")
    return templates


def check_prompt_count(labels: int, templates: int, max_prompts: int) -> None:
    """Zero-shot encodes one text per label and template: refuse, before encoding any, a
    request whose count would hold the model for long (the cost bound of /classify)."""
    if labels * templates > max_prompts:
        raise UploadError(
            f"too many labels × templates ({labels:,} × {templates:,} = "
            f"{labels * templates:,} texts to encode; the limit is {max_prompts:,}): "
            "use fewer labels or fewer templates"
        )


def clean_question(text: str | None, max_chars: int = 500) -> str:
    """The question with control characters removed and whitespace collapsed."""
    if len(text or "") > 8 * max_chars:  # so long that collapsing spaces cannot save it
        check_length(text, "the question", max_chars)
    question = _collapse(text or "")
    if not question:
        raise UploadError("the question is empty")
    if len(question) > max_chars:
        raise UploadError(
            f"the question is too long ({len(question):,} characters; the limit is {max_chars:,})"
        )
    return question
