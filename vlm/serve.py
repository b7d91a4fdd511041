"""Serving: the models a server offers, by name, each with its turn; their search indexes;
and the task calls behind each request, checked against the limits before the model runs.

No UI here: the Gradio page (`app.py`) is layout plus handlers that call `Service`, and the
command line (`vlm index`) opens its indexes with `open_index`. A refused request raises
`RequestError` (a ValueError) with the message the user sees.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from .examples import all_example_images
from .images import ImageError
from .inputs import ImageGate, PathGuard, number
from .pipeline import Pipeline
from .presets import PRESETS, choose_default_model, hub_reachable, models_for_task, runnable_presets
from .search import MANIFEST, Hit, SearchIndex
from .streaming import TextStream
from .tasks import TASKS, UnsupportedTaskError
from .uploads import (
    Skipped,
    check_length,
    check_prompt_count,
    clean_question,
    collect_uploads,
    parse_labels,
    parse_templates,
)
from .visualize import overlay_heatmap

log = logging.getLogger("vlm.serve")

MAX_NEW_TOKENS = int(os.environ.get("VLM_MAX_NEW_TOKENS", 60))
MAX_LABELS = int(os.environ.get("VLM_MAX_LABELS", 2000))
MAX_QUESTION_CHARS = int(os.environ.get("VLM_MAX_QUESTION_CHARS", 500))
MAX_UPLOAD_FILES = int(os.environ.get("VLM_MAX_UPLOAD_FILES", 500))
# Text limits, checked before any tokenising: labels (also the explain phrase and a search
# text), zero-shot templates (count, length, and labels × templates: the cost of /classify),
# few-shot texts and prompt.
MAX_LABEL_CHARS = int(os.environ.get("VLM_MAX_LABEL_CHARS", 300))
MAX_TEMPLATES = int(os.environ.get("VLM_MAX_TEMPLATES", 100))
MAX_TEMPLATE_CHARS = int(os.environ.get("VLM_MAX_TEMPLATE_CHARS", 200))
MAX_CLASSIFY_TEXTS = int(os.environ.get("VLM_MAX_CLASSIFY_TEXTS", 20_000))
MAX_FEW_SHOT_CHARS = int(os.environ.get("VLM_MAX_FEW_SHOT_CHARS", 1000))
MAX_CHOICES = 50


class RequestError(ValueError):
    """A request the server refuses; the message says why, for the user."""


# ---------------------------------------------------------------------------- models


class Models:
    """The pipelines this server has loaded, by name; the first one is the default."""

    def __init__(self, requested: str | None):
        hub = functools.cache(lambda: hub_reachable())  # asked at most once, briefly
        if requested:
            self.default, self.reason = requested, "chosen with --model / VLM_MODEL"
        else:
            self.default, self.reason = choose_default_model(hub=hub)
        self._loaded: dict[str, Pipeline] = {}
        self._turns: dict[str, threading.RLock] = {}
        self._lock = threading.Lock()
        self._runnable = runnable_presets(hub=hub)
        try:
            self.get(self.default)
        except Exception as error:  # a missing or unreachable model: fall back, say why
            if self.default == "shapeworld":
                raise
            log.warning("could not load %s: %s", self.default, error)
            self.reason = f"{self.default} could not be loaded ({error}); the bundled model runs"
            self.default = "shapeworld"
            self.get(self.default)

    def choices(self) -> list[str]:
        """The models the picker offers: the default, then every preset this machine can run
        (cached or downloadable, on a GPU for those that need one)."""
        return list(dict.fromkeys([self.default, *self._runnable]))

    def require(self, name: str, task: str) -> None:
        """Refuse `task` on a model not trained for it, naming the offered models that are."""
        if task not in self.get(name).tasks:
            raise UnsupportedTaskError(task, name, models_for_task(task, self.choices()))

    def pick(self, name: str | None, guard: PathGuard) -> str:
        """The model a request asked for: one this server offers, or a model folder under an
        allowed folder; never a hub id or a folder elsewhere (nothing a user types is fetched
        or read unless allowed)."""
        if not name:
            return self.default
        if name in self.choices():
            return name
        folder = guard.allows(name)
        if folder is not None and folder.is_dir():
            return str(folder)
        raise RequestError(
            f"Model {name!r} is not offered here: choose one of {', '.join(self.choices())}, "
            "or a model folder inside a folder allowed with --allowed-dir."
        )

    def get(self, name: str | None) -> Pipeline:
        name = name or self.default
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = Pipeline.from_pretrained(name)
            return self._loaded[name]

    @contextlib.contextmanager
    def use(self, name: str | None):
        """The pipeline, for one request at a time. Gradio runs two requests at once, and a
        pipeline is not safe to share between threads: the image encoder switches its ViT to
        also return patch tokens for the length of a call (open_clip's `output_tokens`), and
        a search index is changed in place. Requests take turns per model; torch spreads each
        one over every core anyway."""
        pipeline = self.get(name)
        with self._lock:
            turn = self._turns.setdefault(name or self.default, threading.RLock())
        with turn:
            yield pipeline

    def notice(self, name: str | None = None) -> str:
        name = name or self.default
        preset = PRESETS.get(name)
        what = preset.description if preset else name
        why = self.reason if name == self.default else "chosen in the model picker"
        pipeline = self.get(name)
        does = ", ".join(TASKS[task].split(" (")[0] for task in TASKS if task in pipeline.tasks)
        device = pipeline.device.type.upper()
        return f"**Model: `{name}`** — {what}. *{why}.* Running on {device}. It can: {does}."


# ---------------------------------------------------------------------------- search indexes


def index_folder(index_root: Path, model: str) -> Path:
    """Where a model's search index lives: one folder per model, named safely."""
    return Path(index_root) / re.sub(r"^\.+|[^A-Za-z0-9_.-]+", "_", model)


def open_index(folder: Path, pipeline: Pipeline, images: Iterable = (), **options) -> SearchIndex:
    """The index saved in `folder`, or else a new one of `images` (not saved yet; `options`
    as `Pipeline.build_index` takes them)."""
    if (Path(folder) / MANIFEST).exists():
        return SearchIndex.load(folder, pipeline.encoder)
    return pipeline.build_index(list(images), **options)


class Indexes:
    """Each model's persistent search index, one folder per model under `root`: the bundled
    examples the first time, then what users add (copied in, content-addressed)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._open: dict[str, SearchIndex] = {}
        self._lock = threading.Lock()

    def folder(self, model: str) -> Path:
        return index_folder(self.root, model)

    def get(self, model: str, pipeline: Pipeline) -> SearchIndex:
        with self._lock:
            if model not in self._open:
                folder = self.folder(model)
                index = open_index(folder, pipeline, all_example_images())
                if not (folder / MANIFEST).exists():
                    index.save(folder)
                self._open[model] = index
            return self._open[model]

    def add(
        self, model: str, pipeline: Pipeline, uploads: list[Path], progress=None
    ) -> tuple[SearchIndex, int, Skipped]:
        """Add uploaded images and zips of images: (the index, how many it took, what it
        skipped and why). Our own copies are kept (the uploads and the unpacked zip are
        temporary); what the index does not take is removed. `progress(done, of)`."""
        index = self.get(model, pipeline)
        with tempfile.TemporaryDirectory(prefix="vlm-unpack-") as unpacked:
            paths, skipped = collect_uploads(
                [str(f) for f in uploads], Path(unpacked), max_files=MAX_UPLOAD_FILES
            )
            if progress:
                progress(0, len(paths))
            added = index.add_copies(paths, self.folder(model) / "images", progress=progress)
            with self._lock:
                index.save(self.folder(model))
        return index, added, skipped + index.skipped


# ---------------------------------------------------------------------------- the requests


def max_tokens(value) -> int:
    return int(number(value, "Max length", 1, MAX_NEW_TOKENS, " tokens"))


def decoding(mode="greedy", beams=3, top_p=0.9, temperature=1.0, max_length=30) -> dict:
    """A request's decoding ("greedy", "beam search" or "nucleus sampling", and its numbers),
    checked, as `generate` options."""
    options = dict(max_new_tokens=max_tokens(max_length))
    if mode == "beam search":
        options["num_beams"] = int(number(beams, "Beams", 1, 8))
    elif mode == "nucleus sampling":
        top_p, temperature = number(top_p, "Top-p", 0, 1), number(temperature, "Temperature", 0, 2)
        options.update(do_sample=True, top_p=top_p, temperature=max(temperature, 1e-3))
    return options


def _count(files, most: int, what: str, none: str) -> None:
    if not files:
        raise RequestError(none)
    if len(files) > most:
        raise RequestError(f"At most {most} {what} at once.")


class Service:
    """What a server does for each request: check what it names (every image and file through
    the gate, every text within its limit), hold the model's turn (see `Models.use`) for the
    model's work, and answer. Every server path a request names must lie under the `guard`'s
    folders."""

    def __init__(self, models: Models, index_root: Path, guard: PathGuard):
        self.models, self.guard = models, guard
        self.gate = ImageGate(guard)  # every image a request names passes it
        self.indexes = Indexes(index_root)

    def using(self, model: str | None):
        """The model a request asked for, held for this request (see Models.use)."""
        return self.models.use(self.models.pick(model, self.guard))

    def pipeline(self, model: str | None) -> Pipeline:
        """The model a request asked for, not held: for work that is safe to share."""
        return self.models.get(self.models.pick(model, self.guard))

    def image(self, image, what: str = "an image") -> Image.Image:
        if image is None:
            raise RequestError(f"Please give {what} (upload, drop, paste or use the webcam).")
        return self.gate.open(image)

    def files(self, files) -> list[Path]:
        """Every file's path, inside the allowed folders and the byte limit (all or none)."""
        return [self.gate.read_path(getattr(f, "path", None) or f) for f in files]

    def notice(self, model: str | None = None) -> str:
        return self.models.notice(self.models.pick(model, self.guard))

    # ------------------------------------------------------------------ what the LM writes
    # Streams: the LM runs outside the model's turn, so the next request need not wait.

    def caption(self, image, fields: Sequence = (), model: str | None = None) -> TextStream:
        """A stream of the caption; `fields`: the request's `decoding` fields."""
        options, picture = decoding(*fields), self.image(image)
        with self.using(model) as pipeline:
            return pipeline.stream_caption(picture, **options)

    def caption_files(self, files, fields: Sequence = (), model=None) -> list[tuple[str, str]]:
        """(file name, caption) rows; an image that cannot be read gets "⚠ why" instead."""
        _count(files, MAX_UPLOAD_FILES, "images", "Please add one or more image files.")
        options, rows, good = decoding(*fields), [], []
        for path in self.files(files):
            try:
                good.append((path.name, self.gate.open(path)))
            except ImageError as error:
                rows.append((path.name, f"⚠ {error}"))
        captions = []
        if good:
            with self.using(model) as pipeline:
                captions = pipeline.caption([im for _, im in good], **options)
        return [(name, c) for (name, _), c in zip(good, captions, strict=True)] + rows

    def answer(self, image, question: str = "", choices_text: str = "", model=None):
        """A stream of the answer, or with choices (comma-separated) the chosen one and every
        choice's score: (stream, None) or (None, (best, scores))."""
        question = clean_question(question or "", max_chars=MAX_QUESTION_CHARS)
        choices = None
        if (choices_text or "").strip():
            choices = parse_labels(choices_text, MAX_CHOICES, MAX_LABEL_CHARS)
        picture = self.image(image)
        with self.using(model) as pipeline:
            if choices:  # scored, not written
                return None, pipeline.answer([picture], [question], choices, return_scores=True)[0]
            return pipeline.stream_answer(picture, question), None

    def few_shot(
        self, examples: Sequence[tuple], query, prompt: str = "", length=20, model=None,
        describe: bool = True,
    ) -> TextStream:  # fmt: skip
        """The LM's continuation of (image, text) examples, then the query image and `prompt`;
        with `describe`, each image's caption is written after it first."""
        for number_, (_, text) in enumerate(examples, 1):
            check_length(text, f"Text {number_}", MAX_FEW_SHOT_CHARS)
        check_length(prompt, "the prompt", MAX_FEW_SHOT_CHARS)
        length = max_tokens(length)
        parts: list = []
        for image, text in examples:
            if image is not None and (text or "").strip():
                parts += [self.image(image), text.strip() + "\n"]
            elif image is not None or (text or "").strip():
                raise RequestError("Each example needs both an image and its text.")
        if not parts:
            raise RequestError("Give at least one example: an image and its text.")
        parts += [self.image(query, "a query image"), (prompt or "").strip()]
        with self.using(model) as pipeline:
            return pipeline.stream_continue(parts, max_new_tokens=length, describe=describe)

    # ------------------------------------------------------------------ CLIP's side

    def classify(self, image, labels_text: str = "", templates_text: str = "", model=None):
        """Each label's probability, best first."""
        labels = parse_labels(labels_text or "", MAX_LABELS, MAX_LABEL_CHARS)
        templates = parse_templates(templates_text, MAX_TEMPLATES, MAX_TEMPLATE_CHARS)
        pipeline = self.pipeline(model)
        check_prompt_count(len(labels), len(templates or pipeline.templates()), MAX_CLASSIFY_TEXTS)
        picture = self.image(image)
        # the label texts are encoded (and cached) outside the model's turn, which only the
        # image side needs: a caption does not wait for thousands of texts
        pipeline.class_weights(labels, templates or None)
        with self.using(model) as pipeline:
            return pipeline.classify([picture], labels, templates or None)[0]

    def explain(self, image, text: str = "", model=None) -> Image.Image:
        """The image with a heatmap of where `text` matches it."""
        if not (text or "").strip():
            raise RequestError("Type a label or a phrase to look for.")
        check_length(text, "the phrase", MAX_LABEL_CHARS)
        picture = self.image(image)
        with self.using(model) as pipeline:
            grid = pipeline.explain(picture, text.strip())
        return overlay_heatmap(picture, grid)

    def _searchable(self, model: str | None) -> str:
        name = self.models.pick(model, self.guard)
        self.models.require(name, "search")
        return name

    def search(self, query_text="", query_image=None, k=8, model=None) -> list[Hit]:
        """The model's index's best `k` hits for the image, or else the text."""
        k = number(k, "Results", 1, 100)
        if query_image is not None:
            query = self.image(query_image)
        elif (query_text or "").strip():
            query = check_length(query_text, "the text query", MAX_LABEL_CHARS).strip()
        else:
            raise RequestError("Type a text query or give a query image.")
        with self.using(model) as pipeline:
            return self.indexes.get(self._searchable(model), pipeline).search(query, k=int(k))

    def index_add(self, files, model=None, progress=None) -> tuple[SearchIndex, int, Skipped]:
        """Add image files and zips of images to the model's index (see `Indexes.add`)."""
        _count(files, MAX_UPLOAD_FILES, "files", "Drop images or a .zip of images to add.")
        uploads = self.files(files)
        with self.using(model) as pipeline:
            return self.indexes.add(self._searchable(model), pipeline, uploads, progress)

    def latest(self, model=None, count: int = 60) -> list[str]:
        """The last `count` items added to the model's index."""
        with self.using(model) as pipeline:
            return self.indexes.get(self._searchable(model), pipeline).items[-count:]
