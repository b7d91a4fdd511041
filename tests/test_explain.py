"""Explain: the map (vlm.explain) keeps or covers the right cells, points at the object a text
names on the bundled ShapeWorld model (where the truth is known; floors are measured, not
hoped for), and runs on the real open_clip towers (ViT and ResNet) with random weights."""

from __future__ import annotations

import dataclasses
import random
from functools import partial

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.encoder import Encoder
from vlm.explain import background_colour, grid_size, occlusion_map, windowed


def test_windowed_covers_the_window_around_each_cell_or_all_but_it():
    pixels = torch.zeros(3, 8, 8)
    pixels[:, 2:7, 2:7] = 5.0  # an "object" inside a background of 0
    covered_copies = windowed(pixels, grid=4, window=3, keep=False)  # cells of 2×2 pixels
    kept_copies = windowed(pixels, grid=4, window=3)
    assert covered_copies.shape == kept_copies.shape == (16, 3, 8, 8)
    assert torch.equal(background_colour(pixels), torch.zeros(3))
    # cell (1, 1)'s window is rows and columns 0..5 (cells 0, 1, 2): covered, the object's
    # top-left is gone and its row and column 6 are left; kept, it is the other way round
    covered, kept = covered_copies[1 * 4 + 1], kept_copies[1 * 4 + 1]
    assert covered[:, 0:6, 0:6].eq(0).all() and kept[:, 0:6, 0:6].equal(pixels[:, 0:6, 0:6])
    assert covered[:, 6, 2:7].eq(5).all() and covered[:, 2:7, 6].eq(5).all()
    assert kept[:, 6:].eq(0).all() and kept[:, :, 6:].eq(0).all()
    # a corner cell's window is clipped at the image's edge
    corner_covered, corner_kept = covered_copies[0], kept_copies[0]
    assert corner_covered[:, 0:4, 0:4].eq(0).all() and corner_covered[:, 4:7, 4:7].eq(5).all()
    assert corner_kept[:, 2:4, 2:4].eq(5).all()
    assert corner_kept[:, 4:].eq(0).all() and corner_kept[:, :, 4:].eq(0).all()
    assert pixels[:, 2:7, 2:7].eq(5).all()  # the input is untouched


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline.from_pretrained("shapeworld", device="cpu")


def patch_cosine(encoder: Encoder, image, text: str) -> np.ndarray:
    """The first map the demo showed: the cosine of each ViT patch token (projected into the
    joint space) with the text's embedding, as a [grid, grid] array."""
    with torch.inference_mode():
        _, tokens = encoder.pooled_and_patches(encoder.pixels([image]).to(encoder.device))
        similarity = F.normalize(tokens[0], dim=-1) @ encoder.encode_text([text])[0]
    grid = int(round(similarity.numel() ** 0.5))
    return similarity.reshape(grid, grid).cpu().numpy()


def _peak_object(grid: np.ndarray, scene: sw.Scene) -> int:
    side = grid.shape[0]
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    y, x = (row + 0.5) / side, (col + 0.5) / side
    return int(np.argmin([np.hypot(o.x - x, o.y - y) for o in scene.objects]))


def _colour_hits(explain, scenes) -> float:
    hits = []
    for scene in scenes:
        image = sw.render(scene, 128)
        for i, obj in enumerate(scene.objects):
            if sum(o.color == obj.color for o in scene.objects) == 1:
                hits.append(_peak_object(explain(image, f"something {obj.color}"), scene) == i)
    return float(np.mean(hits))


def test_the_map_peaks_on_the_object_whose_colour_the_text_names(pipeline):
    """Two- and three-object scenes from a seed no experiment used; chance is about 0.4.
    The bundle's map hits about 0.95 (docs/explain.md); the patch cosine shown first 0.5."""
    rng = random.Random(4242)
    scenes = [sw.sample_scene(rng, rng.choice([2, 3]), split="any") for _ in range(16)]
    now = _colour_hits(pipeline.explain, scenes)
    before = _colour_hits(partial(patch_cosine, pipeline.encoder), scenes)
    assert now >= 0.7
    assert now >= before + 0.15


def test_the_map_points_at_the_object_every_kind_of_text_names(pipeline):
    """Every kind of text (colour and shape, shape alone, colour alone) on scenes of two or
    three objects from a seed no experiment used: the map peaks on the named object far more
    often than the patch cosine shown first (docs/explain.md: 94.4% against 43.2% on 60 scenes;
    the covering map reads 94.6% with this encoder, 77.7% with the one before), and a shape
    named alone ("the star") is found too."""
    from vlm.shapeworld.evaluation import peak_hits

    rng = random.Random(4243)
    scenes = [sw.sample_scene(rng, rng.choice([2, 3]), split="any") for _ in range(20)]
    images = [sw.render(scene, 128) for scene in scenes]
    now = peak_hits(pipeline.explain, images, scenes)
    before = peak_hits(partial(patch_cosine, pipeline.encoder), images, scenes)
    print("kept windows", now, "patch cosine", before)
    assert now["all"] >= 0.85 and now["all"] >= before["all"] + 0.25
    assert now["shape"] >= 0.7


@pytest.mark.parametrize(
    "model_cfg",
    [
        None,  # ViT-B-32, as the clipcap presets build it
        dict(  # a small ResNet tower (open_clip's ModifiedResNet, as RN50x4 uses)
            embed_dim=32,
            vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
        ),
    ],
)
def test_real_towers_give_a_deterministic_map_of_their_grid(model_cfg):
    torch.manual_seed(0)
    if model_cfg is None:
        encoder = Encoder.load({"model": "ViT-B-32-quickgelu"})
        side = 7
    else:
        model = open_clip.CLIP(**model_cfg, output_dict=True)
        preprocess = open_clip.image_transform(64, False)
        tokenizer = open_clip.SimpleTokenizer(context_length=16)
        encoder = Encoder(model, preprocess, tokenizer, {"model": "rn"})
        side = 7
    assert grid_size(encoder) == side
    image = sw.render(sw.sample_scene(random.Random(1), 2), 96)
    first = occlusion_map(encoder, image, "a red circle")
    again = occlusion_map(encoder, image, "a red circle")
    assert first.shape == (side, side) and np.isfinite(first).all()
    assert np.array_equal(first, again)
    assert first.std() > 0  # different windows match the text differently


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
    map's highest cell lies on the object (100% on these 40 scenes; the patch-text cosine shown
    before: 80%). The object covers 17% of the cells, so a map turned or mirrored scores about
    that (transposed: 50%)."""
    rng = random.Random(2024)
    hits, area = [], []
    for _ in range(40):
        obj = dataclasses.replace(sw.sample_scene(rng, 1).objects[0], size="large")
        heatmap = pipeline.explain(sw.render(sw.Scene((obj,))), obj.phrase)
        cells = object_cells(obj, heatmap.shape[0])
        hits.append(bool(cells[peak(heatmap)]))
        area.append(cells.mean())
    print(f"one object: peak on it {np.mean(hits):.2f}, chance {np.mean(area):.2f}")
    assert np.mean(hits) >= 0.9 > 3 * np.mean(area)


def test_two_objects_the_named_one_gets_the_peak_more_often(pipeline):
    """Two objects of different colours and shapes; the text names one of them (alternately
    the left and the right one). The peak lies on the named object far more often than on
    the other (98% vs 0% on these 50 scenes; the covering map shipped before: 72% vs 2%; the
    patch-text cosine before it: 54% vs 16%); a map that does not depend on the text puts it
    on each about equally often (56% vs 44%)."""
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
    assert named_rate >= 0.85 and named_rate >= 5 * other_rate


def test_the_overlay_rings_the_peak_cell():
    from PIL import Image

    from vlm.visualize import overlay_heatmap, peak_centre

    grid = np.zeros((4, 4))
    grid[1, 2] = 1.0  # the peak: x in [64, 96), y in [32, 64) of a 128-pixel image
    assert peak_centre(grid, (128, 128)) == (80.0, 48.0)
    image = Image.new("RGB", (128, 128), (0, 0, 0))
    marked = np.asarray(overlay_heatmap(image, grid))
    plain = np.asarray(overlay_heatmap(image, grid, mark_peak=False))
    changed = np.argwhere((marked != plain).any(-1))
    assert len(changed) > 50  # a ring, around the peak's centre and nowhere else
    distances = np.hypot(changed[:, 1] - 80, changed[:, 0] - 48)
    assert distances.min() > 10 and distances.max() < 20
    flat = overlay_heatmap(image, np.zeros((4, 4)))  # no peak, no ring
    assert np.array_equal(
        np.asarray(flat), np.asarray(overlay_heatmap(image, np.zeros((4, 4)), mark_peak=False))
    )
