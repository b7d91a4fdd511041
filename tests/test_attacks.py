"""An attacker's probe of the running demo through its raw HTTP API (POST
/gradio_api/call/<endpoint>, then its event stream), as issue 23 found the holes: every image
form on every image endpoint, data URLs, long texts, index uploads that overwrite or leave
files behind, temporary folders, NaN in number fields. One app serves the whole module, with
its temporary folders (TMPDIR, so Gradio's cache too) inside the test's folder."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import zipfile
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from test_app import start_app

from vlm.examples import shapeworld_examples

MAX_FILE_SIZE = 1 << 20  # the server runs with VLM_MAX_FILE_SIZE=1mb: small data to test it
FILE_DATA = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    (root / "tmp").mkdir()
    env = {"TMPDIR": str(root / "tmp"), "VLM_MAX_FILE_SIZE": "1mb", "VLM_TEMP_MAX_AGE": "0"}
    # one shared index: raw calls carry no session, and these probe the files it keeps
    process, url, _ = start_app(root, "--shared-index", env=env)
    yield process, url.rstrip("/"), root
    process.terminate()
    process.wait(timeout=30)


def call(url: str, endpoint: str, data: list, timeout: float = 120) -> tuple[str, object]:
    """(event, data) of the last `complete` or `error` event of one raw API call."""
    body = json.dumps({"data": data})  # NaN and Infinity as Python writes them (JSON5)
    response = httpx.post(f"{url}/gradio_api/call/{endpoint}", content=body, timeout=30,
                          headers={"Content-Type": "application/json"})  # fmt: skip
    if response.status_code != 200:
        return "http-error", response.text
    event_id = response.json()["event_id"]
    stream = httpx.get(f"{url}/gradio_api/call/{endpoint}/{event_id}", timeout=timeout).text
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.M)
    event, payload = next((e, d) for e, d in reversed(events) if e in ("complete", "error"))
    return event, json.loads(payload)


def error_of(url: str, endpoint: str, data: list) -> str:
    event, payload = call(url, endpoint, data)
    assert event in ("error", "http-error"), (event, payload)
    return str(payload)


def upload(url: str, name: str, data: bytes) -> dict:
    """Upload through /gradio_api/upload, as the page does; the FileData to send."""
    response = httpx.post(f"{url}/gradio_api/upload", files=[("files", (name, data))], timeout=30)
    response.raise_for_status()
    return {"path": response.json()[0], "orig_name": name, "meta": FILE_DATA}


@pytest.fixture(scope="module")
def scene():
    """A one-object bundled example and its caption."""
    path, truth = next((p, t) for p, t in shapeworld_examples() if " left of " not in t["caption"])
    return path, truth["caption"]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- every image form

# each image endpoint's arguments, with the image given as `x`
ENDPOINTS = {
    "caption": lambda x: [x, "greedy", 3, 0.9, 1.0, 30, "shapeworld"],
    "classify": lambda x: [x, "red circle\nblue star", "", "shapeworld"],
    "answer": lambda x: [x, "what color is the shape?", "", "shapeworld"],
    "few_shot": lambda x: [x, "Caption: a shape", None, "", None, "", x, "Caption:", 10,
                           "shapeworld"],
    "explain": lambda x: [x, "a circle", "shapeworld"],
    "search": lambda x: ["", x, 3, "shapeworld"],
}  # fmt: skip

# each way to name a server file (a path, the server's working directory)
FORMS = {
    "filedata-with-meta": lambda p, cwd: {"path": p, "meta": FILE_DATA},
    "filedata-without-meta": lambda p, cwd: {"path": p},
    "filedata-orig-name": lambda p, cwd: {"path": p, "orig_name": "cat.png"},
    "path-string": lambda p, cwd: p,
    "relative-path": lambda p, cwd: {"path": os.path.relpath(p, cwd)},
    "file-url": lambda p, cwd: {"path": f"file://{p}", "meta": FILE_DATA},
    "url-field": lambda p, cwd: {"url": f"file://{p}"},
    "own-server-url": lambda p, cwd: {"url": f"http://127.0.0.1:1/gradio_api/file={p}"},
}


@pytest.fixture(scope="module")
def targets(server, scene):
    """Server files outside every allowed folder: an image (which would be captioned if it
    were read), a missing file, a text file and an empty-looking /proc file."""
    _, _, root = server
    outside = root / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(scene[0].read_bytes())
    return [str(secret), str(outside / "missing.png"), "/etc/passwd", "/proc/self/environ"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_no_form_reads_a_file_outside_the_roots_or_tells_whether_it_exists(
    server, targets, endpoint, form
):
    _, url, root = server
    messages = set()
    for target in targets:
        payload = FORMS[form](target, root)
        message = error_of(url, endpoint, ENDPOINTS[endpoint](payload))
        # one message for all four, whatever exists: the target's name is the only difference
        shown = [target, os.path.relpath(target, root), Path(target).name]
        for text in sorted(shown, key=len, reverse=True):
            message = message.replace(text, "<target>")
        messages.add(message)
        assert "secret" not in message.replace("<target>", "")
    assert len(messages) == 1, messages
    message = messages.pop()
    assert not re.search(r"no such file|empty|Pillow|not an image|damaged", message), message


def test_a_url_is_never_fetched_and_leaves_nothing_in_gradios_cache(server):
    _, url, root = server
    cache = root / "tmp" / "gradio"
    before = sorted(cache.rglob("*")) if cache.exists() else []
    for target in ["http://169.254.169.254/latest/meta-data/x.png", "https://example.com/a.png",
                   f"{url}/gradio_api/file=/etc/passwd"]:  # fmt: skip
        for payload in [{"path": target, "meta": FILE_DATA}, {"url": target}]:
            message = error_of(url, "caption", ENDPOINTS["caption"](payload))
            assert "does not fetch URLs" in message, message
        message = error_of(url, "index_add", [[{"path": target, "meta": FILE_DATA}], "shapeworld"])
        assert "does not fetch URLs" in message, message
    after = sorted(cache.rglob("*")) if cache.exists() else []
    assert after == before


# ----------------------------------------------------------------------------- data URLs


def test_a_data_url_is_read_like_an_upload(server, scene):
    _, url, _ = server
    image = data_url(scene[0].read_bytes())
    for payload in [{"url": image, "meta": FILE_DATA}, {"url": image}]:
        assert call(url, "caption", ENDPOINTS["caption"](payload)) == ("complete", [scene[1]])


def server_rss(process) -> int:
    return psutil.Process(process.pid).memory_info().rss


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_oversized_data_urls_are_refused_before_decoding(server, endpoint):
    process, url, _ = server
    too_many_bytes = data_url(os.urandom(MAX_FILE_SIZE + 1000))
    cases = [
        (too_many_bytes, ["too large", "as a data URL", "the limit is 1.0 MB"]),
        (data_url(png_bytes(Image.new("1", (20000, 20000)))),
         ["the image is too large (400,000,000 pixels; the limit is 64,000,000 pixels)"]),
        (data_url(png_bytes(Image.new("1", (9000, 9000)))),
         ["the image is too large (9000×9000 pixels; the limit is 64,000,000 pixels)"]),
        ("data:image/png;base64,not base64!", ["not valid base64"]),
    ]  # fmt: skip
    before = server_rss(process)
    for image, words in cases:
        message = error_of(url, endpoint, ENDPOINTS[endpoint]({"url": image, "meta": FILE_DATA}))
        assert all(word in message for word in words), message
    # decoding 400 MP would take 400 MB at one byte a pixel, 1.2 GB as RGB
    assert server_rss(process) - before < 150 << 20


# ----------------------------------------------------------------------------- text limits


def test_few_shot_texts_are_limited_before_tokenising(server, scene):
    process, url, _ = server
    image = upload(url, "scene.png", scene[0].read_bytes())
    args = ENDPOINTS["few_shot"](image)
    before = server_rss(process)
    for position, what in [(1, "Text 1"), (3, "Text 2"), (5, "Text 3"), (7, "the prompt")]:
        sent = list(args)
        sent[position] = "Caption: " + "z " * 1_500_000  # 3 MB (issue 23: 5.4 GB of RSS)
        if position in (3, 5):
            sent[position - 1] = image
        message = error_of(url, "few_shot", sent)
        assert f"{what} is too long (3,000,009 characters; the limit is 1,000)" in message
    assert server_rss(process) - before < 300 << 20
    assert call(url, "few_shot", args)[0] == "complete"


def test_classify_limits_templates_labels_and_their_product(server, scene):
    _, url, _ = server
    image = upload(url, "scene.png", scene[0].read_bytes())
    labels = "\n".join(f"label {i}" for i in range(2000))
    cases = [
        (labels, "\n".join(f"a photo of {{}} number {i}" for i in range(200)),
         "too many templates (200; the limit is 100)"),
        ("red circle", "a " * 150 + "{}",
         "template 1 is too long (302 characters; the limit is 200)"),
        ("red circle", "no label here", "Each template needs a {} where the label goes"),
        ("x" * 301 + ", red circle", "", "label 1 is too long (301 characters; the limit is 300)"),
        (labels, "\n".join(f"a photo of {{}} number {i}" for i in range(11)),
         "too many labels × templates (2,000 × 11 = 22,000 texts to encode; the limit is 20,000)"),
    ]  # fmt: skip
    for labels_text, templates, words in cases:
        message = error_of(url, "classify", [image, labels_text, templates, "shapeworld"])
        assert words in message, message
    event, (result, _) = call(url, "classify", [image, "red circle, blue star", "", "shapeworld"])
    assert event == "complete" and result["label"] in ("red circle", "blue star")


def test_long_phrases_and_queries_are_refused(server, scene):
    _, url, _ = server
    image = upload(url, "scene.png", scene[0].read_bytes())
    message = error_of(url, "explain", [image, "a " * 1000, "shapeworld"])
    assert "the phrase is too long (2,000 characters; the limit is 300)" in message
    message = error_of(url, "search", ["a " * 1000, None, 3, "shapeworld"])
    assert "the text query is too long (2,000 characters; the limit is 300)" in message
    message = error_of(url, "answer", [image, "why " * 100_000, "", "shapeworld"])
    assert "the question is too long (400,000 characters; the limit is 500)" in message
    message = error_of(url, "answer", [image, "what color?", "red, " + "z" * 5000, "shapeworld"])
    assert "label 2 is too long (5,000 characters; the limit is 300)" in message


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_and_infinity_in_number_fields_get_a_clear_message(server, scene, value):
    _, url, _ = server
    image = upload(url, "scene.png", scene[0].read_bytes())
    decoding = ["greedy", 3, 0.9, 1.0, 30, "shapeworld"]
    cases = {
        "caption": ([image, *decoding[:4], value, "shapeworld"], "Max length must be between"),
        "beams": ([image, "beam search", value, *decoding[2:]], "Beams must be between"),
        "few_shot": (ENDPOINTS["few_shot"](image)[:8] + [value, "shapeworld"],
                     "Max length must be between"),
        "search": (["a red circle", None, value, "shapeworld"], "Results must be between"),
    }  # fmt: skip
    for name, (data, words) in cases.items():
        endpoint = "caption" if name == "beams" else name
        message = error_of(url, endpoint, data)
        # (Gradio's sliders refuse infinity themselves, clearly; NaN passes their bounds)
        assert re.search(f"{words}|Value inf is greater than maximum value", message), message
        assert "cannot convert" not in message, (name, message)


# ----------------------------------------------------------------------------- the index


def served_bytes(url: str, path: str) -> bytes:
    response = httpx.get(f"{url}/gradio_api/file={path}", timeout=30)
    response.raise_for_status()
    return response.content


def index_images(root: Path) -> list[Path]:
    return sorted(p for p in (root / "indexes").rglob("images/*") if p.is_file())


def test_index_uploads_with_one_name_never_overwrite_each_other(server):
    _, url, root = server
    red, blue = (png_bytes(Image.new("RGB", (40, 40), color)) for color in ("red", "blue"))
    for data in (red, blue):
        event, (_, status) = call(url, "index_add", [[upload(url, "victim.png", data)],
                                                     "shapeworld"])  # fmt: skip
        assert event == "complete" and status.startswith("Added 1 image(s)"), status
    for data in (red, blue):  # each image finds itself, and the file served is its own
        event, (hits,) = call(url, "search", ["", upload(url, "query.png", data), 1, "shapeworld"])
        assert event == "complete"
        assert served_bytes(url, hits[0]["image"]["path"]) == data
    victims = [p for p in index_images(root) if p.name.endswith("victim.png")]
    assert len(victims) == 2 and {p.read_bytes() for p in victims} == {red, blue}


def test_a_rejected_upload_leaves_nothing_behind(server):
    _, url, root = server
    before = index_images(root)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for i in range(20):  # under the 1 MiB zip-bomb floor, named as images, not images
            bundle.writestr(f"junk-{i}.png", b"\x00" * 200_000)
        bundle.writestr("fake.jpg", b"not a jpeg")
        bundle.writestr("notes.txt", b"hello")
    sent = [upload(url, "junk.zip", archive.getvalue()), upload(url, "fake.png", b"\x89PNG")]
    event, (gallery, status) = call(url, "index_add", [sent, "shapeworld"])
    assert event == "complete" and status.startswith("Added 0 image(s)"), status
    assert index_images(root) == before  # nothing kept in the served folder
    assert not list((root / "tmp").glob("vlm-unpack-*"))  # nor in the unpacking folder
    indexed = {Path(item["image"]["path"]).name for item in gallery}
    assert {p.name for p in index_images(root)} <= indexed  # it serves only what it indexed


# ----------------------------------------------------------------------------- temporary files


def test_caption_files_leaves_no_folder_per_request(server, scene):
    _, url, root = server
    for _ in range(3):
        files = [upload(url, "scene.png", scene[0].read_bytes())]
        event, (table, csv_file) = call(url, "caption_files", [files, *ENDPOINTS["caption"](0)[1:]])
        assert event == "complete" and table["data"][0][1] == scene[1]
        assert served_bytes(url, csv_file["path"]).startswith(b"file,caption")
    folders = list((root / "tmp").glob("vlm-captions-*"))
    assert len(folders) == 1  # one folder for the server, not one per request
    assert len(list(folders[0].iterdir())) == 1  # VLM_TEMP_MAX_AGE=0: only the newest is left


def test_the_server_survived_it_all(server, scene):
    process, url, _ = server
    assert process.poll() is None
    assert call(url, "caption", ENDPOINTS["caption"](upload(url, "s.png", scene[0].read_bytes())))[
        1
    ] == [scene[1]]
