"""`Pipeline.explain` on the bundled ShapeWorld model, where the truth is known: the patch–text
map must be highest on the object the text names. Floors are measured, not hoped for (the
method is coarse: an 8×8 map from a 64-pixel ViT); an improved method should raise them."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from vlm import Pipeline
from vlm import shapeworld as sw


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline.from_pretrained("shapeworld", device="cpu")


def object_cells(obj: sw.Obj, grid: int) -> np.ndarray:
    """The map cells whose centre lies within the object's bounding circle (plus half a cell)."""
    ys, xs = np.mgrid[0:grid, 0:grid]
    distance = np.hypot((xs + 0.5) / grid - obj.x, (ys + 0.5) / grid - obj.y)
    return distance <= obj.radius * sw.BOUND + 0.5 / grid


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    return np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)


def test_the_map_has_the_grid_of_the_vit(pipeline):
    scene = sw.sample_scene(random.Random(0), 1)
    heatmap = pipeline.explain(sw.render(scene), scene.objects[0].phrase)
    assert heatmap.shape == (8, 8) and np.isfinite(heatmap).all()  # 64 px, 8 px patches


def test_one_object_the_peak_lies_on_the_object(pipeline):
    """One large object and its phrase ("a large red circle"), as the app's examples ask: the
    map's highest cell lies on the object (80% on these 40 scenes, 87% on 100). The object
    covers 17% of the cells, so a map turned or mirrored scores about that (transposed: 50%).
    Small objects (1-2 patches) are beyond this method: 6% (chance 8%), not tested."""
    rng = random.Random(2024)
    hits, area = [], []
    for _ in range(40):
        obj = dataclasses.replace(sw.sample_scene(rng, 1).objects[0], size="large")
        heatmap = pipeline.explain(sw.render(sw.Scene((obj,))), obj.phrase)
        cells = object_cells(obj, heatmap.shape[0])
        hits.append(bool(cells[peak(heatmap)]))
        area.append(cells.mean())
    print(f"one object: peak on it {np.mean(hits):.2f}, chance {np.mean(area):.2f}")
    assert np.mean(hits) >= 0.7 > 3 * np.mean(area)


def test_two_objects_the_named_one_gets_the_peak_more_often(pipeline):
    """Two objects of different colours and shapes; the text names one of them (alternately
    the left and the right one). The peak lies on the named object far more often than on
    the other (54% vs 16% on these 50 scenes, 48% vs 19% on 100); a map that does not
    depend on the text puts it on each about equally often (56% vs 44%)."""
    rng = random.Random(7)
    on_named, on_other = [], []
    while len(on_named) < 50:
        scene = sw.sample_scene(rng, 2)
        a, b = scene.objects
        if a.color == b.color or a.shape == b.shape:
            continue
        named, other = (a, b) if len(on_named) % 2 else (b, a)
        heatmap = pipeline.explain(sw.render(scene), named.phrase)
        where = peak(heatmap)
        on_named.append(bool(object_cells(named, heatmap.shape[0])[where]))
        on_other.append(bool(object_cells(other, heatmap.shape[0])[where]))
    named_rate, other_rate = np.mean(on_named), np.mean(on_other)
    print(f"two objects: peak on the named one {named_rate:.2f}, on the other {other_rate:.2f}")
    assert named_rate >= 0.35 and named_rate >= 2 * other_rate
