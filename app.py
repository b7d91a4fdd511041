"""The vlm demo: caption, classify, search, ask, few-shot and explain, in one Gradio page.

UI only: the page's layout and handlers of a few lines that call `vlm.serve.Service` (the
models, their search indexes and every task's checks and limits live there). Run
`python app.py --help`; `gradio app.py` and Hugging Face Spaces use the module-level `demo`,
built when first asked for: importing this module loads no model.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import html
import inspect
import json
import logging
import mimetypes
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import gradio as gr
import pandas as pd
import torch
from starlette.middleware import Middleware

from vlm import inputs
from vlm.admission import FairQueue, RequestLimits, bound_session_inputs, client_of
from vlm.errors import VLMError
from vlm.examples import (
    EXAMPLES_DIR,
    caption_cases,
    checked_labels,
    explain_examples,
    few_shot_cases,
    photo_examples,
    photo_labels,
    question_cases,
    shapeworld_examples,
)
from vlm.inputs import is_url, url_refused
from vlm.limits import Limits, current
from vlm.search import original_name
from vlm.serve import (
    Indexes,
    Models,
    Service,
    index_folder,
    write_captions_csv,
)
from vlm.training.jobs import BASES, MAPPERS, JobError, TrainingJobs
from vlm.uploads import ScratchFolder

__all__ = ["Models", "build_demo", "make_handlers"]  # what tests use

log = logging.getLogger("vlm.app")

QUEUE_SIZE = 64  # requests waiting or running in all; the heavy group may take half

try:  # ZeroGPU on Hugging Face Spaces: GPU work runs inside @spaces.GPU
    import spaces

    gpu = spaces.GPU
except ImportError:
    spaces = None

    def gpu(func):
        return func


def zero_gpu():
    """`spaces.GPU` where the app runs on ZeroGPU (training jobs go through it), else None."""
    return spaces.GPU if spaces is not None and spaces.config.Config.zero_gpu else None


# ---------------------------------------------------------------------------- settings


def parse_settings(argv: list[str]) -> argparse.Namespace:
    """Flags, with environment variables (VLM_MODEL, …) as their defaults."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description="The vlm demo")
    parser.add_argument("--model", default=env("VLM_MODEL"), help="preset, folder or hub id")
    parser.add_argument("--share", action="store_true", default=env("VLM_SHARE") == "1")
    parser.add_argument("--server-name", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--auth", default=env("VLM_AUTH"), help="user:password")
    index_dir = env("VLM_INDEX_DIR") or Path.home() / ".cache" / "vlm" / "indexes"
    parser.add_argument("--index-dir", type=Path, default=Path(index_dir))
    parser.add_argument(
        "--shared-index",
        action="store_true",
        default=env("VLM_SHARED_INDEX") == "1",
        help="one persistent search gallery that every visitor sees and adds to (a team's "
        "deployment; or VLM_SHARED_INDEX=1). Default: each visitor's additions are private "
        "to their session",
    )
    parser.add_argument(
        "--trusted-proxy",
        action="store_true",
        default=env("VLM_TRUSTED_PROXY") == "1",
        help="a proxy in front sets X-Forwarded-For: count each client by that address "
        "(or VLM_TRUSTED_PROXY=1). Default: by session",
    )
    parser.add_argument(
        "--allowed-dir", dest="allowed_dirs", type=Path, action="append",
        help="a server folder whose files and model folders requests may name by path "
        "(repeatable; default: VLM_ALLOWED_DIRS, separated by os.pathsep; none)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-training", action="store_true", default=env("VLM_ALLOW_TRAINING") == "1",
        help="the Train tab: visitors train a model on their images (or VLM_ALLOW_TRAINING=1; "
        "on with --auth too). Default: off",
    )  # fmt: skip
    parser.add_argument(
        "--mcp", action="store_true", default=env("VLM_MCP") == "1",
        help="also serve the tasks as MCP tools at /gradio_api/mcp/ (or VLM_MCP=1), for agents",
    )  # fmt: skip
    settings = parser.parse_args(argv)
    if settings.allowed_dirs is None:
        dirs = env("VLM_ALLOWED_DIRS", "").split(os.pathsep)
        settings.allowed_dirs = [Path(d) for d in dirs if d.strip()]
    settings.limits = Limits.from_env()  # every VLM_MAX_* … bound, read once (vlm.limits)
    return settings


class PathGuard(inputs.PathGuard):
    """The server files a request may name by path: only those under the folders allowed with
    --allowed-dir, plus Gradio's upload folder (where uploads land) and the bundled examples
    (resolved first; see vlm.inputs.PathGuard)."""

    def __init__(self, allowed_dirs=()):
        allowed = [Path(d).resolve() for d in allowed_dirs]
        super().__init__(lambda: [*allowed, gr.utils.get_upload_folder(), EXAMPLES_DIR])


# ---------------------------------------------------------------------------- handlers


def friendly(func):
    """Turn library errors into messages in the page; never let one request kill the worker."""
    if inspect.isgeneratorfunction(func):  # a streaming handler: it fails while it is iterated
        return _friendly_stream(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except gr.Error:
            raise
        except (VLMError, FileNotFoundError) as error:  # the visitor's to fix
            log.info("%s refused for %s: %s", func.__name__, _client(), error)
            raise gr.Error(str(error), print_exception=False) from None
        except torch.cuda.OutOfMemoryError:
            log.warning("out of GPU memory in %s; freeing memory", func.__name__)
        except Exception as error:
            log.exception("request failed")
            raise gr.Error(f"Something went wrong: {type(error).__name__}: {error}") from None
        # Out of memory. Out here the exception, its traceback and the failed call's frames
        # and tensors are gone: collect them, then hand the cached blocks back to the GPU, so
        # the next request starts from free memory.
        gc.collect()
        torch.cuda.empty_cache()
        raise gr.Error("The GPU ran out of memory; try fewer or smaller images.")

    return wrapper


def _client() -> str:
    """Who sent the request being handled, for the log (see vlm.admission.client_of)."""
    request = gr.context.LocalContext.request.get(None)
    return client_of(getattr(request, "session_hash", None), request) if request else "a client"


def _session(request: gr.Request | None) -> str | None:
    """The visitor's session, which owns their private gallery (None: a direct call)."""
    return getattr(request, "session_hash", None)


def markdown_text(text: str) -> str:
    """`text` shown as itself inside a line of Markdown: HTML escaped, and backslashed where
    Markdown would read it (emphasis, code, links and images, tables, strikethrough)."""
    return html.escape(re.sub(r"([\\`*_\[\]!|~])", r"\\\1", text), quote=True)


async def _no_fetch(self, url_or_file_path):
    """For file inputs: Gradio downloads a FileData whose path is a URL into its cache
    before the handler runs (leaving a folder behind when that fails); here nothing a
    request names is fetched. (A method, not a mixin: a template component's first base
    names its page component.)"""
    if isinstance(url_or_file_path, str) and is_url(url_or_file_path):
        raise gr.Error(str(url_refused(url_or_file_path)), print_exception=False)
    return await gr.blocks.Block.async_move_resource_to_block_cache(self, url_or_file_path)


def _friendly_stream(func):
    """`friendly` for a generator handler: each step of the stream is guarded the same way."""
    step = friendly(functools.wraps(func)(lambda iterator: next(iterator, StopIteration)))

    @functools.wraps(func)
    def stream(*args, **kwargs):
        iterator = func(*args, **kwargs)  # runs nothing yet: its first step does
        try:
            while (item := step(iterator)) is not StopIteration:
                yield item
        finally:
            iterator.close()  # the reader left (a closed page): stop generating

    return stream


class UploadedImage(gr.Image):
    """An image input that Gradio does not decode: the handler gets the request's FileData
    as it came (an upload, a path with or without `meta`, a data URL) and opens it through
    vlm.inputs.ImageGate: allowed folders only, byte and pixel limits, header first."""

    is_template = True  # the page shows it as a gr.Image
    async_move_resource_to_block_cache = _no_fetch

    def preprocess(self, payload):
        return payload


class UploadedFiles(gr.File):
    """A file input whose FileData paths are never fetched as URLs (see _no_fetch), and whose
    refusals (a file of a type it does not take) are a bad input, not a bug: one log line."""

    is_template = True  # the page shows it as a gr.File
    async_move_resource_to_block_cache = _no_fetch

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error as error:
            log.info("files refused for %s: %s", _client(), error.message)
            raise gr.Error(error.message, print_exception=False) from None


def image_input(label: str = "Image", **options) -> UploadedImage:
    """An image input: upload, drag and drop, paste or webcam, decoded by vlm.images."""
    options.setdefault("sources", ["upload", "clipboard", "webcam"])
    return UploadedImage(type="pil", label=label, **options)


def without_words(handler):
    """A streaming handler's outputs less the words: (text, words[, scores]) -> text[, scores]."""

    @functools.wraps(handler)
    def stream(*args, **kwargs):
        for text, _, *rest in handler(*args, **kwargs):
            yield (text, *rest) if rest else text

    return stream


def finished(handler):
    """A streaming handler run to its end: its last output."""

    @functools.wraps(handler)
    def run(*args, **kwargs):
        *_, last = handler(*args, **kwargs)
        return last

    return run


def _live(stream):
    """(text so far, its words with the LM's probabilities) as the LM writes them."""
    for written in stream:
        yield written.text, written.spans()


CHART_LABELS = 10  # the zero-shot chart's bars: the best labels


def _short(label: str, most: int = 28) -> str:
    return label if len(label) <= most else label[: most - 1] + "…"


def _gallery(items: list[str]) -> list[tuple[str, str]]:
    return [(item, original_name(item)) for item in items]


def _results(scored) -> list[tuple[str, str]]:
    """Search hits as the gallery shows them: the score as the page reads it, the name the
    image was added under."""
    return [(hit.item, f"{score} · {original_name(hit.item)}") for hit, score in scored]


def _writers(service: Service) -> dict:
    """The handlers whose answer the LM writes, streamed: (text, words[, choice scores])."""

    @friendly
    @gpu
    def caption_words(
        image, mode="greedy", beams=3, top_p=0.9, temperature=1.0, max_tokens=30, model=None
    ):
        yield from _live(service.caption(image, (mode, beams, top_p, temperature, max_tokens),
                                         model))  # fmt: skip

    @friendly
    @gpu
    def answer_words(image, question="", choices_text="", model=None):
        stream, scored = service.answer(image, question, choices_text, model)
        if scored:  # one answer, coloured by its choice probability
            best, scores = scored
            yield best, [(best, scores[best])], scores
            return
        for text, words in _live(stream):
            yield text, words, {}

    @friendly
    @gpu
    def few_shot_words(image1, text1, image2, text2, image3, text3, query, prompt="",
                       max_tokens=20, model=None, describe=True):  # fmt: skip
        examples = [(image1, text1), (image2, text2), (image3, text3)]
        yield from _live(service.few_shot(examples, query, prompt, max_tokens, model,
                                          bool(describe)))  # fmt: skip

    @friendly
    @gpu
    def chat_words(messages=None, max_tokens=20, model=None):
        stream, dropped = service.chat(messages or [], max_tokens, model)
        note = (f"The oldest {dropped} turn{'s' * (dropped > 1)} of this conversation no longer "
                "fit the model's length and were left out." if dropped else "")  # fmt: skip
        for text, words in _live(stream):
            yield text, words, note

    return dict(caption=caption_words, answer=answer_words, few_shot=few_shot_words,
                chat=chat_words)  # fmt: skip


def _clip_handlers(service: Service, scratch: ScratchFolder) -> dict:
    """The other handlers: captions of many files, labels, search, the index, heatmaps."""

    @friendly
    @gpu
    def caption_files(files, mode="greedy", beams=3, top_p=0.9, temperature=1.0, max_tokens=30,
                      model=None):  # fmt: skip
        rows = service.caption_files(files, (mode, beams, top_p, temperature, max_tokens), model)
        out = write_captions_csv(rows, scratch.new_file("captions.csv"))
        return pd.DataFrame(rows, columns=["file", "caption"]), str(out)

    @friendly
    @gpu
    def classify(image, labels_text="", templates_text="", model=None):
        probs = service.classify(image, labels_text, templates_text, model)
        top = list(probs.items())[:CHART_LABELS]  # readable with 1,000 labels: the best ones
        chart = pd.DataFrame({"label": [_short(k) for k, _ in top],
                              "probability": [v for _, v in top]})  # fmt: skip
        return probs, chart

    @friendly
    @gpu
    def explain(image, text="", model=None):
        return service.explain(image, text, model)

    @friendly
    @gpu
    def search(query_text="", query_image=None, k=8, model=None, text_weight=0.5,
               request: gr.Request = None):  # fmt: skip
        session = _session(request)
        return _results(service.search(query_text, query_image, k, model, session, text_weight))

    @friendly
    def index_add(files, model=None, progress=gr.Progress(), request: gr.Request = None):  # noqa: B008 (Gradio's idiom)
        def indexing(done: int, of: int) -> None:
            progress(done / max(of, 1), desc="indexing")

        index, added, skipped = service.index_add(files, model, indexing, _session(request))
        status = f"Added {added} image(s); the index now holds {len(index)}."
        if skipped:
            status += " Skipped: " + "; ".join(
                f"{markdown_text(Path(n).name)} ({markdown_text(why)})" for n, why in skipped[:20]
            )
        return _gallery(index.items[-60:]), status

    @friendly
    def familiarity(image=None, model=None):
        return service.familiarity([image], model)

    @friendly
    def familiarity_of_all(image1=None, image2=None, image3=None, query=None, model=None):
        return service.familiarity([image1, image2, image3, query], model)

    @friendly
    def show_index(model=None, request: gr.Request = None):
        return _gallery(service.latest(model, session=_session(request)))

    @friendly
    @gpu
    def describe_video(video=None, fps=1.0, max_frames=16, model=None):
        """(notice, what happened, the frames with their captions) of a video."""
        return _video_outputs(*service.video(video, None, fps, max_frames, model))

    @friendly
    @gpu
    def answer_video(video=None, question="", fps=1.0, max_frames=16, model=None):
        return _video_outputs(*service.video(video, question or "", fps, max_frames, model))

    @friendly
    @gpu
    def live_caption(frame=None, model=None, seen=None):
        """(caption, notice and frames a second, the times of the last frames captioned) of
        the camera's latest frame. A frame that finds the model busy is dropped, not queued
        (vlm.serve.Service.live_caption), so the caption keeps up with the camera."""
        captioned = service.live_caption(frame, model) if frame is not None else None
        if captioned is None:  # no frame, or the model busy: dropped
            return gr.skip(), gr.skip(), seen
        caption, notice = captioned
        now = time.monotonic()
        seen = [t for t in (seen or []) if now - t < LIVE_WINDOW] + [now]
        rate = (len(seen) - 1) / (seen[-1] - seen[0]) if len(seen) > 1 else 0.0
        line = (f"{rate:.1f} frames a second captioned (the camera sends "
                f"{1 / LIVE_EVERY:.0f}; when the model is slower, frames are dropped)")  # fmt: skip
        return caption, "\n\n".join(filter(None, [notice, line])), seen

    return dict(caption_files=caption_files, classify=classify, explain=explain, search=search,
                index_add=index_add, show_index=show_index, familiarity=familiarity,
                familiarity_of_all=familiarity_of_all, describe_video=describe_video,
                answer_video=answer_video, live_caption=live_caption)  # fmt: skip


def _video_outputs(sampled, result, notice: str):
    """The Video tab's outputs: the notice, the text, and each sampled frame with its time,
    its caption and whether the LM read it (frames left out where its positions ran short)."""
    captions = dict(result.timeline)
    strip = []
    for at, frame in zip(sampled.times, sampled.frames, strict=True):
        label = f"{int(at) // 60}:{int(at) % 60:02d}"
        if at in captions:
            label += f" · {captions[at]}"
        if at not in result.times:
            label += " (not read: the LM's positions ran short)"
        strip.append((frame, label))
    return notice, result.text, strip


def _training_handlers(service: Service) -> dict:
    """The Train tab's handlers: start, status and stop (also the API's), and the page's view
    of a job, polled by a timer."""

    @friendly
    def train_start(files=None, base_model="", steps=400, name="my-model", mapper="",
                    shapeworld_images=0, browser="", request: gr.Request = None):  # fmt: skip
        base_model = base_model or next(iter(BASES))
        return service.train_start(files, base_model, steps, name, mapper or next(iter(MAPPERS)),
                                   shapeworld_images or None, _owner(browser, request))  # fmt: skip

    @friendly
    def train_status(job="", browser="", request: gr.Request = None) -> dict:
        return service.train_status(job, _owner(browser, request))

    @friendly
    def train_stop(job="", browser="", request: gr.Request = None) -> dict:
        return service.train_stop(job, _owner(browser, request))

    def train_view(job="", browser="", request: gr.Request = None):
        """(status, loss curve, samples, download, the model picker, the bases) of the job."""
        if not job or service.jobs is None:
            return (gr.skip(),) * 6
        session = _owner(browser, request)
        try:
            status = service.train_status(job, session)
        except JobError as error:  # a job deleted after its age, another browser's
            return (markdown_text(str(error)), *(gr.skip(),) * 5)
        now = status["stage"]  # the stage under way (or the last): its curves
        rows = [("training", step, loss) for stage, step, loss in status["losses"] if stage == now]
        rows += [("validation", step, loss) for stage, step, loss in status["val_losses"]
                 if stage == now]  # fmt: skip
        curve = pd.DataFrame(rows, columns=["curve", "step", "loss"])
        samples = pd.DataFrame(list(status["samples"].items()), columns=SAMPLE_COLUMNS)
        if status["state"] != "done":
            return job_summary(status), curve, samples, *(gr.skip(),) * 3
        download = gr.DownloadButton(value=str(service.model_zip(job, session)), visible=True)
        choices = [*service.models.choices(), *service.trained_models(session)]
        picker = gr.Dropdown(choices=choices, visible=True)
        bases = gr.Dropdown(choices=service.train_bases(session))
        return job_summary(status), curve, samples, download, picker, bases

    @friendly
    def train_push(job="", repo_id="", token="", browser="", request: gr.Request = None) -> str:
        url = service.train_push(job, repo_id, token, _owner(browser, request))
        return f"Pushed to {markdown_text(url)}"

    return dict(train_start=train_start, train_status=train_status, train_stop=train_stop,
                train_view=train_view, train_push=train_push)  # fmt: skip


SAMPLE_COLUMNS = ["the image's caption", "the model's caption now"]
CURVE_COLOURS = {"training": "#2563eb", "validation": "#f59e0b"}


def _owner(browser: str | None, request: gr.Request | None) -> str | None:
    """Who owns a training job: the page's browser (a random id kept in its storage, so a
    refresh or a second tab finds its job), else the session (an API client)."""
    return browser or _session(request)


def browser_id(known: str | None) -> str:
    """The browser's random id: the one it keeps, or a new one."""
    return known or uuid.uuid4().hex


def job_summary(status: dict) -> str:
    """A training job's state in a line of Markdown: its stage and step, elapsed, ETA."""
    clock = lambda seconds: f"{int(seconds) // 60}:{int(seconds) % 60:02d}"  # noqa: E731
    state = status["state"]
    line = f"**{state}**"
    if state == "queued" and status["place"]:
        line += f" · {status['place']}. in line (one job trains at a time)"
    if status["stage"]:
        line += f" · {status['stage']} stage, step {status['step']} of {status['steps']}"
    if status["loss"] is not None:
        line += f" · loss {status['loss']:.3f}"
    if status["val_loss"] is not None:
        line += f" · validation {status['val_loss']:.3f}"
    if status["elapsed_s"]:
        line += f" · {clock(status['elapsed_s'])} elapsed"
    if status["eta_s"] is not None:
        line += f" · about {clock(status['eta_s'])} left in this stage"
    if state == "done" and status["step"] < status["steps"]:
        line += " (stopped early: its validation loss had stopped improving)"
    if status["model"]:
        line += f" · **`{markdown_text(status['model'])}`** is in the model picker now"
    if status["scores"].get("BLEU-4") is not None:
        line += f" · held-out BLEU-4 {status['scores']['BLEU-4']:.3f}"
    if status["error"]:
        line += f" · {markdown_text(status['error'])}"
    return line


def make_handlers(
    models: Models, index_root: Path, allowed_dirs=(), shared_index: bool = False,
    training: bool = False, limits: Limits | None = None,
) -> dict:  # fmt: skip
    """The functions behind the page's buttons (and its API), over the models.

    Every server path a request names (an image or file given as a string) must lie under
    `allowed_dirs`, Gradio's upload folder or the bundled examples; a model folder, under
    `allowed_dirs` only. `shared_index`: one search gallery for everyone (see vlm.serve.Indexes).
    `training`: visitors may train models (vlm.training.jobs). Every request is checked
    against `limits` (default: the environment's, `vlm.limits.current()`). The service is
    `handlers["service"]`."""
    limits = limits or current()
    indexes = Indexes(index_root, shared_index, limits)
    jobs = None
    if training:
        jobs = TrainingJobs(Path(tempfile.mkdtemp(prefix="vlm-train-")), limits, zero_gpu())
    service = Service(models, index_root, PathGuard(allowed_dirs),
                      inputs.PathGuard(allowed_dirs), indexes, jobs, limits)  # fmt: skip
    scratch = ScratchFolder("vlm-captions-", limits.temp_max_age)  # the CSVs to download
    streams = _writers(service)
    return dict(
        # the tabs' buttons: (text, its words with their probabilities[, choice scores])
        **{f"{name}_words": stream for name, stream in streams.items()},
        # /caption, /answer, /few_shot: the same streams without the words, as before them
        **{f"{name}_stream": without_words(stream) for name, stream in streams.items()},
        # and run to the end: the finished text, for a script that calls a handler
        **{name: finished(without_words(stream)) for name, stream in streams.items()},
        **_clip_handlers(service, scratch),
        **_training_handlers(service),
        notice=friendly(service.notice),
        search_plan=friendly(service.search_plan),
        legend=friendly(service.legend),
        caption_prompt=friendly(service.caption_prompt),
        service=service,
    )


# ---------------------------------------------------------------------------- the page

HOW_IT_WORKS = """
<div class="vlm-flow">
  <span>🖼️ image</span><b>→</b><span>CLIP image encoder</span><b>→</b><span>embedding</span>
  <b>→</b><span class="learned">mapper (learned)</span><b>→</b><span>k prefix vectors</span>
  <b>→</b><span class="frozen">frozen LM 🔒</span><b>→</b><span>📝 text</span>
</div>
<p>The image encoder (a CLIP model) turns the picture into one vector. A small <b>mapper</b>,
the only part that is trained for this, turns that vector into <i>k</i> vectors that live in
the language model's word-embedding space: a <b>visual prefix</b>. The <b>frozen</b> language
model reads the prefix as if it were the first words of a text and continues it — a caption
after <code>Caption:</code>, an answer after <code>Question: … Answer:</code>
(<a href="https://arxiv.org/abs/2111.09734">ClipCap</a>,
<a href="https://arxiv.org/abs/2106.13884">Frozen</a>). The bundled model's mapper also reads
the task (the question), as <a href="https://arxiv.org/abs/2305.06500">InstructBLIP</a>'s does,
so a question about one object gets a prefix that shows that object. Zero-shot labels, search
and the heatmap use the CLIP encoder alone: image and text embeddings compared by cosine
similarity.</p>
"""

CSS = (
    """
.vlm-flow {display:flex; flex-wrap:wrap; gap:.4em; align-items:center; margin:.5em 0}
.vlm-flow span {border:1px solid var(--border-color-primary); border-radius:8px;
  padding:.3em .6em; background:var(--block-background-fill)}
.vlm-flow .learned {border-color:#e0a000; font-weight:600}
.vlm-flow .frozen {border-color:#4070e0}
.vlm-sure .score-token, .vlm-sure-scale {filter:hue-rotate(100deg) brightness(1.6)}
.vlm-sure-scale {display:inline-block; width:8em; height:.9em; vertical-align:middle;
  border-radius:4px; background:linear-gradient(to right, rgba(239,68,60,.5), rgb(239,68,60))}
.vlm-unsure-swatch {display:inline-block; width:2em; height:.9em; vertical-align:middle;
  border-radius:4px; background:#f59e0b}
"""
    + "".join(  # a word below 50% (its shade's alpha, as the browser writes it: 0 to 0.4…)
        f".vlm-sure .score-token[style*='60, 0.{d}'], " for d in range(5)
    )
    + """.vlm-sure .score-token[style*='60, 0)'],
.vlm-result:has(.vlm-guess) .vlm-sure .score-token[style*='rgb'] {filter:none;
  background-color:#f59e0b
  !important; text-decoration:underline dotted}
"""
)


def confidence_legend(text: str) -> str:
    """The legend under a text's words: what their shade means (`Service.legend`) and its
    scale (HighlightedText's "scores" colouring, turned green by CSS; amber below 50%)."""
    return (f"<small>{html.escape(text)} "
            '<span class="vlm-unsure-swatch"></span> unsure &lt; 50% ≤ '
            '<span class="vlm-sure-scale"></span> 100% sure</small>')  # fmt: skip


def confidence_output(handlers: dict, model, kind: str, elem_id: str) -> gr.HighlightedText:
    """Words coloured by how sure the model is of them, with a legend under them that says
    what the shade means for the model chosen (calibrated or the LM's raw probability)."""
    words = gr.HighlightedText(
        label="How sure the model is", elem_id=elem_id, elem_classes="vlm-sure",
        show_legend=False, show_inline_category=False, combine_adjacent=False,
    )  # fmt: skip
    legend = gr.HTML(confidence_legend(handlers["legend"](kind)), elem_id=f"{elem_id}-legend")
    model.change(lambda name: confidence_legend(handlers["legend"](kind, name)), model, legend,
                 api_name=False)  # fmt: skip
    return words


def familiarity_notice(handlers: dict, button, images: list, model, api_name=False):
    """A notice above a tab's result, filled when its button is pressed: whether the model
    knows images like the ones given (vlm.familiarity); empty when it does."""
    notice = gr.Markdown(elem_classes="vlm-familiarity")
    handler = handlers["familiarity" if len(images) == 1 else "familiarity_of_all"]
    button.click(handler, [*images, model], notice, api_name=api_name)
    return notice


def api_only(handler, inputs, outputs, api_name: str) -> None:
    """An API endpoint with no button of its own: the text-only twin of a streamed tab, so
    clients written before word probabilities keep their endpoint and its outputs."""
    gr.Button(visible=False).click(handler, inputs, outputs, api_name=api_name)


# The queue policy. Each event runs at most two requests at once (Gradio's queue), and each
# model serves one request at a time (Models.use). The heavy events (zero-shot over many
# labels and templates, captioning or indexing many files) share one group that runs one
# request at a time, so however many of them are queued, at most one waits for the model
# beside the light requests (caption, answer, search, few-shot, explain): a caption waits
# for at most one heavy request, which the limits in vlm.serve bound.
HEAVY = dict(concurrency_id="heavy", concurrency_limit=1)


def caption_tab(handlers: dict, model: gr.Dropdown, examples: tuple) -> None:
    """The Caption tab; `examples`: (rows of one image, their labels), and (photos' rows,
    their labels, whether the model finds them outside its world)."""
    with gr.Row():
        with gr.Column():
            cap_image = image_input(elem_id="caption-image")
            mode = gr.Radio(["greedy", "beam search", "nucleus sampling"], value="greedy",
                            label="Decoding")  # fmt: skip
            with gr.Accordion("Decoding settings", open=False):
                beams = gr.Slider(1, 8, value=3, step=1, label="Beams")
                top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                max_tokens = gr.Slider(
                    1, limits_of(handlers).max_new_tokens, value=30, step=1, label="Max length"
                )
            cap_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
        with gr.Column(elem_classes="vlm-result"):
            familiarity_notice(handlers, cap_button, [cap_image], model, "familiarity")
            cap_text = gr.Textbox(label="Caption", elem_id="caption-output", lines=2)
            cap_words = confidence_output(handlers, model, "caption", "caption-words")
            with gr.Accordion("Several images at once", open=False):
                cap_files = UploadedFiles(file_count="multiple", file_types=["image"],
                                          label="Images")  # fmt: skip
                cap_files_button = gr.Button("Caption all")
                cap_table = gr.Dataframe(headers=["file", "caption"], label="Captions")
                cap_csv = gr.File(label="Download CSV")
    decoding = [mode, beams, top_p, temperature, max_tokens, model]
    cap_button.click(handlers["caption_words"], [cap_image, *decoding], [cap_text, cap_words],
                     api_name="caption_words")  # fmt: skip
    api_only(handlers["caption_stream"], [cap_image, *decoding], cap_text, "caption")
    cap_files_button.click(handlers["caption_files"], [cap_files, *decoding],
                           [cap_table, cap_csv], api_name="caption_files", **HEAVY)  # fmt: skip
    (rows, labels), (photos, photo_labels, outside) = examples
    gr.Examples(rows, [cap_image], label="Examples", example_labels=labels)
    if photos:
        gr.Examples(photos, [cap_image], example_labels=photo_labels,
                    label="Outside this model's world: the page says so" if outside
                    else "Photos")  # fmt: skip


def zero_shot_tab(handlers, model, examples: list[str]) -> None:
    """The Zero-shot tab: the model's label sets, its own world's first; choosing a set (or
    another model) fills in its labels and its prompt templates."""
    sets = handlers["service"].label_sets()
    with gr.Row():
        with gr.Column():
            cls_image = image_input()
            label_set = gr.Dropdown([s.name for s in sets], value=sets[0].name,
                                    label="Label set")  # fmt: skip
            labels = gr.Textbox("\n".join(sets[0].labels), lines=6, max_lines=12,
                                label="Labels (one per line or comma-separated)")  # fmt: skip
            prompts = gr.Textbox("\n".join(sets[0].templates), lines=3,
                                 label="Prompt templates ({} is the label; "
                                 "blank: the model's own)")  # fmt: skip
            cls_button = gr.Button("Classify", variant="primary")
        with gr.Column(elem_classes="vlm-result"):
            familiarity_notice(handlers, cls_button, [cls_image], model)
            cls_label = gr.Label(num_top_classes=5, label="Top labels")
            cls_chart = gr.BarPlot(x="label", y="probability", sort="-y", y_lim=[0, 1],
                                   x_label_angle=-35, height=340,
                                   label=f"The {CHART_LABELS} likeliest labels")  # fmt: skip

    def chosen(name: str, model_name: str | None) -> tuple[str, str]:
        offered = {s.name: s for s in handlers["service"].label_sets(model_name)}
        picked = offered.get(name) or next(iter(offered.values()))
        return "\n".join(picked.labels), "\n".join(picked.templates)

    def offered(model_name: str | None):
        names = [s.name for s in handlers["service"].label_sets(model_name)]
        return gr.Dropdown(choices=names, value=names[0])

    label_set.input(chosen, [label_set, model], [labels, prompts], api_name=False)
    model.change(offered, model, label_set, api_name=False).then(
        chosen, [label_set, model], [labels, prompts], api_name=False
    )
    cls_button.click(handlers["classify"], [cls_image, labels, prompts, model],
                     [cls_label, cls_chart], api_name="classify", **HEAVY)  # fmt: skip
    gr.Examples([[p] for p in examples], [cls_image], label="Examples")


def search_tab(handlers: dict, model: gr.Dropdown) -> gr.Gallery:
    """The Search tab; returns the gallery of the latest indexed images."""
    with gr.Row():
        with gr.Column(scale=1):
            query_text = gr.Textbox(label="Text query", placeholder="a large blue star")
            query_image = image_input("…or an image query (with a text: both)",
                                      sources=["upload", "clipboard"])  # fmt: skip
            text_weight = gr.Slider(0, 1, value=0.5, step=0.05, label="Text weight",
                                    info="With both a text and an image: the text's share "
                                    "of the query (the image has the rest)")  # fmt: skip
            k = gr.Slider(1, 24, value=8, step=1, label="Results")
            search_button = gr.Button("Search", variant="primary")
            plan = gr.Markdown(elem_id="search-plan")
            add_files = UploadedFiles(file_count="multiple", file_types=["image", ".zip"],
                                      label="Add images or a .zip to the index")  # fmt: skip
            add_button = gr.Button("Add to index")
            add_status = gr.Markdown()
        with gr.Column(scale=2, elem_classes="vlm-result"):
            familiarity_notice(handlers, search_button, [query_image], model)
            results = gr.Gallery(label="Results", columns=4, height="auto")
            indexed = gr.Gallery(label="Indexed images (latest)", columns=6, height="auto")
    query = [query_text, query_image, k, model, text_weight]
    # /search keeps the inputs it had (text, image, k, model): both given, they weigh the same
    api_only(handlers["search"], query[:4], results, "search")
    search_button.click(handlers["search"], query, results, api_name=False)
    query_text.submit(handlers["search"], query, results, api_name=False)
    for event in (search_button.click, query_text.submit):  # what ran, and its scores' scale
        event(handlers["search_plan"], [query_text, query_image, text_weight, model], plan,
              api_name=False)  # fmt: skip
    add_button.click(handlers["index_add"], [add_files, model], [indexed, add_status],
                     api_name="index_add", **HEAVY)  # fmt: skip
    gr.Examples([["a large blue star"], ["a small red circle"], ["a cat"]], [query_text])
    return indexed


def ask_tab(handlers: dict, model: gr.Dropdown, examples: tuple[list, list[str]]) -> None:
    with gr.Row():
        with gr.Column():
            qa_image = image_input()
            question = gr.Textbox(label="Question", placeholder="what color is the star?")
            choices = gr.Textbox(label="Answers to choose from (optional, comma-separated)")
            qa_button = gr.Button("Answer", variant="primary")
        with gr.Column(elem_classes="vlm-result"):
            familiarity_notice(handlers, qa_button, [qa_image], model)
            qa_answer = gr.Textbox(label="Answer", elem_id="answer-output")
            qa_words = confidence_output(handlers, model, "answer", "answer-words")
            qa_scores = gr.Label(label="Choice scores")
    qa_inputs = [qa_image, question, choices, model]
    qa_button.click(handlers["answer_words"], qa_inputs, [qa_answer, qa_words, qa_scores],
                    api_name="answer_words")  # fmt: skip
    api_only(handlers["answer_stream"], qa_inputs, [qa_answer, qa_scores], "answer")
    rows, labels = examples
    gr.Examples(rows, [qa_image, question, choices], label="Examples", example_labels=labels)


def few_shot_tab(handlers: dict, model: gr.Dropdown, examples: tuple[list, list[str]]) -> None:
    gr.Markdown("Interleave example images with their text; the frozen LM reads them "
                "all (Frozen-style) and continues after the query image.")  # fmt: skip
    shots = []
    with gr.Row():
        for i in range(3):
            with gr.Column():
                shot_image = image_input(f"Example {i + 1}", height=160)
                shot_text = gr.Textbox(label=f"Text {i + 1}", placeholder="Caption: …")
                shots += [shot_image, shot_text]
        with gr.Column():
            fs_query = image_input("Query image", height=160)
            fs_prompt = gr.Textbox(
                handlers["caption_prompt"](None), label="Prompt after the query",
                info="The model's own caption prompt until you change it",
            )  # fmt: skip
    with gr.Row():
        fs_tokens = gr.Slider(
            1, limits_of(handlers).max_new_tokens, value=20, step=1, label="Max length"
        )
        fs_describe = gr.Checkbox(
            True, label="Describe each image first",
            info="Writes the model's caption after each image before the LM reads the list, "
                 "from the query back as far as the LM's length allows. The bundled LM learned "
                 "k-shot lists after scene descriptions; without them it reads colours from "
                 "the examples, not the query (docs/shapeworld.md).",
        )  # fmt: skip
    fs_button = gr.Button("Continue", variant="primary")
    with gr.Column(elem_classes="vlm-result"):
        familiarity_notice(handlers, fs_button, [*shots[::2], fs_query], model)
        fs_output = gr.Textbox(label="The LM continues", elem_id="few-shot-output")
        fs_words = confidence_output(handlers, model, "few_shot", "few-shot-words")
    model.change(handlers["caption_prompt"], model, fs_prompt, api_name=False)
    fs_inputs = [*shots, fs_query, fs_prompt, fs_tokens, model, fs_describe]
    fs_button.click(handlers["few_shot_words"], fs_inputs, [fs_output, fs_words],
                    api_name="few_shot_words")  # fmt: skip
    # /few_shot keeps the inputs it had before describing (describing is then on)
    api_only(handlers["few_shot_stream"], fs_inputs[:-1], fs_output, "few_shot")
    rows, labels = examples
    gr.Examples(rows, [*shots, fs_query, fs_prompt], label="Examples",
                example_labels=labels)  # fmt: skip


def _messages(history: list) -> list[dict]:
    """The Chatbot's messages as the library takes them: images (uploads) and text blocks."""
    messages = []
    for message in history or []:
        content = message.get("content")
        blocks = content if isinstance(content, list) else [content]
        kept = []
        for block in blocks:
            if isinstance(block, str):
                kept.append({"type": "text", "text": block})
            elif isinstance(block, dict) and block.get("type") == "text":
                kept.append({"type": "text", "text": block.get("text", "")})
            elif isinstance(block, dict) and block.get("type") == "file":
                kept.append({"type": "image", "image": block["file"]})
        messages.append({"role": message.get("role"), "content": kept})
    return messages


def chat_tab(handlers: dict, model: gr.Dropdown) -> None:
    """The Chat tab: a conversation about images, replies streamed, the last one's words
    shaded; Retry and Clear."""
    with gr.Row():
        with gr.Column(scale=2, elem_classes="vlm-result"):
            notice = gr.Markdown(elem_classes="vlm-familiarity")
            chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chat")
            box = gr.MultimodalTextbox(
                file_types=["image"], file_count="multiple", elem_id="chat-box", label="Message",
                placeholder="Drop an image in, ask about it, then ask more (\"and its size?\")",
            )  # fmt: skip
            with gr.Row():
                retry = gr.Button("Retry", elem_id="chat-retry")
                clear = gr.Button("Clear", elem_id="chat-clear")
        with gr.Column(scale=1):
            length = gr.Slider(
                1, limits_of(handlers).max_new_tokens, value=20, step=1, label="Max length"
            )
            trimmed = gr.Markdown(elem_id="chat-trimmed")
            words = confidence_output(handlers, model, "answer", "chat-words")

    def said(history, message):
        files = [{"type": "file", "file": {"path": p, "mime_type": mimetypes.guess_type(p)[0]}}
                 for p in message.get("files", [])]  # fmt: skip
        text = (message.get("text") or "").strip()
        content = [*files, *([{"type": "text", "text": text}] if text else [])]
        return [*(history or []), {"role": "user", "content": content}], None

    def reply(history, max_tokens, model_name):
        history = list(history or [])
        for text, shaded, note in handlers["chat_words"](_messages(history), max_tokens,
                                                         model_name):  # fmt: skip
            yield [*history, {"role": "assistant", "content": text}], shaded, note

    def images_of(history):
        return [b["file"] for m in history or [] if m.get("role") == "user"
                for b in (m.get("content") or []) if isinstance(b, dict)
                and b.get("type") == "file"][-1:]  # fmt: skip

    def familiar(history, model_name):
        shown = images_of(history)
        return handlers["familiarity"](shown[0], model_name) if shown else ""

    reply_inputs, reply_outputs = [chatbot, length, model], [chatbot, words, trimmed]
    with gr.Column(visible=False):  # /chat: the conversation as JSON messages (see vlm.chat)
        messages, text = gr.JSON(), gr.Textbox()
    api_only(handlers["chat"], [messages, length, model], [text, trimmed], "chat")
    box.submit(said, [chatbot, box], [chatbot, box], api_name=False).then(
        reply, reply_inputs, reply_outputs, api_name=False
    ).then(familiar, [chatbot, model], notice, api_name=False)  # fmt: skip

    def unsaid(history):  # Retry: the last reply taken back, then written again
        return history[:-1] if history and history[-1]["role"] == "assistant" else history

    retry.click(unsaid, chatbot, chatbot, api_name=False).then(
        reply, reply_inputs, reply_outputs, api_name=False
    )  # fmt: skip
    clear.click(lambda: ([], None, "", ""), None, [chatbot, words, trimmed, notice],
                api_name=False)  # fmt: skip


def explain_tab(handlers: dict, model: gr.Dropdown) -> None:
    with gr.Row():
        with gr.Column():
            ex_image = image_input()
            ex_text = gr.Textbox(label="Label or phrase", placeholder="a red circle")
            ex_button = gr.Button("Show where it matches", variant="primary")
        with gr.Column(elem_classes="vlm-result"):
            familiarity_notice(handlers, ex_button, [ex_image], model)
            ex_output = gr.Image(type="pil", label="Where the text matches (each part of the "
                                 "image seen alone; the ring marks the peak)")  # fmt: skip
    ex_button.click(handlers["explain"], [ex_image, ex_text, model], ex_output,
                    api_name="explain")  # fmt: skip
    gr.Examples(explain_examples(), [ex_image, ex_text], label="Examples")


LIVE_EVERY = 0.5  # seconds between the frames the camera sends
LIVE_WINDOW = 5.0  # seconds of captioned frames the rate is counted over


def video_tab(handlers: dict, model: gr.Dropdown) -> None:
    """The Video tab: a clip uploaded or recorded, its frames sampled by time, described or
    asked about; the strip shows each sampled frame with its caption."""
    most = limits_of(handlers).max_video_frames
    with gr.Row():
        with gr.Column():
            clip = gr.Video(label="Video (upload, or record with the webcam)",
                            sources=["upload", "webcam"], elem_id="video-input")  # fmt: skip
            with gr.Row():
                fps = gr.Slider(0.25, 4, value=1.0, step=0.25, label="Frames a second")
                frames = gr.Slider(1, most, value=min(16, most), step=1, label="At most frames")
            describe = gr.Button("Describe what happens", variant="primary")
            question = gr.Textbox(label="Question about the clip", placeholder="what moved?")
            ask = gr.Button("Ask")
        with gr.Column(elem_classes="vlm-result"):
            notice = gr.Markdown(elem_classes="vlm-familiarity")
            text = gr.Textbox(label="What the model says", interactive=False)
            strip = gr.Gallery(label="The frames read, each with its own caption", columns=4,
                               height="auto")  # fmt: skip
    # decoding a long clip (a seek back to a keyframe, then forward) is heavy work: one at a time
    describe.click(handlers["describe_video"], [clip, fps, frames, model],
                   [notice, text, strip], api_name="describe_video", **HEAVY)  # fmt: skip
    ask.click(handlers["answer_video"], [clip, question, fps, frames, model],
              [notice, text, strip], api_name="answer_video", **HEAVY)  # fmt: skip
    with gr.Accordion("Live camera", open=False):
        with gr.Row():
            camera = gr.Image(sources=["webcam"], streaming=True, type="pil",
                              label="Camera", elem_id="live-camera")  # fmt: skip
            with gr.Column(elem_classes="vlm-result"):
                live = gr.Textbox(label="What the camera shows", interactive=False,
                                  elem_id="live-caption")  # fmt: skip
                rate = gr.Markdown(elem_id="live-rate")
        seen = gr.State([])
        camera.stream(handlers["live_caption"], [camera, model, seen], [live, rate, seen],
                      stream_every=LIVE_EVERY, time_limit=300,
                      api_name="live_caption")  # fmt: skip


TRAIN_HELP = """Teach the model your images: upload a .zip of images, each with a .txt of
its captions beside it (one a line) or a `captions.csv` (`image_path`, `caption`), or train on
generated ShapeWorld scenes. Only the mapper learns (with "an LM learned on your captions", a
small LM first learns your captions' words, then stays frozen): the result is a model of its
own, served in every tab. One job trains at a time; yours survives a page refresh."""


def train_tab(handlers: dict, model: gr.Dropdown, kept: gr.BrowserState,
              browser: gr.BrowserState) -> gr.Textbox:  # fmt: skip
    """The Train tab (with --allow-training): a job's inputs, its live loss curve and held-out
    captions, Stop, the model's download. `kept`: the job's id in the browser's storage, to
    find it again after a refresh or from a second tab; `browser`: the browser's own id (see
    `_owner`). Returns the job id's box, which `kept` fills when the page loads."""
    service = handlers["service"]
    gr.Markdown(TRAIN_HELP)
    with gr.Row():
        with gr.Column():
            data = UploadedFiles(file_types=[".zip"], label="Your images with captions (.zip)",
                                 elem_id="train-zip")  # fmt: skip
            scenes = gr.Number(0, precision=0, minimum=0, label="…or this many generated "
                               "ShapeWorld images (with no zip)")  # fmt: skip
            base = gr.Dropdown(service.train_bases(None), value=next(iter(BASES)),
                               label="Start from")  # fmt: skip
            mapper = gr.Radio(list(MAPPERS), value=next(iter(MAPPERS)), label="Mapper")
            steps = gr.Slider(10, limits_of(handlers).train_max_steps, value=400, step=10,
                              label="Steps of the mapper's training")  # fmt: skip
            name = gr.Textbox("my-model", label="Name")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        with gr.Column():
            status = gr.Markdown(elem_id="train-status")
            curve = gr.LinePlot(x="step", y="loss", color="curve", height=260,
                                label="Loss of the stage under way", elem_id="train-curve",
                                color_map=CURVE_COLOURS)  # fmt: skip
            samples = gr.Dataframe(headers=SAMPLE_COLUMNS, label="Held-out images, captioned "
                                   "as it learns", elem_id="train-samples", wrap=True,
                                   column_widths=["50%", "50%"])  # fmt: skip
            download = gr.DownloadButton("Download the model (.zip)", visible=False,
                                         elem_id="train-download")  # fmt: skip
            with gr.Accordion("Push the model to the Hugging Face hub", open=False):
                repo = gr.Textbox(label="Repository (owner/name)")
                token = gr.Textbox(label="Write token (used once, never kept)", type="password")
                push = gr.Button("Push")
                pushed = gr.Markdown()
    job = gr.Textbox(visible=False, elem_id="train-job")  # the API's job id, and the page's
    status_json = gr.JSON(visible=False)
    # the API's endpoints: an API client's jobs are its session's
    api_only(handlers["train_start"], [data, base, steps, name, mapper, scenes], job,
             "train_start")  # fmt: skip
    api_only(handlers["train_status"], [job], status_json, "train_status")
    api_only(handlers["train_stop"], [job], status_json, "train_stop")
    # the page's: its jobs are its browser's (a refresh, a second tab)
    start.click(handlers["train_start"], [data, base, steps, name, mapper, scenes, browser], job,
                api_name=False).then(lambda j: j, job, kept, api_name=False)  # fmt: skip
    stop.click(handlers["train_stop"], [job, browser], status_json, api_name=False)
    push.click(handlers["train_push"], [job, repo, token, browser], pushed, api_name=False)
    gr.on([gr.Timer(2).tick], handlers["train_view"], [job, browser],
          [status, curve, samples, download, model, base], api_name=False)  # fmt: skip
    return job


# ---------------------------------------------------------------------------- MCP


def mcp_tools(handlers: dict) -> dict:
    """The tasks as an agent's tools (`--mcp`): typed, one line of text or a small structure
    out, each answer followed by what the model says of the image (`familiarity`)."""
    service = handlers["service"]

    def _guess(image, model) -> str:
        notice = handlers["familiarity"](image, model)
        return f"\n\n{re.sub(r'<[^>]+>|[*`]', '', notice)}" if notice else ""

    def describe_image(image: str, model: str = "") -> str:
        """Describe an image in one sentence: the vision-language model's caption.

        Args:
            image: a data: URL (data:image/png;base64,...) or a file uploaded here; no URL fetched
            model: the model to ask (blank: the server's default)
        Returns:
            The caption, then a note if the image is unlike the model's training images (a guess).
        """
        return handlers["caption"](image, model=model or None) + _guess(image, model or None)

    def answer_question(image: str, question: str, choices: str = "", model: str = "") -> str:
        """Answer a question about an image with the frozen language model reading it.

        Args:
            image: a data: URL (data:image/png;base64,...) or a file uploaded here; no URL fetched
            question: the question, e.g. "what color is the star?"
            choices: optional comma-separated answers to choose from
            model: the model to ask (blank: the server's default)
        Returns:
            The answer, then a note if the image is unlike the model's training images (a guess).
        """
        answer, *_ = handlers["answer"](image, question, choices, model or None)
        return answer + _guess(image, model or None)

    def rank_labels(image: str, labels: str, model: str = "") -> dict:
        """Rank labels against an image (CLIP zero-shot): each label's probability.

        Args:
            image: a data: URL (data:image/png;base64,...) or a file uploaded here; no URL fetched
            labels: the labels, comma-separated or one per line
            model: the model to ask (blank: the server's default)
        Returns:
            {label: probability} for the 10 likeliest labels, best first.
        """
        probs = service.classify(image, labels, "", model or None)
        return dict(list(probs.items())[:10])

    def search_images(text: str, k: int = 5, model: str = "") -> list[str]:
        """Search the server's image gallery by a text description.

        Args:
            text: what to look for, e.g. "a large blue star"
            k: how many results (1 to 24)
            model: the model to ask (blank: the server's default)
        Returns:
            One line per result, best first: its score as the page shows it and its name.
        """
        hits = service.search(text, None, k, model or None, None)
        return [f"{score} · {original_name(hit.item)}" for hit, score in hits]

    def locate_text(image: str, text: str, model: str = ""):
        """Show where in an image a phrase matches: the image with a heatmap on it.

        Args:
            image: a data: URL (data:image/png;base64,...) or a file uploaded here; no URL fetched
            text: the phrase, e.g. "a red circle"
            model: the model to ask (blank: the server's default)
        Returns:
            The image with the heatmap; its peak is where the phrase matches best.
        """
        return service.explain(image, text, model or None)

    def chat_about_images(messages: str, model: str = "") -> str:
        """Continue a conversation about images: the model's reply to the last message.
        Messages are OpenAI-style, the last one the user's, e.g. [{"role": "user",
        "content": [{"type": "image", "image": "data:image/png;base64,..."},
        {"type": "text", "text": "what color is it?"}]}, {"role": "assistant",
        "content": "red"}, {"role": "user", "content": "and its size?"}].

        Args:
            messages: the conversation as JSON text; images as data: URLs (no URL is fetched)
            model: the model to ask (blank: the server's default)
        Returns:
            The reply; after it, a note if old turns were left out to fit the model.
        """
        try:
            talk = json.loads(messages) if isinstance(messages, str) else messages
        except ValueError as error:
            raise gr.Error(f"messages: not JSON ({error})", print_exception=False) from None
        reply, note = handlers["chat"](talk, 20, model or None)
        return reply + (f"\n\n({note})" if note else "")

    return {f.__name__: friendly(f) for f in
            (describe_image, answer_question, rank_labels, search_images, locate_text,
             chat_about_images)}  # fmt: skip


def mcp_endpoints(handlers: dict, demo: gr.Blocks) -> None:
    """The MCP tools as API endpoints without a page of their own; every other endpoint is
    left out of the tools (it stays in the API)."""
    for block_fn in demo.fns.values():  # the page's endpoints: API only, not tools
        if block_fn.fn is not None:
            block_fn.fn._mcp_type = "endpoint"
    tools = mcp_tools(handlers)
    with gr.Column(visible=False):
        image = UploadedImage(type="pil")
        text, extra, model = gr.Textbox(""), gr.Textbox(""), gr.Textbox("")  # "": optional
        k = gr.Number(5, precision=0, minimum=1, maximum=24)
        answer, scores, lines, picture = gr.Textbox(), gr.JSON(), gr.JSON(), gr.Image(type="pil")
    api_only(tools["describe_image"], [image, model], answer, "describe_image")
    api_only(tools["answer_question"], [image, text, extra, model], answer, "answer_question")
    api_only(tools["rank_labels"], [image, text, model], scores, "rank_labels")
    api_only(tools["search_images"], [text, k, model], lines, "search_images")
    api_only(tools["locate_text"], [image, text, model], picture, "locate_text")
    api_only(tools["chat_about_images"], [extra, model], answer, "chat_about_images")


def checked_examples(handlers: dict, tasks) -> dict[str, tuple[list, list[str]]]:
    """Each tab's example rows and labels, every example run once through the page's own
    handler on the default model: one it gets wrong is labelled a known failure."""
    runs = {
        "caption": (caption_cases(), lambda row: handlers["caption"](row[0])),
        "answer": (question_cases(), lambda row: _first(handlers["answer"](*row))),
        "few_shot": (few_shot_cases(), lambda row: handlers["few_shot"](*row)),
    }
    checked = {}
    for task, (cases, run) in runs.items():
        outputs = [run(case.row) if task in tasks else "" for case in cases]
        labels = checked_labels(cases, outputs, task) if task in tasks else [c.label for c in cases]
        checked[task] = ([c.row for c in cases], labels)
    return checked


def limits_of(handlers: dict) -> Limits:
    """The limits the handlers check requests against (the sliders' bounds come from them)."""
    return handlers["service"].limits


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def build_demo(settings: argparse.Namespace) -> gr.Blocks:
    models = Models(settings.model)
    shared = getattr(settings, "shared_index", False)
    training = getattr(settings, "allow_training", False) or bool(getattr(settings, "auth", None))
    limits = getattr(settings, "limits", None) or current()
    handlers = make_handlers(models, settings.index_dir, settings.allowed_dirs, shared, training,
                             limits)  # fmt: skip
    indexes = handlers["service"].indexes
    pipeline = models.get(None)
    sw_paths = [str(p) for p, _ in shapeworld_examples()]
    photos = [str(p) for p in photo_examples()]
    examples = checked_examples(handlers, pipeline.tasks)
    if shared and "search" in pipeline.tasks:  # a damaged saved gallery: said from the start
        indexes.get(models.default, pipeline)

    # every file the app writes or takes in (uploads, the caption CSV, the pictures it shows,
    # private galleries) is removed this long after it was written or last used
    age = limits.temp_max_age
    sweep = max(1, min(60, int(age // 4)))
    with gr.Blocks(title="vlm — teach a frozen LM to see",
                   delete_cache=(sweep, max(1, int(age)))) as demo:  # fmt: skip
        gr.Markdown("# vlm · teach a frozen language model to see")
        with gr.Row():
            notice = gr.Markdown(handlers["notice"](None), elem_id="model-notice")
            model = gr.Dropdown(
                models.choices(), value=models.default, label="Model", scale=0,
                min_width=220, visible=len(models.choices()) > 1 or training,
                # a model trained here or a folder under --allowed-dir, named by a request:
                # Models.pick decides what may load, not the list
                allow_custom_value=True,
            )  # fmt: skip
        model.change(handlers["notice"], model, notice, api_name=False)
        with gr.Accordion("How it works", open=False):
            gr.HTML(HOW_IT_WORKS)
        with gr.Tab("Caption"):
            outside = photos and not any(f.familiar for f in pipeline.familiarity(photos))
            photo_rows = ([[p] for p in photos], photo_labels(), outside)
            caption_tab(handlers, model, (examples["caption"], photo_rows))
        with gr.Tab("Zero-shot"):
            zero_shot_tab(handlers, model, sw_paths[:4] + photos)
        with gr.Tab("Search"):
            indexed = search_tab(handlers, model)
        with gr.Tab("Ask"):
            ask_tab(handlers, model, examples["answer"])
        with gr.Tab("Few-shot"):
            few_shot_tab(handlers, model, examples["few_shot"])
        if "answer" in pipeline.tasks:
            with gr.Tab("Chat"):
                chat_tab(handlers, model)
        with gr.Tab("Explain"):
            explain_tab(handlers, model)
        if "caption" in pipeline.tasks:
            with gr.Tab("Video"):
                video_tab(handlers, model)
        if training:  # browser states live outside the tabs, which mount only when shown
            kept = gr.BrowserState("", storage_key="vlm-train-job")
            browser = gr.BrowserState("", storage_key="vlm-browser")
            with gr.Tab("Train"):
                job = train_tab(handlers, model, kept, browser)
            demo.load(browser_id, browser, browser, api_name=False)
            demo.load(lambda j: j, kept, job, api_name=False)  # back to the job after a refresh
        if getattr(settings, "mcp", False):
            mcp_endpoints(handlers, demo)
        demo.load(handlers["show_index"], model, indexed, api_name=False)
    demo.queue(default_concurrency_limit=2, max_size=QUEUE_SIZE)
    fair = FairQueue(limits.max_pending, HEAVY["concurrency_id"], QUEUE_SIZE // 2,
                     getattr(settings, "trusted_proxy", False))  # fmt: skip
    fair.install(demo._queue)
    bound_session_inputs(gr.state_holder.SessionState)
    demo.vlm_limits = limits
    demo.vlm_served_paths = served_paths(settings.index_dir, models.choices(), indexes)
    demo.vlm_middleware = Middleware(
        RequestLimits, max_body=limits.max_body_size, upload_quota=limits.upload_quota,
        upload_usage=lambda: app_bytes(demo, indexes),
    )  # fmt: skip
    return demo


def app_bytes(demo: gr.Blocks, indexes: Indexes) -> int:
    """What the app's files take on disk now: the uploads and outputs Gradio keeps for this
    app (not other apps' in the same folder) and the private galleries' copies."""
    total = indexes.private_bytes()
    for files in demo.temp_file_sets:
        for name in list(files):
            with contextlib.suppress(OSError):  # deleted meanwhile
                total += os.stat(name).st_size
    return total


def served_paths(index_root: Path, model_names: list[str], indexes: Indexes) -> list[str]:
    """Gradio's `allowed_paths`, kept minimal: what the page must show from outside its upload
    cache, that is the bundled examples, the images each model's shared index keeps and the
    private galleries' copies. Never the index files themselves, nor the folders allowed with
    --allowed-dir (requests may *read* from those, but nothing there is served)."""
    images = [index_folder(index_root, name) / "images" for name in model_names]
    return [str(EXAMPLES_DIR), *map(str, images), str(indexes.private_root())]


def launch(demo: gr.Blocks, settings: argparse.Namespace) -> None:
    auth = None
    if settings.auth:
        user, _, password = settings.auth.partition(":")
        if not user or not password:
            sys.exit("--auth takes user:password")
        auth = (user, password)
    demo.launch(
        server_name=settings.server_name, server_port=settings.port, share=settings.share,
        auth=auth, max_file_size=demo.vlm_limits.max_file_size, css=CSS, footer_links=["api"],
        allowed_paths=demo.vlm_served_paths,
        # Gradio keeps a copy of the page's configuration for every session (about 0.3 MB
        # each) until it has this many; API clients never close theirs. The app keeps nothing
        # per session, so forgetting the oldest is free.
        state_session_capacity=demo.vlm_limits.max_sessions,
        app_kwargs={"middleware": [demo.vlm_middleware]}, mcp_server=settings.mcp,
    )  # fmt: skip


def configure_logging() -> None:
    """The server's log: one line per refused input or queue refusal (vlm's INFO), warnings
    and tracebacks of real bugs from everything else."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlm").setLevel(logging.INFO)


def __getattr__(name: str):
    """`demo`, built on first use (`gradio app.py`, Spaces), with the flags' defaults and the
    environment's settings: importing this module loads no model."""
    if name == "demo":
        configure_logging()
        globals()["demo"] = build_demo(parse_settings([]))
        return globals()["demo"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    configure_logging()
    settings = parse_settings(sys.argv[1:])
    demo = build_demo(settings)
    launch(demo, settings)
