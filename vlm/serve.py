"""Serving: the models a server offers, by name, each with its turn; their search indexes;
and the task calls behind each request, checked against the limits before the model runs.

No UI here: the Gradio page (`app.py`) is layout plus handlers that call `Service`, and the
command line (`vlm index`) opens its indexes with `open_index`. A refused request raises
`RequestError` (a ValueError) with the message the user sees.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import functools
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import httpx
import open_clip
import torch
from PIL import Image

from .calibration import NO_MATCH_QUANTILE, UNSURE
from .chat import conversation
from .errors import InputError, ModelLoadError, VLMError, one_line
from .examples import all_example_images
from .images import ImageError, PixelBudget
from .inputs import ImageGate, PathGuard, number
from .limits import Limits, current
from .pipeline import Pipeline
from .presets import PRESETS, choose_default_model, hub_reachable, models_for_task, runnable_presets
from .pretrained import check_confined
from .search import MANIFEST, Hit, IndexLoadError, SearchIndex
from .streaming import TextStream
from .tasks import TASKS, UnsupportedTaskError
from .training.jobs import BASES, TrainingJobs
from .uploads import (
    Skipped,
    check_length,
    check_prompt_count,
    clean_question,
    collect_uploads,
    parse_labels,
    parse_templates,
)
from .video import Video, VideoText, read_video
from .visualize import overlay_heatmap

log = logging.getLogger("vlm.serve")


LIVE_TOKENS = 24  # a live caption's length: enough for three objects, short for the camera


class RequestError(InputError):
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
        # models trained here (vlm.training.jobs), by name: each name holds its job's random id
        self.trained: Callable[[], dict[str, Path]] = dict
        self._runnable = runnable_presets(hub=hub)
        try:
            self.get(self.default)
        except (VLMError, torch.OutOfMemoryError) as error:  # fall back, say why
            if self.default == "shapeworld":
                raise
            log.warning("could not load %s: %s", self.default, error)
            why = error.reason if isinstance(error, ModelLoadError) else one_line(error)
            self.reason = f"{self.default} could not be loaded ({why}); the bundled model runs"
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

    def pick(self, name: str | None, model_dirs: PathGuard) -> str:
        """The model a request asked for: one this server offers, or a model folder under a
        folder the operator allowed for models (`model_dirs`: --allowed-dir, never the upload
        or examples folders), whose config names nothing outside it (`check_confined`);
        never a hub id or a folder elsewhere (nothing a user types is fetched or read unless
        allowed)."""
        if not name:
            return self.default
        if name in self.choices():
            return name
        if (trained := self.trained().get(name)) is not None:
            return str(trained)
        folder = model_dirs.allows(name)
        if folder is not None and folder.is_dir():
            check_confined(folder)
            return str(folder)
        raise RequestError(
            f"Model {name!r} is not offered here: choose one of {', '.join(self.choices())}, "
            "or a model folder inside a folder allowed with --allowed-dir."
        )

    def forget(self, name: str) -> None:
        """Drop a loaded model (a trained one whose job was deleted)."""
        with self._lock:
            self._loaded.pop(name, None)
            self._turns.pop(name, None)

    def get(self, name: str | None) -> Pipeline:
        name = name or self.default
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = Pipeline.from_pretrained(name)
            return self._loaded[name]

    @contextlib.contextmanager
    def use(self, name: str | None, wait: bool = True):
        """The pipeline, for one request at a time (`wait=False`: None at once if another
        request holds it, for work that is stale when it waits). Gradio runs two requests at
        once, and a pipeline is not safe to share between threads: the image encoder switches
        its ViT to also return patch tokens for the length of a call (open_clip's
        `output_tokens`), and a search index is changed in place. Requests take turns per
        model; torch spreads each one over every core anyway."""
        pipeline = self.get(name)
        with self._lock:
            turn = self._turns.setdefault(name or self.default, threading.RLock())
        if not turn.acquire(blocking=wait):  # busy, and the caller would rather not wait
            yield None
            return
        try:
            yield pipeline
        finally:
            turn.release()

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
    """Each model's search index, and what visitors add to it.

    `shared`: one persistent index per model, one folder per model under `root`, the bundled
    examples the first time and then what anyone adds (copied in, content-addressed): a team's
    or a personal deployment, where everyone sees every image.

    Otherwise (the default, for a public demo) every visitor searches the bundled examples
    plus a private copy of their own: what a session adds is searched and shown in that
    session alone, its files copied under a temporary folder of the server's. A private
    gallery is forgotten, files and all, `limits.temp_max_age` seconds after its last use,
    and at most `limits.max_sessions` are kept (the least recently used goes first)."""

    def __init__(self, root: Path, shared: bool = False, limits: Limits | None = None):
        self.root, self.shared = Path(root), shared
        self.limits = limits or current()
        self._open: dict[str, SearchIndex] = {}
        self.damaged: dict[str, str] = {}  # model -> why its saved index could not be read
        self._private: OrderedDict[tuple[str, str], _Private] = OrderedDict()
        self._private_root: Path | None = None
        self._lock = threading.Lock()

    def folder(self, model: str) -> Path:
        return index_folder(self.root, model)

    def damage(self, model: str) -> str:
        """What the page says of `model`'s saved index when it could not be read ("" if it
        could, or has not been opened yet)."""
        why = self.damaged.get(model)
        if why is None:
            return ""
        return (f"The saved search gallery could not be read ({why}); only the bundled "
                "examples are searched.")  # fmt: skip

    def private_root(self) -> Path:
        """Where private galleries keep their files (made on first use, removed at exit)."""
        with self._lock:
            return self._private_root_unlocked()

    def _base(self, model: str, pipeline: Pipeline) -> SearchIndex:
        """The model's index that every visitor sees (call with the lock held). A saved
        index that cannot be read is left as it is and named in `damaged`; meanwhile the
        bundled examples are searched and nothing is added."""
        if model not in self._open:
            if self.shared:
                folder = self.folder(model)
                try:
                    index = open_index(folder, pipeline, all_example_images())
                except IndexLoadError as error:
                    log.warning("shared index of %s unreadable: %s", model, one_line(error))
                    self.damaged[model] = one_line(error)
                    index = pipeline.build_index(all_example_images())
                if model not in self.damaged and not (folder / MANIFEST).exists():
                    index.save(folder)
            else:  # the bundled examples only, whatever an earlier shared run saved
                index = pipeline.build_index(all_example_images())
            self._open[model] = index
        return self._open[model]

    def get(self, model: str, pipeline: Pipeline, session: str | None = None) -> SearchIndex:
        """The index `session` searches: the shared one, or that session's private one (the
        bundled examples until it adds something)."""
        with self._lock:
            base = self._base(model, pipeline)
            if self.shared:
                return base
            self._expire()
            private = self._private.get((model, session or ""))
            if private is None:
                return base
            self._private.move_to_end((model, session or ""))
            private.used = time.monotonic()
            return private.index

    def _make_private(self, model: str, session: str | None) -> _Private:
        """The session's private gallery, made from the base on its first addition."""
        key = (model, session or "")
        with self._lock:
            if key not in self._private:
                folder = self._private_root_unlocked() / uuid.uuid4().hex
                self._private[key] = _Private(self._open[model].copy(), folder)
                while len(self._private) > self.limits.max_sessions:
                    _, oldest = self._private.popitem(last=False)
                    oldest.remove()
            self._private[key].used = time.monotonic()
            return self._private[key]

    def _private_root_unlocked(self) -> Path:
        if self._private_root is None:
            self._private_root = Path(tempfile.mkdtemp(prefix="vlm-galleries-"))
            atexit.register(shutil.rmtree, self._private_root, ignore_errors=True)
        return self._private_root

    def _expire(self) -> None:
        """Forget the private galleries unused for longer than `temp_max_age` (lock held)."""
        cutoff = time.monotonic() - self.limits.temp_max_age
        for key in [k for k, p in self._private.items() if p.used < cutoff]:
            self._private.pop(key).remove()

    def private_bytes(self) -> int:
        """What the private galleries' files take on disk."""
        root = self._private_root
        if root is None:
            return 0
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    def add(
        self, model: str, pipeline: Pipeline, uploads: list[Path], progress=None,
        session: str | None = None,
    ) -> tuple[SearchIndex, int, Skipped]:  # fmt: skip
        """Add uploaded images and zips of images: (the index, how many it took, what it
        skipped and why). Our own copies are kept (the uploads and the unpacked zip are
        temporary); what the index does not take is removed. `progress(done, of)`."""
        self.get(model, pipeline, session)  # the base exists, expired galleries are gone
        if model in self.damaged:
            raise RequestError(f"{self.damage(model)} Nothing is added to it until it is "
                               "repaired or removed.")  # fmt: skip
        if self.shared:
            index, folder = self._open[model], self.folder(model) / "images"
        else:
            private = self._make_private(model, session)
            index, folder = private.index, private.folder
        budget, most = PixelBudget(self.limits.max_request_pixels), self.limits.max_upload_files
        with tempfile.TemporaryDirectory(prefix="vlm-unpack-") as unpacked:
            paths, skipped = collect_uploads(
                [str(f) for f in uploads], Path(unpacked), max_files=most
            )
            if not self.shared and len(index) + len(paths) > most:
                raise RequestError(
                    f"A private gallery holds at most {most} images; this one has "
                    f"{len(index)} and {len(paths)} more were sent."
                )
            if progress:
                progress(0, len(paths))
            added = index.add_copies(paths, folder, progress=progress, budget=budget)
            if self.shared:
                with self._lock:
                    index.save(self.folder(model))
        return index, added, skipped + index.skipped


class _Private:
    """One session's gallery: its index (the base's copy plus its additions), its files."""

    def __init__(self, index: SearchIndex, folder: Path):
        self.index, self.folder, self.used = index, folder, time.monotonic()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------------------- the requests


def max_tokens(value, limits: Limits) -> int:
    return int(number(value, "Max length", 1, limits.max_new_tokens, " tokens"))


def decoding(
    limits: Limits, mode="greedy", beams=3, top_p=0.9, temperature=1.0, max_length=30
) -> dict:
    """A request's decoding ("greedy", "beam search" or "nucleus sampling", and its numbers),
    checked against `limits`, as `generate` options."""
    options = dict(max_new_tokens=max_tokens(max_length, limits))
    if mode == "beam search":
        options["num_beams"] = int(number(beams, "Beams", 1, 8))
    elif mode == "nucleus sampling":
        top_p, temperature = number(top_p, "Top-p", 0, 1), number(temperature, "Temperature", 0, 2)
        options.update(do_sample=True, top_p=top_p, temperature=max(temperature, 1e-3))
    return options


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula


def csv_cell(text: str) -> str:
    """`text` safe in a spreadsheet: a cell that starts as a formula would (`=`, `+`, `-`,
    `@`, a tab, a CR) gets a leading `'`, which spreadsheets show as text (OWASP's advice)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_captions_csv(rows: Iterable[tuple[str, str]], path: Path) -> Path:
    """The "Caption all" table as CSV at `path`, every cell safe to open in a spreadsheet."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("file", "caption"))
        writer.writerows([(csv_cell(name), csv_cell(caption)) for name, caption in rows])
    return Path(path)


# In the notice of an unfamiliar image: the page shows every word of the result as unsure
GUESS_MARK = '<span class="vlm-guess"></span>'


def confidence_legend(pipeline: Pipeline, kind: str) -> str:
    """What the shading of a `kind` of text ("caption", "answer", "few_shot") means for this
    model: a calibrated chance of being right, or the LM's raw probability, labelled so."""
    calibration = pipeline.calibration
    if kind == "caption" and calibration is not None and calibration.calibrates_words:
        what = ("how likely each word is to be right, calibrated on held-out images of its "
                "world: the LM's probability, checked against the image")  # fmt: skip
    elif kind == "answer" and calibration is not None:
        what = "how likely the answer is to be right, calibrated on held-out questions"
    else:
        what = ("the LM's own probability for each word, not calibrated: a high number is "
                "not a promise")  # fmt: skip
    return (
        f"Shade: {what}. Below {UNSURE:.0%}: unsure (amber). On an image unlike the "
        "model's training images, every word is shown as unsure."
    )


OUTSIDE = "Outside this model's world: "
EVERYDAY_THINGS = ["a cat", "a dog", "a person", "a cup of coffee", "a rocket", "a car", "a bird",
                   "a building", "food", "a landscape"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Labels to rank an image against, with the prompt templates made for them."""

    name: str
    labels: list[str]
    templates: list[str]


def label_sets(pipeline: Pipeline) -> list[LabelSet]:
    """The label sets a model is offered with, its own world's first: its config's sets with
    its own templates, then ImageNet's 1,000 classes with open_clip's simple ImageNet
    templates and a few everyday things as photos. A model trained on a world of its own
    (it names label sets) gets the general sets under OUTSIDE, as what it cannot know."""
    own = [LabelSet(name, list(labels), pipeline.templates())
           for name, labels in pipeline.config.label_sets.items()]  # fmt: skip
    prefix = OUTSIDE if own else ""
    simple = [t("{}") if callable(t) else t for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]
    return [
        *own,
        LabelSet(f"{prefix}ImageNet (1,000 classes)", list(open_clip.IMAGENET_CLASSNAMES), simple),
        LabelSet(f"{prefix}Everyday things", EVERYDAY_THINGS, ["a photo of {}."]),
    ]


def search_kind(query_text, query_image) -> str:
    """What a search request gives: "text", "image" or "both" (RequestError: neither)."""
    has_text, has_image = bool((query_text or "").strip()), query_image is not None
    if not (has_text or has_image):
        raise RequestError("Type a text query or give a query image.")
    return "both" if has_text and has_image else "text" if has_text else "image"


def search_score(score: float, kind: str, calibration) -> str:
    """A hit's cosine score as the page shows it: a text match as a percentile of the model's
    true image-caption matches, or "no good match" (`Calibration.match`); else the cosine."""
    place = calibration.match(score) if calibration is not None and kind == "text" else None
    if place is None:
        return f"{'similarity' if kind == 'image' else 'cosine'} {score:.2f}"
    share, good = place
    return f"match {share:.0%}" if good else f"no good match ({score:.2f})"


def familiarity_notice(name: str, config, known: Sequence) -> str:
    """The notice for images of which `known` (vlm.familiarity.Familiarity) says how familiar
    they are to model `name` (its `config.trained_on` says what it was trained on)."""
    world = f" ({config.trained_on})" if config.trained_on else ""
    strange = [i for i, f in enumerate(known, 1) if f.unfamiliar]
    if strange:
        which = "This image looks" if len(known) == 1 else (
            f"Image{'s' if len(strange) > 1 else ''} {', '.join(map(str, strange))} of "
            f"{len(known)} look{'s' if len(strange) == 1 else ''}")  # fmt: skip
        return (f"⚠️ **{which} unlike anything the `{name}` model was trained on{world}: "
                f"what follows is a guess.**{GUESS_MARK}")  # fmt: skip
    if any(f.familiar is None for f in known):
        return (f"ℹ️ The `{name}` model has no profile of its training images, so it cannot "
                "tell whether this image is like them: its answers may be guesses.")  # fmt: skip
    return ""


def video_notice(name: str, result: VideoText, described: bool) -> str:
    """What the page says of a video's text (`described`: a description, else an answer): a
    guess where the model was not trained on videos, else the calibrated chance it is right
    (unsure below `vlm.calibration.UNSURE`), or that it has none."""
    what = "what it says happened" if described else "its answer"
    if result.guess:
        return (f"⚠️ **The `{name}` model was not trained on videos: {what} is a guess from "
                "frames it reads one at a time.** Each frame's caption below is what it "
                "knows.")  # fmt: skip
    if result.confidence is None:
        return (f"ℹ️ The `{name}` model has no calibration for videos: how likely {what} is "
                "to be right is unknown.")  # fmt: skip
    if result.confidence < UNSURE:
        return (f"⚠️ **Unsure: texts it writes this sure are right {result.confidence:.0%} of "
                f"the time** (calibrated on held-out clips).{GUESS_MARK}")  # fmt: skip
    return (f"Chance {what} is right: {result.confidence:.0%} (calibrated on held-out "
            "clips).")  # fmt: skip


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

    def __init__(
        self,
        models: Models,
        index_root: Path,
        guard: PathGuard,
        model_dirs: PathGuard | None = None,
        indexes: Indexes | None = None,
        jobs: TrainingJobs | None = None,
        limits: Limits | None = None,
    ):
        self.models, self.guard = models, guard
        self.limits = limits = limits or current()
        self.model_dirs = model_dirs or PathGuard()  # where model folders may come from
        self.gate = ImageGate(guard, limits.max_file_size)  # every image a request names
        self.indexes = indexes or Indexes(index_root, limits=limits)
        self.jobs = jobs  # training from the page: None where the server does not allow it
        if jobs is not None:
            models.trained = jobs.models
            jobs.on_forget = lambda folder: models.forget(str(folder))

    # ------------------------------------------------------------------ training jobs

    def _jobs(self) -> TrainingJobs:
        if self.jobs is None:
            raise RequestError("Training is off on this server (start it with --allow-training).")
        return self.jobs

    def train_start(self, files, base: str, steps, name: str, mapper: str, shapeworld_images,
                    session: str | None) -> str:  # fmt: skip
        """Check a training request (its zip through the gate) and queue it; its job's id."""
        jobs = self._jobs()
        if files and not isinstance(files, list | tuple):
            files = [files]  # a single file input gives its path alone
        paths = self.files(files) if files else []
        trained = jobs.models(session)
        job = jobs.start(paths, base, steps, name, session, mapper, shapeworld_images, trained)
        return job.id

    def train_status(self, job: str, session: str | None) -> dict:
        return self._jobs().status(job, session)

    def train_stop(self, job: str, session: str | None) -> dict:
        return self._jobs().stop(job, session)

    def train_bases(self, session: str | None) -> list[str]:
        """What a new job can start from: the bundled parts, then models this session trained."""
        return [*BASES, *self._jobs().models(session)]

    def model_zip(self, job: str, session: str | None) -> Path:
        return self._jobs().model_zip(job, session)

    def train_push(self, job: str, repo_id: str, token: str, session: str | None) -> str:
        """Upload a finished job's model to a hub model repo with the visitor's token (never
        kept); the repo's URL."""
        folder = self._jobs().finished(job, session).model_folder
        repo_id = check_length(repo_id, "the repository", 96).strip()
        if not re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", repo_id) or not (token or "").strip():
            raise RequestError("Give a hub repository as owner/name and a write token.")
        pipeline = self.models.get(str(folder))
        try:
            return pipeline.push_to_hub(repo_id, folder=folder, token=token.strip())
        except (OSError, ValueError, httpx.HTTPError) as error:  # the hub's refusal, the network
            raise RequestError(f"The hub refused the upload: {type(error).__name__}: "
                               f"{str(error)[:300]}") from None  # fmt: skip

    def trained_models(self, session: str | None) -> list[str]:
        return list(self.jobs.models(session)) if self.jobs is not None else []

    def using(self, model: str | None):
        """The model a request asked for, held for this request (see Models.use)."""
        return self.models.use(self.models.pick(model, self.model_dirs))

    def pipeline(self, model: str | None) -> Pipeline:
        """The model a request asked for, not held: for work that is safe to share."""
        return self.models.get(self.models.pick(model, self.model_dirs))

    def image(self, image, what: str = "an image") -> Image.Image:
        if image is None:
            raise RequestError(f"Please give {what} (upload, drop, paste or use the webcam).")
        return self.gate.open(image)

    def files(self, files) -> list[Path]:
        """Every file's path, inside the allowed folders and the byte limit (all or none)."""
        return [self.gate.read_path(getattr(f, "path", None) or f) for f in files]

    def notice(self, model: str | None = None) -> str:
        """The model's line above the tabs, and what is wrong with its saved search gallery."""
        name = self.models.pick(model, self.model_dirs)
        damage = self.indexes.damage(name)
        return self.models.notice(name) + (f" ⚠ {damage}" if damage else "")

    def label_sets(self, model: str | None = None) -> list[LabelSet]:
        """The label sets `model` is offered with (see `label_sets`)."""
        return label_sets(self.models.get(self.models.pick(model, self.model_dirs)))

    def caption_prompt(self, model: str | None = None) -> str:
        """The text `model` writes a caption after ("Caption:" for the bundle, none for ClipCap
        and BLIP-2): what a few-shot list's query is followed by to be described."""
        return self.models.get(self.models.pick(model, self.model_dirs)).config.caption_prompt

    def legend(self, kind: str, model: str | None = None) -> str:
        """What the shading of a `kind` of text means for `model` (see `confidence_legend`)."""
        return confidence_legend(self.models.get(self.models.pick(model, self.model_dirs)), kind)

    def familiarity(self, images: Sequence, model: str | None = None) -> str:
        """What the page says above a result about the images a request gives (None: not
        given): nothing when the model knows images like them; else that what follows is a
        guess, or that the model cannot tell (it has no profile of its training images)."""
        pictures = [self.image(image) for image in images if image is not None]
        if not pictures:
            return ""
        with self.using(model) as pipeline:
            known = pipeline.familiarity(pictures)
        return familiarity_notice(pipeline.config.name or str(model), pipeline.config, known)

    # ------------------------------------------------------------------ what the LM writes
    # Streams: the LM runs outside the model's turn, so the next request need not wait.

    def caption(self, image, fields: Sequence = (), model: str | None = None) -> TextStream:
        """A stream of the caption; `fields`: the request's `decoding` fields."""
        options, picture = decoding(self.limits, *fields), self.image(image)
        with self.using(model) as pipeline:
            return pipeline.stream_caption(picture, **options)

    def caption_files(
        self, files, fields: Sequence = (), model=None, batch_size: int = 16
    ) -> list[tuple[str, str]]:
        """(file name, caption) rows, then "⚠ why" for each image that could not be read. A
        file named twice is captioned once. Images are decoded a batch at a time, reduced as
        they are (see vlm.images.load_image), within the request's budget of decoded pixels,
        and the model's turn is held for one batch at a time, so other requests go between."""
        _count(files, self.limits.max_upload_files, "images", "Please add one or more image files.")
        options, paths = decoding(self.limits, *fields), list(dict.fromkeys(self.files(files)))
        budget, rows, warnings = PixelBudget(self.limits.max_request_pixels), [], []
        for start in range(0, len(paths), batch_size):
            good = []
            for path in paths[start : start + batch_size]:
                try:
                    good.append((path.name, self.gate.open(path, budget=budget)))
                except ImageError as error:
                    warnings.append((path.name, f"⚠ {error}"))
            if good:
                with self.using(model) as pipeline:
                    captions = pipeline.caption([im for _, im in good], **options)
                rows += [(name, c) for (name, _), c in zip(good, captions, strict=True)]
        return rows + warnings

    def answer(self, image, question: str = "", choices_text: str = "", model=None):
        """A stream of the answer, or with choices (comma-separated) the chosen one and every
        choice's score: (stream, None) or (None, (best, scores))."""
        question = clean_question(question or "", max_chars=self.limits.max_question_chars)
        choices = None
        if (choices_text or "").strip():
            most, chars = self.limits.max_choices, self.limits.max_label_chars
            choices = parse_labels(choices_text, most, chars)
        picture = self.image(image)
        with self.using(model) as pipeline:
            if choices:  # scored, not written
                return None, pipeline.answer([picture], [question], choices, return_scores=True)[0]
            return pipeline.stream_answer(picture, question), None

    def chat(self, messages, length=20, model=None) -> tuple[TextStream, int]:
        """A stream of the reply to a conversation (`vlm.chat`: OpenAI-style messages, images
        as the page's uploads or data: URLs, every one through the gate), and how many of its
        oldest turns were left out for the rest to fit the LM."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("Give a conversation: a list of messages, the last one yours.")
        limits = self.limits
        if len(messages) > limits.max_chat_messages:
            raise RequestError(f"At most {limits.max_chat_messages} messages in a conversation.")
        length = number(length, "Max length", 1, limits.max_new_tokens, " tokens")
        checked, images = [], 0
        for number_, message in enumerate(messages, 1):
            content = message.get("content") if isinstance(message, dict) else None
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list):
                raise RequestError(f"Message {number_} has no content.")
            kept = []
            for block in blocks:
                block = dict(block) if isinstance(block, dict) else {"type": None}
                if block.get("type") == "image":
                    images += 1
                    if images > limits.max_chat_images:
                        raise RequestError(
                            f"At most {limits.max_chat_images} images in a conversation."
                        )
                    block["image"] = self.image(block.get("image"))
                elif block.get("type") == "text":
                    check_length(str(block.get("text") or ""), f"message {number_}",
                                 limits.max_question_chars)  # fmt: skip
                kept.append(block)
            checked.append({**message, "content": kept})
        with self.using(model) as pipeline:
            talk = conversation(pipeline, checked, int(length))
            return pipeline.stream_chat(talk, max_new_tokens=int(length)), talk.dropped

    def few_shot(
        self, examples: Sequence[tuple], query, prompt: str = "", length=20, model=None,
        describe: bool = True,
    ) -> TextStream:  # fmt: skip
        """The LM's continuation of (image, text) examples, then the query image and `prompt`;
        with `describe`, each image's caption is written after it first."""
        for number_, (_, text) in enumerate(examples, 1):
            check_length(text, f"Text {number_}", self.limits.max_few_shot_chars)
        check_length(prompt, "the prompt", self.limits.max_few_shot_chars)
        length = max_tokens(length, self.limits)
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

    # ------------------------------------------------------------------ videos

    def video(self, file, question: str | None = None, fps=1.0, max_frames=16,
              model: str | None = None) -> tuple[Video, VideoText, str]:  # fmt: skip
        """A video file the request gives (through the gate: inside the allowed folders,
        within the byte limit), its frames decoded within the limits before the model's
        turn, then described (or, with a `question`, the question answered): (the sampled
        frames, what the model wrote, the notice for the page: frames unlike the model's
        training images, or a text that is a guess)."""
        if not file:
            raise RequestError("Please give a video (upload one or record it with the webcam).")
        path = self.files([file])[0]
        rate = number(fps, "Frames a second", 0.1, 4)
        most = int(number(max_frames, "Frames", 1, self.limits.max_video_frames))
        if question is not None:
            question = clean_question(question, max_chars=self.limits.max_question_chars)
        sampled = read_video(path, fps=rate, max_frames=most, limits=self.limits,
                             name=Path(getattr(file, "orig_name", None) or path).name)  # fmt: skip
        with self.using(model) as pipeline:
            if question is None:
                result = pipeline.describe_video(sampled)
            else:
                result = pipeline.answer_video(sampled, question)
        name = pipeline.config.name or str(model)
        notice = familiarity_notice(name, pipeline.config, [k for _, k in result.familiarity])
        notice += "\n\n" + video_notice(name, result, question is None)
        return sampled, result, notice.strip()

    def live_caption(self, frame, model: str | None = None) -> tuple[str, str] | None:
        """A camera frame's caption (greedy, short: the camera is waiting) and the notice for
        a frame unlike the model's training images; None when the model is busy with another
        request: a live frame is dropped rather than queued (the next one will do)."""
        picture = self.image(frame, "a camera frame")
        with self.models.use(self.models.pick(model, self.model_dirs), wait=False) as pipeline:
            if pipeline is None:  # the model is busy: this frame is dropped, not queued
                return None
            caption = pipeline.caption([picture], max_new_tokens=LIVE_TOKENS)[0]
            known = pipeline.familiarity([picture])
        name = pipeline.config.name or str(model)
        return caption, familiarity_notice(name, pipeline.config, known)

    # ------------------------------------------------------------------ CLIP's side

    def classify(self, image, labels_text: str = "", templates_text: str = "", model=None):
        """Each label's probability, best first."""
        limits = self.limits
        labels = parse_labels(labels_text or "", limits.max_labels, limits.max_label_chars)
        templates = parse_templates(templates_text, limits.max_templates,
                                    limits.max_template_chars)  # fmt: skip
        pipeline = self.pipeline(model)
        count = len(templates or pipeline.templates())
        check_prompt_count(len(labels), count, limits.max_classify_texts)
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
        check_length(text, "the phrase", self.limits.max_label_chars)
        picture = self.image(image)
        with self.using(model) as pipeline:
            grid = pipeline.explain(picture, text.strip())
        return overlay_heatmap(picture, grid)

    def _searchable(self, model: str | None) -> str:
        name = self.models.pick(model, self.model_dirs)
        self.models.require(name, "search")
        return name

    def search(
        self, query_text="", query_image=None, k=8, model=None, session=None, text_weight=0.5
    ) -> list[tuple[Hit, str]]:
        """The best `k` hits in the index `session` sees for the text, the image, or both
        (see `SearchIndex.combined_query`; `text_weight` is the text's share), each with its
        score as the page shows it (`search_score`)."""
        k = number(k, "Results", 1, 100)
        kind = search_kind(query_text, query_image)
        text = ""
        if kind != "image":
            text = check_length(query_text, "the text query", self.limits.max_label_chars).strip()
        picture = self.image(query_image) if kind != "text" else None
        weight = number(text_weight, "Text weight", 0, 1) if kind == "both" else 1.0
        with self.using(model) as pipeline:
            index = self.indexes.get(self._searchable(model), pipeline, session)
            if kind == "both":
                hits = index.search_vector(index.combined_query(text, picture, weight), int(k))
            else:
                hits = index.search(text or picture, k=int(k))
        return [(hit, search_score(hit.score, kind, pipeline.calibration)) for hit in hits]

    def search_plan(self, query_text="", query_image=None, text_weight=0.5, model=None) -> str:
        """What a search of these inputs runs and what its scores mean, for the page."""
        try:
            kind = search_kind(query_text, query_image)
        except RequestError:
            return ""
        name = self.models.pick(model, self.model_dirs)
        pipeline, damage = self.models.get(name), self.indexes.damage(name)
        return " ".join(filter(None, [self._plan(kind, text_weight, pipeline), damage]))

    @staticmethod
    def _plan(kind: str, text_weight, pipeline: Pipeline) -> str:
        calibrated = pipeline.calibration is not None and pipeline.calibration.matches
        if kind == "both":
            weight = float(text_weight or 0)
            return (f"Searched by the text and the image together: their embeddings weighted "
                    f"{weight:.0%} text, {1 - weight:.0%} image. Scores: cosine similarity to "
                    "that mix (no scale of its own).")  # fmt: skip
        if kind == "image":
            return ("Searched by the image (type a text too to combine them). Scores: cosine "
                    "similarity of the images, 1 for the same picture.")  # fmt: skip
        if calibrated:
            return ("Searched by the text. Scores: how the match ranks among true matches of "
                    "an image and its caption in the model's world (50%: a typical true match); "
                    f"'no good match' below {1 - NO_MATCH_QUANTILE:.0%} of them or "
                    f"{NO_MATCH_QUANTILE:.0%} of the pairs that do not match.")  # fmt: skip
        return ("Searched by the text. Scores: cosine similarity (this model has no "
                "calibration data, so there is no scale for what a good match is).")  # fmt: skip

    def index_add(
        self, files, model=None, progress=None, session=None
    ) -> tuple[SearchIndex, int, Skipped]:
        """Add image files and zips of images to the index `session` sees (see `Indexes`)."""
        most = self.limits.max_upload_files
        _count(files, most, "files", "Drop images or a .zip of images to add.")
        uploads = self.files(files)
        with self.using(model) as pipeline:
            name = self._searchable(model)
            return self.indexes.add(name, pipeline, uploads, progress, session)

    def latest(self, model=None, count: int = 60, session=None) -> list[str]:
        """The last `count` items of the index `session` sees."""
        with self.using(model) as pipeline:
            return self.indexes.get(self._searchable(model), pipeline, session).items[-count:]
