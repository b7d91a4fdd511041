"""The bad-input matrix through the demo's API (gradio_client), on one app serving the bundled
model: every request gets a clear AppError or a correct result, and the server keeps serving."""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import struct
import urllib.error
import urllib.request
import weakref
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import torch
from conftest import shapeworld_pipeline
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from test_app import start_app
from test_bad_inputs import IMAGE_CASES, halves, make_bomb, make_empty

from vlm.examples import EXAMPLES_DIR, shapeworld_examples
from vlm.presets import SHAPEWORLD_DIR
from vlm.uploads import clean_question


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app-bad-inputs")
    process, url, _ = start_app(tmp, "--shared-index")  # its index on disk, to probe its files
    yield process, Client(url, verbose=False), tmp
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(served):
    return served[1]


@pytest.fixture(scope="module")
def example():
    """A bundled example with one object, and its truth."""
    return next((p, t) for p, t in shapeworld_examples() if " left of " not in t["caption"])


def expect_error(call, *words: str) -> str:
    with pytest.raises(AppError) as error:
        call()
    message = str(error.value)
    assert all(word in message for word in words), message
    assert "Something went wrong" not in message, message  # a clear message, not a crash
    return message


# ----------------------------------------------------------------------------- /caption

# app.py's UploadedImage decodes uploads with vlm.images, so a bad image gets our message,
# not Gradio's generic "The upstream Gradio app has raised an exception …".
BAD_IMAGES = ["truncated-jpeg", "random-bytes-png", "text-as-jpg", "heic"]
GOOD_IMAGES = ["1x1", "cmyk-jpeg", "gray16-png", "palette-transparency-png", "rgba-png",
               "exif6-jpeg", "animated-gif", "webp"]  # fmt: skip


def upload(tmp_path: Path, case: str):
    return handle_file(str(IMAGE_CASES[case][0](tmp_path)))


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_caption_bad_image(client, tmp_path, case):
    words = IMAGE_CASES[case][1]
    expect_error(lambda: client.predict(upload(tmp_path, case), api_name="/caption"), *words)


@pytest.mark.parametrize("case", GOOD_IMAGES)
def test_caption_unusual_image(client, tmp_path, case):
    caption = client.predict(upload(tmp_path, case), api_name="/caption")
    assert caption == shapeworld_pipeline().caption(IMAGE_CASES[case][0](tmp_path))[0]


@pytest.mark.parametrize("make, words", [(make_bomb, "too large"), (make_empty, "empty")])
def test_caption_bomb_and_empty_file(client, tmp_path, make, words):
    path = make(tmp_path)
    expect_error(lambda: client.predict(handle_file(str(path)), api_name="/caption"), words)


@pytest.mark.parametrize("api_name", ["/classify", "/answer"])
def test_bad_image_on_other_endpoints(client, tmp_path, api_name):
    image = upload(tmp_path, "truncated-jpeg")
    call = lambda: client.predict(image, "red circle", "", api_name=api_name)  # noqa: E731
    expect_error(call, "truncated.jpg", "damaged or truncated")


# ----------------------------------------------------------------------------- /classify

LABELS = {
    "empty": (" , ,\n", "no labels given"),
    "too-many": ("\n".join(f"label {i}" for i in range(2001)), "the limit is 2,000"),
    "one": ("red circle", ["red circle"]),
    "duplicates": ("red circle, Red Circle\nred circle, blue star", ["red circle", "blue star"]),
    "quotes-and-commas": ('"red, large circle", say "hi"', ["red, large circle", 'say "hi"']),
    "emoji-rtl-braces": ("🔴 circle, كرة حمراء, עיגול, {} {0}",
                         ["🔴 circle", "كرة حمراء", "עיגול", "{} {0}"]),
    "2000": ("\n".join(f"label {i}" for i in range(2000)), None),
}  # fmt: skip


@pytest.mark.parametrize("case", LABELS)
def test_classify_label_matrix(client, example, case):
    text, expected = LABELS[case]
    call = lambda: client.predict(handle_file(str(example[0])), text, "", api_name="/classify")  # noqa: E731
    if isinstance(expected, str):
        expect_error(call, expected)
        return
    result, _ = call()
    confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
    if expected is None:
        assert len(confidences) == 5 and set(confidences) <= {f"label {i}" for i in range(2000)}
    else:
        assert set(confidences) == set(expected)
        assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-3)
    assert result["label"] == max(confidences, key=confidences.get)


# ----------------------------------------------------------------------------- /answer

QUESTIONS = [
    pytest.param("  \n ", "the question is empty", id="empty"),
    pytest.param("x" * 10_000, "the limit is 500", id="10000-chars"),
    pytest.param("what\x00 color\x1b is\x07 the shape?", None, id="control-chars"),
    pytest.param("what color is it? " * 27, "too long", id="at-the-limit"),
]  # fmt: skip


@pytest.mark.parametrize("question, expected", QUESTIONS)
def test_answer_question_matrix(client, example, question, expected):
    call = lambda: client.predict(handle_file(str(example[0])), question, "", api_name="/answer")  # noqa: E731
    if expected is None:
        answer, _ = call()
        assert answer == shapeworld_pipeline().answer(example[0], [clean_question(question)])[0]
    else:
        expect_error(call, expected)


# ----------------------------------------------------------------------------- /index_add


def png(color=(255, 0, 0), size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return path


def declare_huge(path: Path) -> Path:
    """Rewrite each central-directory entry to claim ~4 GB uncompressed; nothing is inflated."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        struct.pack_into("<I", data, at + 24, 0xFFFFFFF0)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    return path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def halves_png() -> bytes:
    buffer = io.BytesIO()
    halves().save(buffer, "PNG")
    return buffer.getvalue()


ZIPS = {
    "traversal-and-absolute": (
        lambda d: make_zip(d / "evil.zip", {"../../etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
                                            "/etc/passwd": b"root", "../../evil.png": png(),
                                            "good.png": png((0, 200, 0))}),
        1, ["passwd (path traversal)", "passwd (absolute path)", "evil.png (path traversal)"],
    ),
    "non-images-mixed-in": (
        lambda d: make_zip(d / "mixed.zip", {"a.png": png((0, 0, 200)), "readme.txt": b"hi",
                                             "run.sh": b"rm -rf /", "fake.png": b"not a png",
                                             "b.jpg": halves_png()}),
        2, ["readme.txt (not an image)", "run.sh (not an image)", "fake.png", "not an image"],
    ),
    "declares-huge-size": (
        lambda d: declare_huge(make_zip(d / "huge.zip", {"big.png": png((200, 200, 0))})),
        0, ["huge.zip (too large when unpacked"],
    ),
    "ratio-bomb": (
        lambda d: make_zip(d / "bomb.zip", {"zeros.png": b"\x00" * (4 << 20)}),
        0, ["bomb.zip (refused as a possible zip bomb"],
    ),
    "duplicates": (
        lambda d: make_zip(d / "dups.zip", {"one.png": png((9, 9, 9)), "two.png": png((9, 9, 9)),
                                            "again.png": shapeworld_examples()[0][0].read_bytes()}),
        1, ["duplicate of an image already in the index"],
    ),
    "not-a-zip": (
        lambda d: write(d / "photos.zip", b"PK but not a zip"),
        0, ["photos.zip (not a zip archive"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", ZIPS)
def test_index_add_zip_matrix(served, tmp_path, case):
    _, client, app_tmp = served
    make, added, reasons = ZIPS[case]
    _, status = client.predict([handle_file(str(make(tmp_path)))], api_name="/index_add")
    assert status.startswith(f"Added {added} image(s)"), status
    assert all(reason in status for reason in reasons), status
    # nothing escaped the index folder
    assert not [p for p in app_tmp.rglob("*passwd*")]
    assert Path("/etc/passwd").read_bytes() not in (b"root", b"root:x:0:0::/root:/bin/sh\n")
    assert not [p for p in app_tmp.rglob("evil.png")]


def test_index_add_without_files_is_a_clear_error(client):
    expect_error(lambda: client.predict([], api_name="/index_add"), "Drop images or a .zip")


# ----------------------------------------------------------------------------- still serving


def test_after_all_that_the_server_still_captions(served, example):
    process, client, _ = served
    path, truth = example
    assert process.poll() is None
    assert client.predict(handle_file(str(path)), api_name="/caption") == truth["caption"]


# ----------------------------------------------------------------------------- server paths
# The app reads a server path a request names (an image or file given as a string, a model
# folder) only under --allowed-dir, Gradio's upload folder or the bundled examples. Through
# the API Gradio itself accepts only uploads; these call the handlers directly, as any other
# caller of the app's functions would.


@pytest.fixture(scope="module")
def app_module():
    import app

    return app


@pytest.fixture(scope="module")
def folders(tmp_path_factory, example):
    """allowed/ (an image, a link inside, a link out, a model folder) and outside/."""
    root = tmp_path_factory.mktemp("paths")
    allowed, outside = root / "allowed", root / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(example[0], allowed / "sub" / "scene.png")
    shutil.copy(example[0], outside / "secret.png")
    (allowed / "inside-link.png").symlink_to(allowed / "sub" / "scene.png")
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "escape-dir").symlink_to(outside, target_is_directory=True)
    shutil.copytree(SHAPEWORLD_DIR, allowed / "model")
    shutil.copytree(SHAPEWORLD_DIR, outside / "model")
    (allowed / "linked-model").symlink_to(outside / "model", target_is_directory=True)
    return root, allowed, outside


@pytest.fixture(scope="module")
def models(app_module):
    return app_module.Models("shapeworld")


@pytest.fixture(scope="module")
def handlers(app_module, models, folders):
    root, allowed, _ = folders
    return app_module.make_handlers(models, root / "indexes", [allowed])


def refused(call, *words: str) -> str:
    with pytest.raises(gr.Error) as error:
        call()
    message = error.value.message
    assert all(word in message for word in words), message
    return message


def test_a_path_inside_an_allowed_dir_is_read(handlers, folders, example):
    _, allowed, _ = folders
    assert handlers["caption"](str(allowed / "sub" / "scene.png")) == example[1]["caption"]
    assert handlers["caption"](allowed / "inside-link.png") == example[1]["caption"]
    dotted = allowed / "sub" / ".." / "sub" / "scene.png"
    assert handlers["caption"](str(dotted)) == example[1]["caption"]


def test_the_bundled_examples_are_readable_without_a_flag(app_module, models, tmp_path, example):
    handlers = app_module.make_handlers(models, tmp_path / "indexes")
    assert handlers["caption"](str(example[0])) == example[1]["caption"]


OUTSIDE = {
    "absolute-outside": lambda allowed, outside: str(outside / "secret.png"),
    "dot-dot": lambda allowed, outside: f"{allowed}/../outside/secret.png",
    "dot-dot-deep": lambda allowed, outside: f"{allowed}/sub/../../../../../../etc/passwd",
    "symlink-out": lambda allowed, outside: str(allowed / "escape.png"),
    "symlinked-dir-out": lambda allowed, outside: str(allowed / "escape-dir" / "secret.png"),
    "etc-passwd": lambda allowed, outside: "/etc/passwd",
    "relative": lambda allowed, outside: "secret.png",
    "home": lambda allowed, outside: "~/.bashrc",
    "nul-byte": lambda allowed, outside: f"{allowed}/sub/scene.png\x00.txt",
    "allowed-dir-prefix": lambda allowed, outside: f"{allowed}-evil/x.png",
}


@pytest.mark.parametrize("case", OUTSIDE)
def test_a_path_outside_the_allowed_dirs_is_refused(handlers, folders, case):
    _, allowed, outside = folders
    path = OUTSIDE[case](allowed, outside)
    message = refused(lambda: handlers["caption"](path), "does not read", "--allowed-dir")
    assert str(outside) not in message.replace(path, "")  # says nothing about the target


@pytest.mark.parametrize("name", ["classify", "answer", "explain", "search", "few_shot"])
def test_every_image_input_checks_paths(handlers, folders, name):
    _, _, outside = folders
    secret = str(outside / "secret.png")
    calls = {
        "classify": lambda: handlers["classify"](secret, "red circle"),
        "answer": lambda: handlers["answer"](secret, "what color is it?"),
        "explain": lambda: handlers["explain"](secret, "a circle"),
        "search": lambda: handlers["search"]("", secret),
        "few_shot": lambda: handlers["few_shot"](
            secret, "Caption: x", None, "", None, "", secret, "Caption:"
        ),  # fmt: skip
    }
    refused(calls[name], "does not read", "--allowed-dir")


def test_file_lists_check_every_path(handlers, folders):
    root, allowed, outside = folders
    inside, secret = str(allowed / "sub" / "scene.png"), str(outside / "secret.png")
    refused(lambda: handlers["caption_files"]([inside, secret]), "does not read")
    refused(lambda: handlers["index_add"]([secret], progress=lambda *a, **k: None),
            "does not read")  # fmt: skip
    assert not list((root / "indexes").rglob("secret.png"))  # nothing was copied in


def test_too_many_files_at_once_are_refused(handlers, folders):
    _, allowed, _ = folders
    many = [str(allowed / "sub" / "scene.png")] * (handlers["service"].limits.max_upload_files + 1)
    refused(lambda: handlers["caption_files"](many), "At most 500 images at once")
    refused(lambda: handlers["index_add"](many, progress=lambda *a, **k: None),
            "At most 500 files at once")  # fmt: skip


def test_a_text_query_that_looks_like_a_path_is_text(handlers):
    for query in ["/etc/passwd", "../../etc/passwd", "~/.ssh/id_rsa"]:
        hits = handlers["search"](query, None, 3)
        assert len(hits) == 3 and all("passwd" not in str(item) for item, _ in hits)


@pytest.mark.parametrize(
    "name, words",
    [
        ("outside-model", ["is not offered here", "--allowed-dir"]),
        ("linked-model", ["is not offered here"]),
        ("openai/clip-vit-base-patch32", ["is not offered here", "shapeworld"]),
        ("..", ["is not offered here"]),
        ("/etc", ["is not offered here"]),
    ],
)
def test_a_model_outside_the_allowed_dirs_is_refused(handlers, folders, example, name, words):
    _, allowed, outside = folders
    model = {"outside-model": str(outside / "model"),
             "linked-model": str(allowed / "linked-model")}.get(name, name)  # fmt: skip
    refused(lambda: handlers["caption"](str(example[0]), model=model), *words)


def test_a_model_folder_inside_an_allowed_dir_loads(handlers, folders, example):
    _, allowed, _ = folders
    caption = handlers["caption"](str(example[0]), model=str(allowed / "model"))
    assert caption == example[1]["caption"]


def test_allowed_dirs_from_flags_and_environment(app_module, monkeypatch):
    monkeypatch.setenv("VLM_ALLOWED_DIRS", os.pathsep.join(["/data/a", "", "/data/b"]))
    assert app_module.parse_settings([]).allowed_dirs == [Path("/data/a"), Path("/data/b")]
    flags = ["--allowed-dir", "/x", "--allowed-dir", "/y"]
    assert app_module.parse_settings(flags).allowed_dirs == [Path("/x"), Path("/y")]
    monkeypatch.delenv("VLM_ALLOWED_DIRS")
    assert app_module.parse_settings([]).allowed_dirs == []


def test_gradio_serves_only_the_examples_and_the_index_images(app_module, tmp_path):
    indexes = app_module.Indexes(tmp_path)
    paths = app_module.served_paths(tmp_path, ["shapeworld", "../evil"], indexes)
    assert paths == [str(EXAMPLES_DIR), str(tmp_path / "shapeworld" / "images"),
                     str(tmp_path / "__evil" / "images"),
                     str(indexes.private_root())]  # fmt: skip
    assert not list(indexes.private_root().iterdir())  # the private galleries' root, empty


def test_through_the_api_a_server_path_is_refused(served):
    process, client, _ = served
    url = client.src.rstrip("/") + "/gradio_api/call/caption"
    payload = {"data": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}]}
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    stream = urllib.request.urlopen(f"{url}/{event}", timeout=60).read().decode()
    assert "event: error" in stream and "root:" not in stream, stream
    assert process.poll() is None


def test_through_the_api_an_unknown_model_is_refused(client, example):
    expect_error(lambda: client.predict(handle_file(str(example[0])), "greedy", 3, 0.9, 1.0, 30,
                                        "/etc", api_name="/caption"),  # fmt: skip
                 "Model '/etc' is not offered here")  # fmt: skip


def test_the_index_files_are_not_downloadable(served):
    _, client, app_tmp = served
    client.predict("a small red circle", None, 3, api_name="/search")  # builds the index
    manifest = next(app_tmp.rglob("manifest.json"))
    example = next(EXAMPLES_DIR.rglob("*.png"))
    base = client.src.rstrip("/") + "/gradio_api/file="
    assert urllib.request.urlopen(base + str(example), timeout=30).status == 200
    for path in [manifest, Path("/etc/passwd")]:
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(base + str(path), timeout=30)
        assert error.value.code == 403


# ----------------------------------------------------------------------------- out of memory

OOM_CALLS = {  # handler call, the Pipeline method it reaches
    "caption": (lambda h, p: h["caption"](p), "stream_caption"),
    "classify": (lambda h, p: h["classify"](p, "red circle, blue star"), "classify"),
    "answer": (lambda h, p: h["answer"](p, "what color is it?"), "stream_answer"),
    "explain": (lambda h, p: h["explain"](p, "a circle"), "explain"),
    "few_shot": (lambda h, p: h["few_shot"](p, "Caption: a", None, "", None, "", p, "Caption:"),
                 "stream_continue"),
}  # fmt: skip


def plain(result):
    """A handler's result in a form that compares by value (images as pixels, tables as dicts)."""
    if isinstance(result, tuple):
        return tuple(plain(r) for r in result)
    if isinstance(result, Image.Image):
        return result.tobytes()
    return result.to_dict() if hasattr(result, "to_dict") else result


@pytest.mark.parametrize("name", OOM_CALLS)
def test_out_of_memory_frees_memory_and_keeps_serving(handlers, models, example, monkeypatch,
                                                      app_module, name):  # fmt: skip
    call, method = OOM_CALLS[name]
    pipeline, path = models.get(None), str(example[0])
    events, held = [], []

    def out_of_memory(*args, **kwargs):
        workspace = torch.ones(1024, 1024)  # what the failed call held when it ran out
        held.append(weakref.ref(workspace))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def collect(*args):
        events.append("gc.collect")
        return real_collect(*args)

    def empty_cache():
        events.append("empty_cache")
        events.append("freed" if held[0]() is None else "still held")

    real_collect = gc.collect
    monkeypatch.setattr(pipeline, method, out_of_memory)
    monkeypatch.setattr(gc, "collect", collect)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    refused(lambda: call(handlers, path), "The GPU ran out of memory", "fewer or smaller")
    assert events == ["gc.collect", "empty_cache", "freed"]

    monkeypatch.undo()  # the memory is back: the next request on the same handler works
    fresh = app_module.make_handlers(models, Path(path).parent)  # handlers that never ran out
    assert plain(call(handlers, path)) == plain(call(fresh, path))
    assert handlers["caption"](path) == example[1]["caption"]
