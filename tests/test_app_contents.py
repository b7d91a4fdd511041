"""What the served endpoints answer, not only its form: /explain's overlay is hot on the object
its text names (as the library's map is), and the few-shot endpoints continue a 2-shot list of
ShapeWorld scenes with the query's own value, where the bundled model gets it right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shapeworld_pipeline
from gradio_client import Client, handle_file
from PIL import Image
from test_app import serve

SIDE = 128
ALPHA = 0.55  # the overlay's share of the heatmap (vlm.visualize.overlay_heatmap's default)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("contents"))


@pytest.fixture(scope="module")
def client(app):
    return Client(app, verbose=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """name -> (scene, its PNG): two large objects far apart, and four one-object scenes."""
    from vlm import shapeworld as sw

    folder = tmp_path_factory.mktemp("scenes")
    made = {
        "two": sw.Scene((sw.Obj("circle", "red", "large", 0.22, 0.3),
                         sw.Obj("star", "blue", "large", 0.78, 0.7))),
        "purple circle": sw.Scene((sw.Obj("circle", "purple", "small", 0.5, 0.5),)),
        "white star": sw.Scene((sw.Obj("star", "white", "large", 0.5, 0.5),)),
        "orange square": sw.Scene((sw.Obj("square", "orange", "large", 0.5, 0.5),)),
    }  # fmt: skip
    paths = {}
    for name, scene in made.items():
        paths[name] = folder / f"{name.replace(' ', '-')}.png"
        sw.render(scene, SIDE).save(paths[name])
    return {name: (made[name], paths[name]) for name in made}


def disk(obj, shape) -> np.ndarray:
    """The pixels within the object's outer radius."""
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(xs - obj.x * shape[1], ys - obj.y * shape[0]) <= obj.radius * shape[0]


def heat(overlay: Image.Image, original: Image.Image) -> np.ndarray:
    """How hot the overlay's heatmap is at each pixel: the heatmap's colour recovered from the
    blend, read by its red channel (the colour ramp's cold half, dark blue to green, is low in
    red; its hot half, yellow to red, high)."""
    blended = np.asarray(overlay.convert("RGB"), dtype=np.float32)
    picture = np.asarray(original.convert("RGB"), dtype=np.float32)
    return ((blended - (1 - ALPHA) * picture) / ALPHA)[..., 0]


def test_explain_is_hot_on_the_named_object_and_moves_with_the_text(client, scenes):
    scene, path = scenes["two"]
    original = Image.open(path)
    bundle = shapeworld_pipeline()
    for named, other in (scene.objects, scene.objects[::-1]):
        grid = bundle.explain(original, named.phrase)  # the library's map: the same story
        row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
        assert disk(named, grid.shape)[row, col] and not disk(other, grid.shape)[row, col]
        result = client.predict(handle_file(str(path)), named.phrase, api_name="/explain")
        overlay = Image.open(result)
        assert overlay.size == original.size
        hot = heat(overlay, original)
        on_named, on_other = hot[disk(named, hot.shape)].mean(), hot[disk(other, hot.shape)].mean()
        assert on_named > 150 and on_other < 100, (named.phrase, on_named, on_other)


# 2-shot lists of one attribute ("Shape: star\n" …), the query's value in neither example
LISTS = {"Shape": "shape", "Colour": "color"}


def few_shot_row(scenes, key: str) -> tuple[list, str]:
    """(the /few_shot inputs of a 2-shot `key` list, the query's value)."""
    from vlm import shapeworld as sw

    row = []
    for name in ("purple circle", "white star"):
        scene, path = scenes[name]
        row += [handle_file(str(path)), f"{key}: {sw.attribute(scene, LISTS[key])}"]
    query, path = scenes["orange square"]
    return [*row, None, "", handle_file(str(path)), f"{key}:"], sw.attribute(query, LISTS[key])


def library_continuation(scenes, key: str, describe: bool) -> str:
    from vlm import shapeworld as sw

    parts = []
    for name in ("purple circle", "white star"):
        scene, path = scenes[name]
        parts += [Image.open(path), f"{key}: {sw.attribute(scene, LISTS[key])}\n"]
    parts += [Image.open(scenes["orange square"][1]), f"{key}:"]
    return shapeworld_pipeline().continue_sequence(parts, max_new_tokens=12, describe=describe)


@pytest.mark.parametrize("key", LISTS)
def test_few_shot_endpoints_continue_with_the_querys_value(client, scenes, key):
    row, value = few_shot_row(scenes, key)
    assert value not in {"circle", "star", "purple", "white"}  # not copied from an example
    described = library_continuation(scenes, key, describe=True)
    assert described == value  # the bundle gets it right (the page's default: described)
    assert client.predict(*row, 12, api_name="/few_shot") == described
    text, words = client.predict(*row, 12, "shapeworld", True, api_name="/few_shot_words")
    shaded = [(w["token"], w["class_or_confidence"]) for w in words if w["token"].strip()]
    assert text == described and [w for w, _ in shaded] == [value]
    assert 0 < shaded[0][1] <= 1  # with how sure the model is of it


def test_few_shot_words_without_describing_is_the_bare_list(client, scenes):
    """Unticked, the list is read bare: the library's bare continuation, which for a shape
    list is wrong on this query (the describing is what the page's default adds)."""
    row, value = few_shot_row(scenes, "Shape")
    bare = library_continuation(scenes, "Shape", describe=False)
    assert bare != value
    text, _ = client.predict(*row, 12, "shapeworld", False, api_name="/few_shot_words")
    assert text == bare


def test_the_scenes_are_what_they_say(scenes):
    """The bundle captions each test scene correctly: the lists above are about these."""
    bundle = shapeworld_pipeline()
    captions = bundle.caption([Image.open(p) for _, p in scenes.values()])
    assert captions == [
        "a large red circle left of a large blue star", "a small purple circle",
        "a large white star", "a large orange square",
    ]  # fmt: skip
    assert all(Path(p).is_file() for _, p in scenes.values())
