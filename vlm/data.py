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
bytes of that one sample), and only the caption metadata of JSON files is read whole.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image

from .images import is_image_path, load_image

FORMATS = ("karpathy", "coco", "csv", "tsv", "folder", "webdataset", "qa")
QUESTION_TEMPLATE = "Question: {question} Answer: {answer}"


@dataclasses.dataclass
class Example:
    """One image and what is said about it: captions, or a question and its answer."""

    image: str | bytes  # a file path, or the encoded bytes of a WebDataset sample
    captions: list[str] = dataclasses.field(default_factory=list)
    question: str | None = None
    answer: str | None = None
    answers: list[str] = dataclasses.field(default_factory=list)  # all annotators' (VQA)
    key: str = ""  # an id for reports (COCO image id, file name, sample key)

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
            return [QUESTION_TEMPLATE.format(question=self.question, answer=self.answer)]
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
    raise ValueError(
        f"can't tell the format of {path}; pass one of {', '.join(FORMATS)} explicitly"
    )


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
        self.format = detect_format(path) if format == "auto" else format
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
        self.split = split
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        self.images = Path(images) if images else base

    def __iter__(self) -> Iterator[Example]:
        return getattr(self, f"_read_{self.format}")()

    def __repr__(self) -> str:
        return f"ExampleSource({str(self.path)!r}, format={self.format!r}, split={self.split!r})"

    def _image_path(self, *parts: str) -> str:
        return str(self.images.joinpath(*parts))

    def _read_karpathy(self) -> Iterator[Example]:
        data = json.loads(Path(self.path).read_text(encoding="utf-8"))
        wanted = {"train": {"train", "restval"}}.get(self.split, {self.split})
        for item in data["images"]:
            if self.split is not None and item.get("split") not in wanted:
                continue
            path = self._image_path(item.get("filepath", ""), item["filename"])
            captions = [s["raw"].strip() for s in item["sentences"]]
            yield Example(path, captions, key=str(item.get("cocoid", item["filename"])))

    def _read_coco(self) -> Iterator[Example]:
        data = json.loads(Path(self.path).read_text(encoding="utf-8"))
        captions: dict[int, list[str]] = defaultdict(list)
        for annotation in data["annotations"]:
            captions[annotation["image_id"]].append(annotation["caption"].strip())
        for image in data["images"]:
            if image["id"] in captions:
                path = self._image_path(image["file_name"])
                yield Example(path, captions[image["id"]], key=str(image["id"]))

    def _read_csv(self, delimiter: str = ",") -> Iterator[Example]:
        with open(self.path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            fields = reader.fieldnames or []
            image_col = _column(fields, ("image_path", "image", "filepath", "file_name", "path"))
            text_col = _column(fields, ("caption", "text", "sentence"))
            if image_col is None or text_col is None:
                raise ValueError(
                    f"{self.path}: needs an image column (image_path) and a caption column "
                    f"(caption); it has {fields}"
                )
            for row in reader:
                yield Example(self._image_path(row[image_col]), [row[text_col].strip()],
                              key=row[image_col])  # fmt: skip

    def _read_tsv(self) -> Iterator[Example]:
        return self._read_csv(delimiter="\t")

    def _read_folder(self) -> Iterator[Example]:
        for path in sorted(Path(self.path).rglob("*")):
            sidecar = path.with_suffix(".txt")
            if is_image_path(path) and sidecar.is_file():
                lines = sidecar.read_text(encoding="utf-8").splitlines()
                captions = [line.strip() for line in lines if line.strip()]
                if captions:
                    yield Example(str(path), captions, key=path.name)

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
                yield Example(image, captions, key=sample["__key__"])

    def _read_qa(self) -> Iterator[Example]:
        path = Path(self.path)
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if text.lstrip().startswith("[") else _json_lines(text)
        for row in rows:
            given = row.get("answers", row.get("answer"))
            answers = [str(a).strip() for a in (given if isinstance(given, list) else [given])]
            yield Example(self._image_path(row["image"]), question=row["question"].strip(),
                          answer=answers[0], answers=answers, key=row["image"])  # fmt: skip


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


class FileDataset:
    """Example files as a training dataset for `vlm.train` (the interface of
    `vlm.datasets`): captions and Q/A lines after the prefix, captions for the LM and CLIP
    stages when those are trained too."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        format: str = "auto",
        split: str | None = "train",
        images: str | os.PathLike | None = None,
        limit: int | None = None,
    ):
        self.source = read_examples(list(paths), format, split=split, images=images)
        self.limit = limit

    def examples(self) -> Iterator[Example]:
        """The examples, streamed (at most `limit`)."""
        for i, example in enumerate(self.source):
            if self.limit is not None and i >= self.limit:
                return
            yield example

    def texts(self, n: int, seed: int) -> list[str]:
        """Every caption and Q/A line, for the LM stage (`n` is ignored: all of them)."""
        return [text for example in self.examples() for text in example.texts()]

    def clip_data(self, n: int, seed: int) -> list[tuple[Image.Image, list[str]]]:
        """(image, captions) pairs for the CLIP stage, images decoded when indexed."""
        return _Lazy([e for e in self.examples() if e.captions])

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
