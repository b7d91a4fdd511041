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


# ---------------------------------------------------------------------------- honest outputs


def _examples_by_caption() -> dict[str, str]:
    from vlm.examples import shapeworld_examples

    return {entry["caption"]: str(path) for path, entry in shapeworld_examples()}


def test_the_models_own_label_sets_come_first_and_the_others_say_they_are_outside(trained):
    from vlm.serve import OUTSIDE, label_sets

    sets = label_sets(shapeworld_pipeline())
    own = [s for s in sets if not s.name.startswith(OUTSIDE)]
    assert [s.name for s in sets[: len(own)]] == list(shapeworld_pipeline().config.label_sets)
    assert all(s.templates == ["a small {}", "a large {}"] for s in own)
    imagenet = next(s for s in sets if "ImageNet" in s.name)
    assert imagenet.name.startswith(OUTSIDE) and len(imagenet.labels) == 1000
    assert "a photo of the small {}." in imagenet.templates  # open_clip's, not the model's
    assert len(imagenet.labels) * len(imagenet.templates) <= 20_000  # within the text limit
    general = label_sets(trained)  # a model that names no world of its own
    assert general[0].name == "ImageNet (1,000 classes)"


def test_a_text_search_scores_as_a_share_of_true_matches_and_says_no_good_match(service):
    examples = _examples_by_caption()
    caption = next(c for c in examples if " left of " not in c)
    (best, score), *_ = service.search(caption, None, 3)
    assert best.item == examples[caption] and score.startswith("match ")
    assert all(s.startswith("no good match") for _, s in service.search("a cat", None, 5))
    assert "true matches" in service.search_plan(caption, None)


def test_text_and_image_together_are_weighted_and_the_page_says_so(service):
    examples = _examples_by_caption()
    caption, other = list(examples)[0], list(examples)[5]
    image_only = [h.item for h, _ in service.search("", examples[other], 4)]
    text_only = [h.item for h, _ in service.search(caption, None, 4)]
    both = service.search(caption, examples[other], 4, text_weight=1.0)
    assert [h.item for h, _ in both] == text_only and both[0][1].startswith("cosine")
    assert [h.item for h, _ in service.search(caption, examples[other], 4, text_weight=0.0)] == (
        image_only
    )
    middle = [h.item for h, _ in service.search(caption, examples[other], 4, text_weight=0.5)]
    assert {examples[caption], examples[other]} <= set(middle[:2])  # both queries' own images
    assert "together" in service.search_plan(caption, examples[other], 0.3)
    assert "30% text, 70% image" in service.search_plan(caption, examples[other], 0.3)
    with pytest.raises(ValueError, match="Text weight must be between 0 and 1"):
        service.search(caption, examples[other], 4, text_weight=2)


def test_search_shows_the_name_an_image_was_added_under():
    from vlm.search import original_name

    assert original_name("/x/images/0123456789abcdef-my cat.png") == "my cat.png"
    assert original_name("/x/sw-01-a-red-star.png") == "sw-01-a-red-star.png"


def test_the_few_shot_prompt_is_the_models_own_caption_prompt(service, saved_pipeline, tmp_path):
    """The bundle writes a caption after "Caption:"; a model saved with none (as ClipCap and
    BLIP-2 are) gets an empty prompt, not the bundle's."""
    import json
    import shutil

    assert service.caption_prompt() == "Caption:"
    folder = tmp_path / "no-prompt"
    shutil.copytree(saved_pipeline, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "caption_prompt": ""}))
    other = Service(Models(str(folder)), tmp_path / "indexes", None)
    assert other.caption_prompt() == ""
