"""Refactors keep behaviour: the bundle on 200 fixed scenes does what it did when
tests/golden/bundle_200.json was written (by tests/golden/make_bundle_golden.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vlm import Pipeline
from vlm.presets import SHAPEWORLD_DIR

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def now_and_then():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_bundle_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    then = json.loads((GOLDEN / "bundle_200.json").read_text())
    return module.behaviour(Pipeline.from_pretrained(SHAPEWORLD_DIR, device="cpu")), then


@pytest.mark.parametrize(
    "output", ["captions", "beam_captions", "questions", "answers", "few_shot"]
)
def test_the_bundle_writes_what_it_wrote(now_and_then, output):
    now, then = now_and_then
    pairs = enumerate(zip(now[output], then[output], strict=True))
    changed = [(i, a, b) for i, (a, b) in pairs if a != b]
    assert not changed, changed[:5]


def test_the_bundle_scores_what_it_scored(now_and_then):
    now, then = now_and_then
    for output, tolerance in (("zero_shot", 2e-3), ("caption_word_confidence", 2e-3)):
        for row_now, row_then in zip(now[output], then[output], strict=True):
            if isinstance(row_then, dict):
                assert list(row_now) == list(row_then)
                row_now, row_then = list(row_now.values()), list(row_then.values())
            assert row_now == pytest.approx(row_then, abs=tolerance)
