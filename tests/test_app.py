"""The demo, served on loopback with the bundled model, driven through its API
(gradio_client) and in a real browser (Playwright + Debian's Chromium)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from vlm import shapeworld as sw
from vlm.examples import shapeworld_examples

ROOT = Path(__file__).resolve().parent.parent
OBJECT = rf"a (small|large) ({'|'.join(sw.COLORS)}) ({'|'.join(sw.SHAPES)})"
CAPTION = re.compile(rf"{OBJECT}( left of {OBJECT}){{0,2}}")  # ShapeWorld's caption grammar
ARTIFACTS = Path(os.environ.get("VLM_TEST_ARTIFACTS", ROOT / "artifacts"))


def launch_chromium(playwright):
    """Debian's chromium through Playwright, headless, with nothing it would fetch."""
    return playwright.chromium.launch(
        executable_path=shutil.which("chromium"),
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"],
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The whole environment of a server under test, nothing inherited: a HOME of its own (so
    no Hugging Face cache, no cached clipcap-coco), offline, and no VLM_* setting but these."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
        "LANG": "C.UTF-8", "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
        "VLM_INDEX_DIR": str(tmp_path / "indexes"), "VLM_DEVICE": "cpu", "TQDM_DISABLE": "1",
        **extra,
    }  # fmt: skip


def start_app(tmp_path: Path, *args: str, env: dict | None = None):
    """app.py on a free loopback port in a pinned environment (`env` adds to it)."""
    port = free_port()
    environment = pinned_env(tmp_path, **(env or {}))
    log = open(tmp_path / f"app-{port}.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), *args],
        cwd=tmp_path, env=environment, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    started = time.time()
    while time.time() - started < 600:  # a guard against a hang, not a speed check
        if process.poll() is not None:
            raise RuntimeError((tmp_path / f"app-{port}.log").read_text())
        try:
            urllib.request.urlopen(url, timeout=2)
            return process, url, time.time() - started  # seconds: reported, never asserted
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the app did not start in 600 s")


def serve(tmp_path: Path, *args: str, env: dict | None = None):
    """A fixture's body: the app's URL while it runs, stopped afterwards."""
    process, url, _ = start_app(tmp_path, *args, env=env)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def client(app):
    return Client(app, verbose=False)


@pytest.fixture(scope="module")
def one_object():
    """A bundled example with one object, and its truth."""
    return next((p, t) for p, t in shapeworld_examples() if " left of " not in t["caption"])


def test_offline_launch_picks_the_bundled_model_and_says_so(app):
    url = app
    config = json.loads(urllib.request.urlopen(url + "config", timeout=10).read())
    texts = [str(c.get("props", {}).get("value", "")) for c in config["components"]]
    notice = next(t for t in texts if "Model:" in t)
    assert "shapeworld" in notice and "HF_HUB_OFFLINE" in notice


def test_caption_endpoint(client, one_object):
    path, truth = one_object
    assert client.predict(handle_file(str(path)), api_name="/caption") == truth["caption"]


def test_caption_files_endpoint_gives_a_table_and_csv(client):
    paths = [str(p) for p, _ in shapeworld_examples()[:3]]
    table, csv_file = client.predict([handle_file(p) for p in paths], api_name="/caption_files")
    truths = [t["caption"] for _, t in shapeworld_examples()[:3]]
    assert [tuple(row) for row in table["data"]] == [
        (Path(p).name, t) for p, t in zip(paths, truths, strict=True)
    ]
    assert Path(csv_file).read_text().splitlines()[0] == "file,caption"


def test_classify_endpoint_ranks_the_right_label_first(client, one_object):
    path, truth = one_object
    obj = truth["objects"][0]
    labels = "\n".join(f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple",
                                            "orange", "white")
                       for s in ("circle", "square", "triangle", "star", "cross"))  # fmt: skip
    result, _ = client.predict(handle_file(str(path)), labels, "", api_name="/classify")
    assert result["label"] == f"{obj['color']} {obj['shape']}"


def test_search_endpoint_finds_the_described_image_first(client):
    path, truth = next((p, t) for p, t in shapeworld_examples() if " left of " in t["caption"])
    results = client.predict(truth["caption"], None, 3, api_name="/search")
    assert Path(results[0]["image"]).name == path.name


def test_answer_endpoint(client, one_object):
    path, truth = one_object
    question, expected = next((q, a) for q, a in truth["questions"] if q.startswith("what color"))
    answer, _ = client.predict(handle_file(str(path)), question, "", api_name="/answer")
    assert answer == expected
    answer, scores = client.predict(handle_file(str(path)), "how many shapes are there?",
                                    "one, two, three", api_name="/answer")  # fmt: skip
    assert answer == "one" and scores["label"] == "one"


def test_few_shot_endpoint_continues_like_its_examples(client):
    """Two captioned examples ("Caption: …", as the Few-shot tab's example row), then a query
    image and "Caption:": the continuation is a ShapeWorld caption, the examples' format (its
    content is the bundled model's guess: see test_app_decoding)."""
    (p1, t1), (p2, t2), (p3, _) = shapeworld_examples()[:3]
    text = client.predict(
        handle_file(str(p1)), f"Caption: {t1['caption']}", handle_file(str(p2)),
        f"Caption: {t2['caption']}", None, "", handle_file(str(p3)), "Caption:", 12,
        api_name="/few_shot",
    )  # fmt: skip
    assert CAPTION.fullmatch(text), text


def test_servers_get_a_pinned_environment(tmp_path, monkeypatch):
    """What this shell has set (a model, limits, a Hugging Face cache) never reaches the
    servers under test."""
    for name, value in [("VLM_MODEL", "clipcap-coco"), ("VLM_MAX_LABELS", "3"),
                        ("HF_HOME", "/somewhere"), ("HF_HUB_OFFLINE", "0")]:  # fmt: skip
        monkeypatch.setenv(name, value)
    env = pinned_env(tmp_path, VLM_MAX_SESSIONS="4")
    assert not {"VLM_MODEL", "VLM_MAX_LABELS", "HF_HOME"} & set(env)
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLM_MAX_SESSIONS"] == "4"
    assert Path(env["HOME"]).is_dir() and not any(Path(env["HOME"]).iterdir())


def test_explain_endpoint_returns_an_image_of_the_input_size(client, one_object):
    from PIL import Image

    path, truth = one_object
    result = client.predict(handle_file(str(path)), truth["caption"], api_name="/explain")
    assert Image.open(result).size == Image.open(path).size


def test_bad_input_gives_a_clear_message(client, one_object):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Please give an image"):
        client.predict(None, api_name="/caption")
    with pytest.raises(AppError, match="no labels given"):
        client.predict(handle_file(str(one_object[0])), " , ", "", api_name="/classify")
    # and the server keeps serving
    assert client.predict(handle_file(str(one_object[0])), api_name="/caption")


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (CI installs it)")
def test_drop_an_image_in_a_real_browser(app, one_object):
    from playwright.sync_api import sync_playwright

    url = app
    path, truth = one_object
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("#caption-image")
        data = list(path.read_bytes())
        transfer = page.evaluate_handle(
            """([bytes, name]) => {
                const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/png'}));
                return dt;
            }""",
            [data, path.name],
        )
        target = page.locator("#caption-image button[aria-dropeffect]").first
        for event in ("dragenter", "dragover", "drop"):
            target.dispatch_event(event, {"dataTransfer": transfer})
        page.wait_for_selector("#caption-image img", timeout=30_000)
        page.click("#caption-button")
        output = page.locator("#caption-output textarea")
        # The caption streams in word by word: wait for the whole of it, not the first word.
        with contextlib.suppress(Exception):  # the assertion below says what was shown instead
            page.wait_for_function(
                "(want) => document.querySelector('#caption-output textarea').value === want",
                arg=truth["caption"],
                timeout=60_000,
            )
        assert output.input_value() == truth["caption"]
        page.screenshot(path=str(ARTIFACTS / "app-caption.png"), full_page=True)
        browser.close()
