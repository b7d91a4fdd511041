"""Image-text datasets on disk, read as a stream of `Example`s in one interface.

Formats (`read_examples(path, format="auto")`):
- `karpathy`  COCO in the Karpathy split format (`dataset_coco.json`: images with
              `filepath`, `filename`, `split`, `sentences[].raw`);
- `coco`      the official `captions_*.json` (`images[].file_name`, `annotations[].caption`);
- `csv`/`tsv` a table with an image column (`image_path`, `image`, `filepath`, `file_name`)
              and a `caption` (or `text`) column; paths relative to the table's folder;
- `folder`    images with a sidecar `.txt` of the same name (one caption per line);
- `webdataset` tar shards (a file, a folder of `.tar`, a glob or a brace pattern) whose
              samples hold an image (`jpg`, `png`, `webp`, …) and a `txt` or `json` caption;
- `qa`        JSON or JSON lines of `{"image", "question", "answer"}` (VQA-style training).

Images are never loaded here: an example holds a path (or, for WebDataset, the encoded
bytes of that one sample), and only the caption metadata of JSON files is read whole. Each
example says where it came from (`source`: "captions.csv row 7", "photos/cat.jpg"), so a bad
row is reported by where it is. Rows whose image is missing or unreadable are skipped and
counted (`BadRows`), the same way in training and evaluation, or stop the run (`strict`).

`FileDataset` holds out a validation part: `val_data` files, or else a `val_fraction` of the
images (chosen by a hash of each image's name as the data writes it, so every caption of an
image falls on the same side and the split is the same in every run and every folder);
Karpathy data keeps its own `val` split.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image

from .calibration import CalibrationExample
from .errors import InputError
from .images import is_image_path, load_image
from .prompts import qa_text
from .training.data import TrainingData

FORMATS = ("karpathy", "coco", "csv", "tsv", "folder", "webdataset", "qa")


@dataclasses.dataclass
class Example:
    """One image and what is said about it: captions, or a question and its answer."""

    image: str | bytes  # a file path, or the encoded bytes of a WebDataset sample
    captions: list[str] = dataclasses.field(default_factory=list)
    question: str | None = None
    answer: str | None = None
    answers: list[str] = dataclasses.field(default_factory=list)  # all annotators' (VQA)
    key: str = ""  # an id for reports (COCO image id, file name, sample key)
    source: str = ""  # where it is, for messages: "captions.csv row 7", "images/cat.jpg"
    problem: str | None = None  # why it can't be used (its image file is missing)

    def load(self) -> Image.Image:
        """The decoded RGB image (with vlm.images' checks)."""
        return load_image(self.image)

    def content_hash(self) -> str:
        """sha256 of the encoded image: the key of the feature cache."""
        if isinstance(self.image, bytes):
            return hashlib.sha256(self.image).hexdigest()
        with open(self.image, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def texts(self) -> list[str]:
        """What the frozen LM reads after the prefix: each caption, or the Q/A line."""
        if self.question is not None:
            return [qa_text(self.question, self.answer)]
        return list(self.captions)


def detect_format(path: str | os.PathLike) -> str:
    """Guess a dataset's format from its path and, for JSON, its top-level keys."""
    text = str(path)
    if any(c in text for c in "*{") or text.endswith(".tar"):
        return "webdataset"
    path = Path(path)
    if path.is_dir():
        return "webdataset" if any(path.glob("*.tar")) else "folder"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix == ".jsonl":
        return "qa"
    if suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            head = handle.read(1 << 16).lstrip()
        if head.startswith("["):
            return "qa"
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if "annotations" in data:
            return "coco"
        if "images" in data and data["images"] and "sentences" in data["images"][0]:
            return "karpathy"
    raise DataError(f"can't tell the format of {path}; pass one of {', '.join(FORMATS)} explicitly")


class DataError(InputError):
    """Data that can't be used as given (a missing file or column, a bad row under `strict`)."""


class BadRows:
    """The examples left out of a run and why: `skip` records one (or raises `DataError`
    when `strict`), `report` says how many and lists the first few with where they are."""

    def __init__(self, strict: bool = False, shown: int = 10):
        self.strict = strict
        self.shown = shown
        self.rows: list[tuple[str, str]] = []  # (source, reason)

    def skip(self, source: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{source}: {reason} (without --strict such rows are skipped)")
        self.rows.append((source, reason))

    def usable(self, examples: Iterable[Example]) -> Iterator[Example]:
        """The examples whose image is there; the others are skipped (or raise)."""
        for example in examples:
            if example.problem:
                self.skip(example.source, example.problem)
            else:
                yield example

    def __len__(self) -> int:
        return len(self.rows)

    def report(self, total: int | None = None) -> str:
        if not self.rows:
            return ""
        n = len(self.rows)
        count = f"{n} of {total} rows" if total is not None else f"{n} row{'s' * (n > 1)}"
        lines = [f"skipped {count} (--strict stops at the first instead):"]
        lines += [f"  {source}: {reason}" for source, reason in self.rows[: self.shown]]
        if len(self.rows) > self.shown:
            lines.append(f"  … and {len(self.rows) - self.shown} more")
        return "\n".join(lines)


class ExampleSource:
    """A re-iterable stream of examples from one dataset (see the module docstring).

    `split` filters Karpathy-format data ("train" includes "restval", as is customary);
    `images` is the image folder when paths in the file are relative to somewhere else
    (COCO: the folder holding `train2014/` and `val2014/`)."""

    def __init__(
        self,
        path: str | os.PathLike,
        format: str = "auto",
        split: str | None = None,
        images: str | os.PathLike | None = None,
    ):
        self.path = path
        if not any(c in str(path) for c in "*{") and not Path(path).exists():
            raise DataError(f"no such data file or folder: {path}")
        self.format = detect_format(path) if format == "auto" else format
        if self.format not in FORMATS:
            raise DataError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
        self.split = split
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        self.images = Path(images) if images else base
        self._root_hint = (
            f"paths are relative to --images ({self.images})"
            if images
            else f"paths are relative to the folder of {Path(path).name} ({self.images})"
        )

    def __iter__(self) -> Iterator[Example]:
        return getattr(self, f"_read_{self.format}")()

    @property
    def _name(self) -> str:
        return Path(str(self.path)).name

    def __repr__(self) -> str:
        return f"ExampleSource({str(self.path)!r}, format={self.format!r}, split={self.split!r})"

    def _image_path(self, *parts: str) -> str:
        return str(self.images.joinpath(*parts))

    def _example(self, image: str, source: str, **fields) -> Example:
        """An example of the image file at `image`, marked with a problem if it is missing."""
        problem = None
        if not os.path.isfile(image):
            shown = os.path.relpath(image, self.images)
            problem = f"no image file {shown} ({self._root_hint})"
        return Example(image, source=source, problem=problem, **fields)

    def _read_karpathy(self) -> Iterator[Example]:
        data = json.loads(Path(self.path).read_text(encoding="utf-8"))
        wanted = {"train": {"train", "restval"}}.get(self.split, {self.split})
        for item in data["images"]:
            if self.split is not None and item.get("split") not in wanted:
                continue
            path = self._image_path(item.get("filepath", ""), item["filename"])
            captions = [s["raw"].strip() for s in item["sentences"]]
            key = str(item.get("cocoid", item["filename"]))
            yield self._example(path, f"{self._name} image {key}", captions=captions, key=key)

    def _read_coco(self) -> Iterator[Example]:
        data = json.loads(Path(self.path).read_text(encoding="utf-8"))
        captions: dict[int, list[str]] = defaultdict(list)
        for annotation in data["annotations"]:
            captions[annotation["image_id"]].append(annotation["caption"].strip())
        for image in data["images"]:
            if image["id"] in captions:
                path, key = self._image_path(image["file_name"]), str(image["id"])
                yield self._example(path, f"{self._name} image {key}",
                                    captions=captions[image["id"]], key=key)  # fmt: skip

    def _read_csv(self, delimiter: str = ",") -> Iterator[Example]:
        with open(self.path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            fields = reader.fieldnames or []
            image_col = _column(fields, ("image_path", "image", "filepath", "file_name", "path"))
            text_col = _column(fields, ("caption", "text", "sentence"))
            if image_col is None or text_col is None:
                raise DataError(
                    f"{self.path}: needs an image column (image_path, image, filepath, file_name "
                    f"or path) and a caption column (caption, text or sentence); it has "
                    f"{', '.join(fields) or 'no header'}"
                )
            for row in reader:  # row n: line n of the file, the header being row 1
                source = f"{self._name} row {reader.line_num}"
                image, caption = (row.get(image_col) or "").strip(), row.get(text_col) or ""
                if not image or not caption.strip():
                    yield Example("", source=source, problem="no image path or no caption")
                    continue
                yield self._example(self._image_path(image), source,
                                    captions=[caption.strip()], key=image)  # fmt: skip

    def _read_tsv(self) -> Iterator[Example]:
        return self._read_csv(delimiter="\t")

    def _read_folder(self) -> Iterator[Example]:
        for path in sorted(Path(self.path).rglob("*")):
            sidecar = path.with_suffix(".txt")
            if is_image_path(path) and sidecar.is_file():
                lines = sidecar.read_text(encoding="utf-8").splitlines()
                captions = [line.strip() for line in lines if line.strip()]
                if captions:
                    yield Example(str(path), captions, key=path.name,
                                  source=str(path.relative_to(self.path)))  # fmt: skip

    def _read_webdataset(self) -> Iterator[Example]:
        import webdataset as wds

        dataset = wds.WebDataset(
            _shards(self.path), shardshuffle=False, empty_check=False,
            nodesplitter=wds.shardlists.single_node_only,
        )  # fmt: skip
        for sample in dataset:
            image = next((sample[k] for k in _WDS_IMAGE_KEYS if k in sample), None)
            captions = _wds_captions(sample)
            if image is not None and captions:
                shard = Path(sample.get("__url__", self._name)).name
                source = f"{shard} sample {sample['__key__']}"
                yield Example(image, captions, key=sample["__key__"], source=source)

    def _read_qa(self) -> Iterator[Example]:
        path = Path(self.path)
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if text.lstrip().startswith("[") else _json_lines(text)
        for n, row in enumerate(rows, 1):
            given = row.get("answers", row.get("answer"))
            answers = [str(a).strip() for a in (given if isinstance(given, list) else [given])]
            yield self._example(self._image_path(row["image"]), f"{self._name} row {n}",
                                question=row["question"].strip(), answer=answers[0],
                                answers=answers, key=row["image"])  # fmt: skip


_WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def _column(fields: Sequence[str], names: Iterable[str]) -> str | None:
    lowered = {f.strip().lower(): f for f in fields}
    return next((lowered[n] for n in names if n in lowered), None)


def _shards(path: str | os.PathLike) -> list[str] | str:
    text = str(path)
    if "{" in text:
        return text  # webdataset expands brace patterns itself
    if Path(text).is_dir():
        return sorted(str(p) for p in Path(text).glob("*.tar"))
    return sorted(glob.glob(text)) if "*" in text else [text]


def _wds_captions(sample: dict) -> list[str]:
    if "txt" in sample:
        return [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line]
    if "json" in sample:
        meta = json.loads(sample["json"])
        found = meta.get("captions") or meta.get("caption") or meta.get("text") or []
        return [found] if isinstance(found, str) else list(found)
    return []


def _json_lines(text: str) -> Iterator[dict]:
    return (json.loads(line) for line in text.splitlines() if line.strip())


def group_by_image(examples: Iterable[Example]) -> list[Example]:
    """Caption examples of the same image merged into one with all its captions (a CSV has a
    row per caption), in order of first appearance: one image, several references."""
    merged: dict[str | bytes, Example] = {}
    for example in examples:
        if example.image in merged:
            merged[example.image].captions += example.captions
        else:
            merged[example.image] = dataclasses.replace(example, captions=list(example.captions))
    return list(merged.values())


def read_examples(paths: str | os.PathLike | Sequence, format: str = "auto", **options):
    """One `ExampleSource`, or a `Concat` of several (each with its own format guess)."""
    if isinstance(paths, (str, os.PathLike)):
        return ExampleSource(paths, format, **options)
    sources = [ExampleSource(p, format, **options) for p in paths]
    return sources[0] if len(sources) == 1 else Concat(sources)


class Concat:
    """Several example sources read one after the other."""

    def __init__(self, sources: Sequence[ExampleSource]):
        self.sources = list(sources)

    def __iter__(self) -> Iterator[Example]:
        for source in self.sources:
            yield from source


class FileDataset(TrainingData):
    """Example files as a training dataset for `vlm.training` (a `TrainingData`): captions
    and Q/A lines after the prefix, captions for the LM and CLIP stages when those are
    trained too. A validation part is held out of all of them:
    `val_data`, or else Karpathy's `val` split, or else `val_fraction` of the images (0.1 when
    not given; 0: none). Bad rows are skipped and counted in `bad` (`strict`: raise)."""

    from_files = True

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        format: str = "auto",
        split: str | None = "train",
        images: str | os.PathLike | None = None,
        limit: int | None = None,
        val_data: Sequence[str | os.PathLike] = (),
        val_fraction: float | None = None,
        strict: bool = False,
    ):
        self.source = read_examples(list(paths), format, split=split, images=images)
        self.limit = limit
        self.strict = strict
        self.bad = BadRows(strict)  # of the last pass over the training examples
        self.val_bad = BadRows(strict)
        sources = getattr(self.source, "sources", [self.source])
        self.val_source = None
        self.val_fraction = 0.0
        if val_data:
            self.val_source = read_examples(list(val_data), format, split="val", images=images)
        elif (
            val_fraction is None
            and split == "train"
            and {s.format for s in sources} == {"karpathy"}
        ):
            self.val_source = read_examples([s.path for s in sources], "karpathy", split="val",
                                            images=images)  # fmt: skip
        else:
            self.val_fraction = 0.1 if val_fraction is None else val_fraction
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"the validation fraction must be in [0, 1), not {val_fraction}")

    def held_out(self, example: Example) -> bool:
        """Whether the example is in the `val_fraction` part: a hash of its image's key (the
        path as the data file writes it, the COCO id, the sample key), so all captions of an
        image fall on one side, the same in every run and wherever the data is moved (a hash
        of the full path split the same data differently in two folders)."""
        if not self.val_fraction:
            return False
        name = example.key or example.image
        name = name if isinstance(name, bytes) else name.encode()
        digest = int.from_bytes(hashlib.sha256(name).digest()[:8], "big")
        return digest / 2**64 < self.val_fraction

    def examples(self) -> Iterator[Example]:
        """The training examples, streamed (at most `limit`), bad rows skipped."""
        self.bad = BadRows(self.strict)
        kept = (e for e in self.source if not self.held_out(e))
        for i, example in enumerate(self.bad.usable(kept)):
            if self.limit is not None and i >= self.limit:
                return
            yield example

    def val_examples(self) -> Iterator[Example]:
        """The held-out examples (none without a validation part), bad rows skipped."""
        self.val_bad = BadRows(self.strict)
        if self.val_source is not None:
            yield from self.val_bad.usable(self.val_source)
        elif self.val_fraction:
            yield from self.val_bad.usable(e for e in self.source if self.held_out(e))

    def texts(self, n: int, seed: int) -> list[str]:
        """The captions and Q/A lines of the training part, for the LM stage: all of them
        when they are at most `n`, else `n` of them drawn with `seed`."""
        texts = [text for example in self.examples() for text in example.texts()]
        return texts if len(texts) <= n else random.Random(seed).sample(texts, n)

    def val_texts(self) -> list[str]:
        """The held-out captions and Q/A lines (for the LM stage's validation loss)."""
        return [text for example in self.val_examples() for text in example.texts()]

    def clip_data(self, n: int, seed: int) -> list[tuple[Image.Image, list[str]]]:
        """(image, captions) pairs for the CLIP stage, images decoded when indexed."""
        return _Lazy([e for e in self.examples() if e.captions])

    def calibration_examples(self, n: int, seed: int) -> list[CalibrationExample]:
        """The held-out examples (at most `n`; `seed` unused: always the same ones) for the
        model's calibration (`vlm.calibration`): their images, captions and Q/A pairs."""
        examples = []
        for example in itertools.islice(self.val_examples(), n):
            asked = [(example.question, example.answer)] if example.question is not None else []
            examples.append(CalibrationExample(example.load(), list(example.captions), asked))
        return examples

    def pipeline_config(self) -> dict:
        """ClipCap's convention: the caption follows the prefix directly and ends at EOS."""
        return dict(name=Path(str(getattr(self.source, "path", "data"))).stem)


class _Lazy(Sequence):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[Image.Image, list[str]]:
        return self.examples[i].load(), self.examples[i].captions

    @property
    def texts(self) -> list[list[str]]:
        """Every item's captions, without decoding its image (as `ImagePool.texts`)."""
        return [e.captions for e in self.examples]
