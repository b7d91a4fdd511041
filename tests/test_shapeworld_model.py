"""The shipped ShapeWorld bundle: a regression test of learned behaviour on fresh scenes."""

from __future__ import annotations

import pytest

from vlm import Pipeline
from vlm.evaluate import evaluate_shapeworld
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
