"""vlm.serve without any UI: what a server does for a request (the checks before the model
runs, the model's index opened or created) is reachable from plain Python."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shapeworld_pipeline

from vlm.examples import EXAMPLES_DIR, all_example_images
from vlm.inputs import PathGuard
from vlm.search import MANIFEST
from vlm.serve import Models, RequestError, Service, open_index

ROOT = Path(__file__).resolve().parent.parent
IMAGE = str(all_example_images()[0])


def test_serving_imports_no_ui():
    code = "import sys, vlm.serve; print(sorted(m for m in sys.modules if m.startswith('gradio')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                            capture_output=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_open_index_builds_a_new_one_then_opens_the_saved_one(tmp_path):
    pipeline, folder = shapeworld_pipeline(), tmp_path / "index"
    images = all_example_images()[:3]
    new = open_index(folder, pipeline, images)
    assert new.items == [str(p) for p in images] and not (folder / MANIFEST).exists()
    new.save(folder)
    again = open_index(folder, pipeline, all_example_images())  # saved: `images` is not used
    assert again.items == new.items
    assert [h.item for h in again.search("a red square", k=3)] == [
        h.item for h in new.search("a red square", k=3)
    ]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    guard = PathGuard([EXAMPLES_DIR])
    return Service(Models("shapeworld"), tmp_path_factory.mktemp("indexes"), guard)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.caption(None), "Please give an image"),
        (lambda s: s.caption(IMAGE, ("greedy", 3, 0.9, 1.0, 0)), "Max length must be between"),
        (lambda s: s.search(), "Type a text query or give a query image"),
        (lambda s: s.explain(IMAGE, " "), "Type a label or a phrase"),
        (lambda s: s.few_shot([(None, "Caption: x")], None), "needs both an image and its text"),
        (lambda s: s.index_add([]), "Drop images or a .zip"),
        (lambda s: s.caption(IMAGE, model="openai/clip-vit-base-patch32"), "is not offered"),
    ],
)
def test_a_bad_request_is_refused_before_the_model_runs(service, monkeypatch, call, message):
    pipeline = service.models.get(None)
    for method in ("stream_caption", "explain", "stream_continue", "build_index"):
        monkeypatch.setattr(pipeline, method, lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=message) as error:
        call(service)
    assert isinstance(error.value, RequestError) or "Max length" in message
