"""The shipped ShapeWorld bundle: a regression test of learned behaviour on fresh scenes."""

from __future__ import annotations

import random

import pytest

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.evaluate import evaluate_shapeworld, one_change_captions
from vlm.presets import SHAPEWORLD_DIR

# Several points under what the shipped bundle measures on 1,000 scenes (README: caption
# exact 40%, zero-shot 99% / held-out 86%, VQA 68%, R@5 100%), since 100 scenes are a noisy
# sample. Caption and VQA are below the project's targets (90%, 85%): see the README.
FLOORS = {
    "caption_exact": 0.28,
    "zeroshot_train": 0.92,
    "zeroshot_held_out": 0.72,
    "vqa_overall": 0.55,
    "retrieval_r5": 0.92,
    # the encoder prefers a scene's caption to every one-object change of it (README: shape
    # 46%, size 99%, colour 99% on scenes of two or three objects)
    "binding_shape": 0.25,
    "binding_size": 0.88,
    "binding_color": 0.88,
}


@pytest.fixture(scope="module")
def results():
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    return evaluate_shapeworld(pipeline, n=100, seed=777, perturbations=("clean", "jpeg50"))


def test_bundle_is_small_and_fp16():
    size = sum(p.stat().st_size for p in SHAPEWORLD_DIR.rglob("*") if p.is_file())
    assert size < 50_000_000


@pytest.mark.parametrize("measure", sorted(FLOORS))
def test_bundle_clears_its_floor_on_fresh_scenes(results, measure):
    assert results[measure]["clean"] >= FLOORS[measure], results


@pytest.mark.parametrize("measure", sorted(FLOORS))
def test_jpeg_costs_little(results, measure):
    assert results[measure]["jpeg50"] >= results[measure]["clean"] - 0.10, results


def test_one_change_captions_change_exactly_one_attribute():
    scene = sw.sample_scene(random.Random(4), 3)
    true = sw.describe(scene)
    for field, n_values in (("shape", 5), ("size", 2), ("color", 7)):
        captions = one_change_captions(scene, field)
        assert len(captions) == len(set(captions)) == 3 * (n_values - 1)
        for caption in captions:
            changed = [a != b for a, b in zip(caption.split(), true.split(), strict=True)]
            assert sum(changed) == 1, (caption, true)
