"""The demo's live output, on one app serving the bundled model: texts arrive a piece at a time
through the API (gradio_client) and in a real browser (Playwright + Debian's Chromium), with
each word's probability beside them; the endpoints clients used before keep their outputs."""

from __future__ import annotations

import os
import shutil
import threading
import weakref
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_client import Client, handle_file
from test_app import launch_chromium, serve

from vlm.examples import shapeworld_examples

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("VLM_TEST_ARTIFACTS", ROOT / "artifacts"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("app-streaming"))


@pytest.fixture(scope="module")
def client(app):
    return Client(app, verbose=False)


@pytest.fixture(scope="module")
def two_objects():
    """A bundled example with two objects (a ten-word caption), and its truth."""
    return next((p, t) for p, t in shapeworld_examples() if " left of " in t["caption"])


def partials(job) -> list:
    """Everything a submitted job sent, the final output last."""
    outputs = list(job)
    assert outputs[-1] == job.result()
    return outputs


def test_submit_streams_the_caption_and_predict_gives_it_whole(client, two_objects):
    path, truth = two_objects
    outputs = partials(client.submit(handle_file(str(path)), api_name="/caption"))
    assert outputs[-1] == truth["caption"]
    before = set(outputs[:-1]) - {"", truth["caption"]}
    assert len(before) >= 2 and all(truth["caption"].startswith(t) for t in before)
    assert client.predict(handle_file(str(path)), api_name="/caption") == truth["caption"]


def test_caption_words_pair_each_word_with_its_probability(client, two_objects):
    path, truth = two_objects
    outputs = partials(client.submit(handle_file(str(path)), api_name="/caption_words"))
    text, spans = outputs[-1]
    assert text == truth["caption"] and len({t for t, _ in outputs}) >= 3
    assert "".join(s["token"] for s in spans) == text
    words = [(s["token"], s["class_or_confidence"]) for s in spans if s["token"].strip()]
    assert [w for w, _ in words] == text.split()
    assert all(0 < p <= 1 for _, p in words)


def test_answer_streams_and_choices_keep_their_scores(client, two_objects):
    path, truth = two_objects
    question, expected = truth["questions"][0]
    outputs = partials(client.submit(handle_file(str(path)), question, "", api_name="/answer"))
    assert outputs[-1] == (expected, {})
    answer, scores = client.predict(handle_file(str(path)), "how many shapes are there?",
                                    "one, two, three", api_name="/answer")  # fmt: skip
    assert answer == "two" and scores["label"] == "two"
    answer, spans, scores = client.predict(handle_file(str(path)), "how many shapes are there?",
                                           "one, two, three", api_name="/answer_words")  # fmt: skip
    top = {c["label"]: c["confidence"] for c in scores["confidences"]}
    assert spans == [{"token": "two", "class_or_confidence": pytest.approx(top["two"])}]


def test_few_shot_streams_its_continuation(client):
    (p1, t1), (p2, _), (p3, t3) = shapeworld_examples()[:3]
    inputs = [handle_file(str(p1)), f"Caption: {t1['caption']}", None, "", None, "",
              handle_file(str(p3)), "Caption:", 20]  # fmt: skip
    text, spans = client.predict(*inputs, api_name="/few_shot_words")
    assert "".join(s["token"] for s in spans) == text and text.strip()
    outputs = partials(client.submit(*inputs, api_name="/few_shot"))
    assert outputs[-1] == text and len(outputs) >= 2


# Records every value the page writes into the caption's text box (Svelte sets `.value`), so
# the test sees each partial text however fast they come.
RECORD_CAPTION_VALUES = """
const value = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value');
window.captionValues = [];
Object.defineProperty(HTMLTextAreaElement.prototype, 'value', {
  configurable: true,
  get() { return value.get.call(this); },
  set(text) {
    if (this.closest('#caption-output')) window.captionValues.push(text);
    value.set.call(this, text);
  },
});
"""


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (CI installs it)")
def test_the_page_writes_the_caption_word_by_word(app, two_objects):
    from playwright.sync_api import sync_playwright

    path, truth = two_objects
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.add_init_script(RECORD_CAPTION_VALUES)
        page.goto(app)
        page.wait_for_selector("#caption-image")
        page.locator("#caption-image input[type=file]").set_input_files(str(path))
        page.wait_for_selector("#caption-image img", timeout=30_000)
        page.click("#caption-button")
        page.wait_for_function(
            "want => document.querySelector('#caption-output textarea').value === want",
            arg=truth["caption"], timeout=60_000,
        )  # fmt: skip
        values = page.evaluate("window.captionValues")
        final = values.index(truth["caption"])
        before = [v for v in dict.fromkeys(values[:final]) if v]
        assert len(before) >= 2, values
        assert all(truth["caption"].startswith(v) for v in before), values
        page.wait_for_function(
            "n => [...document.querySelectorAll('#caption-words .score-token')]"
            ".filter(e => e.textContent.trim()).length === n",
            arg=len(truth["caption"].split()), timeout=30_000,
        )  # fmt: skip
        shown = page.evaluate(
            "() => [...document.querySelectorAll('#caption-words .score-token')]"
            ".filter(e => e.textContent.trim())"
            ".map(e => [e.textContent.trim(), e.style.backgroundColor])"
        )
        assert [word for word, _ in shown] == truth["caption"].split()
        assert all(colour.startswith("rgb") for _, colour in shown)  # each word shaded
        page.locator("#caption-words").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "app-streaming.png"), full_page=True)
        browser.close()


# ----------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    import app

    models = app.Models("shapeworld")
    return models, app.make_handlers(models, tmp_path_factory.mktemp("indexes"))


def test_a_second_request_does_not_wait_for_a_stream(handlers, two_objects):
    """The model's turn is held while the image is encoded, not while the LM writes: with a
    stream paused half-way (a slow reader), another request on the same model completes."""
    _, handle = handlers
    path, truth = two_objects
    first = handle["caption_words"](str(path))
    assert next(first)[0]  # the stream has begun and is paused here
    other = {}
    thread = threading.Thread(
        target=lambda: other.update(text=handle["caption"](str(path))), daemon=True
    )
    thread.start()
    thread.join(timeout=120)
    assert other.get("text") == truth["caption"]
    assert [*first][-1][0] == truth["caption"]


def test_out_of_memory_while_writing_frees_memory_and_keeps_serving(handlers, two_objects,
                                                                    monkeypatch):  # fmt: skip
    models, handle = handlers
    pipeline, path = models.get(None), str(two_objects[0])
    events, held = [], []

    def out_of_memory(*args, **kwargs):  # in the LM's thread, after the stream has started
        workspace = torch.ones(1024, 1024)
        held.append(weakref.ref(workspace))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def empty_cache():
        events.append("freed" if held[0]() is None else "still held")

    monkeypatch.setattr(pipeline.lm, "generate", out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    with pytest.raises(gr.Error, match="The GPU ran out of memory"):
        [*handle["caption_words"](path)]
    assert events == ["freed"]
    monkeypatch.undo()
    assert handle["caption"](path) == two_objects[1]["caption"]
