"""Calibration: the numbers fitted, what they do, and that they travel with a model."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.calibration import (
    END,
    VIEWS,
    Alternative,
    Calibration,
    CalibrationExample,
    Platt,
    WordReading,
    combined,
    expected_calibration_error,
    fit_calibration,
    fit_experts,
    right_words,
)
from vlm.reading import VIEW_OFFSETS, VIEW_SHIFT, shifted_views
from vlm.shapeworld.recipe import ShapeWorld


@pytest.fixture(scope="module")
def bundle():
    return Pipeline.from_pretrained("shapeworld", device="cpu")


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random("test-calibration")
    return [sw.sample_scene(rng, split="held_out") for _ in range(24)]


def test_platt_learns_an_overconfident_lm_and_never_sharpens():
    rng = np.random.default_rng(0)
    shown = rng.uniform(0.5, 1.0, 4000)
    right = rng.uniform(size=4000) < 0.5 + (shown - 0.5) / 2  # right half as often as shown
    platt = Platt.fit(shown, right)
    fixed = [platt(p) for p in shown]
    assert platt.slope < 0.9
    assert expected_calibration_error(fixed, right) < expected_calibration_error(shown, right) / 3
    # an underconfident LM (always right) would want a slope above 1: held at 1
    sure = Platt.fit(rng.uniform(0.6, 0.99, 500), np.ones(500, bool))
    assert sure.slope == 1.0 and sure(0.7) >= 0.7
    assert Platt()(0.37) == pytest.approx(0.37)


def test_the_experts_vote_and_the_encoder_weight_is_fitted():
    reading = WordReading(
        "star", 0.8, (Alternative("star", 0.8, 0.1), Alternative("cross", 0.2, 0.9))
    )
    assert combined(reading, (1.0, 0.0)) == pytest.approx(0.8)  # the LM alone
    both = 0.8 * 0.1 / (0.8 * 0.1 + 0.2 * 0.9)
    assert combined(reading, (1.0, 1.0)) == pytest.approx(both)
    assert combined(WordReading("a", 0.99), (1.0, 3.0)) == 0.99  # no alternatives: the LM's
    # readings where the encoder agrees with the reference more often than the LM does
    rng = random.Random(0)
    readings = []
    for _ in range(300):
        lm = rng.uniform(0.3, 0.95)
        seen = rng.uniform(0.6, 0.99) if rng.random() < 0.9 else rng.uniform(0.01, 0.4)
        readings.append(WordReading("w", lm, (Alternative("w", lm, seen),
                                              Alternative("v", 1 - lm, 1 - seen))))  # fmt: skip
    a, b = fit_experts(readings)
    assert a == 1.0 and 0.3 < b < 10
    assert fit_experts([WordReading("w", 1.0)]) == (1.0, 0.0)


def test_right_words_align_with_the_best_reference():
    assert right_words(["a", "large", "red", "star"], ["a large blue star"]) == [
        True, True, False, True]  # fmt: skip
    assert right_words(["a", "red", "star"], ["a blue circle", "a red star."]) == [True] * 3


def test_a_calibration_survives_saving_and_loading(bundle, tmp_path):
    assert bundle.calibration is not None and bundle.calibration.calibrates_words
    bundle.save_pretrained(tmp_path / "copy")
    again = Pipeline.from_pretrained(tmp_path / "copy", device="cpu")
    assert again.calibration == bundle.calibration
    (tmp_path / "copy" / "calibration.json").unlink()  # a folder without one: raw numbers
    assert Calibration.load(tmp_path / "copy") is None
    assert Pipeline.from_pretrained(tmp_path / "copy", device="cpu").calibration is None
    old = {k: v for k, v in dataclasses.asdict(bundle.calibration).items() if k != "views"}
    (tmp_path / "copy" / "calibration.json").write_text(json.dumps(old))  # written before views
    assert Calibration.load(tmp_path / "copy").views == 1


def test_shifted_views_move_the_image_by_a_few_pixels_with_its_edges_repeated():
    pixels = torch.zeros(2, 3, 64, 64)
    pixels[:, :, 30, 20] = 1.0  # one bright pixel
    pixels[:, :, :, 0] = -1.0  # a dark left edge
    views = shifted_views(pixels, 9)
    assert len(views) == 8 and all(v.shape == pixels.shape for v in views)
    step = round(VIEW_SHIFT * 64)
    for (dx, dy), view in zip(VIEW_OFFSETS, views, strict=True):
        assert view[0, 0, 30 + dy * step, 20 + dx * step] == 1.0 and view[0, 0, 30, 20] == 0
    assert (views[0][:, :, :, : step + 1] == -1.0).all()  # moved right: the edge repeated
    assert shifted_views(pixels, 1) == []
    with pytest.raises(ValueError, match="at most 9 views"):
        shifted_views(pixels, 10)


def test_words_read_on_shifted_copies_are_averaged():
    sure = [
        WordReading("a", 1.0),
        WordReading("star", 0.9, (Alternative("star", 0.9, 0.9), Alternative("cross", 0.1, 0.1))),
    ]
    unsure = [sure[0], WordReading("star", 0.2, (Alternative("star", 0.2, 0.1),
                                                 Alternative("cross", 0.8, 0.9)))]  # fmt: skip
    calibration = Calibration(experts=(1.0, 1.0), views=2)
    one, other = calibration.words(sure), calibration.words(unsure)
    assert calibration.words_over_views([sure, unsure]) == pytest.approx(
        [(a + b) / 2 for a, b in zip(one, other, strict=True)]
    )


def test_shifted_copies_take_wrong_words_down_and_keep_right_ones(bundle):
    """On held-out combinations (a seed of this test's), words the model writes wrong are
    shown much lower when read on the image's shifted copies too (the bundle's `views`), and
    right words about as sure as on the image alone (dev seeds, n=1000: wrong 0.50 -> 0.12,
    right 0.989 -> 0.975)."""
    assert bundle.calibration.views == VIEWS
    rng = random.Random("test-shifted-copies")
    scenes = [sw.sample_scene(rng, split="held_out") for _ in range(300)]
    images = [sw.render(s) for s in scenes]
    alone = dataclasses.replace(bundle.calibration, views=1)
    shown = {}
    for name, calibration in (("alone", alone), ("views", bundle.calibration)):
        written = bundle.caption(images, return_words=True, calibration=calibration)
        right = np.concatenate(
            [
                right_words([w for w, _ in g.words], [sw.describe(s)])
                for g, s in zip(written, scenes, strict=True)
            ]
        ).astype(bool)
        p = np.concatenate([[q for _, q in g.words] for g in written])
        shown[name] = p[~right].mean(), p[right].mean()
    assert (~right).sum() >= 5  # there is something to take down
    assert shown["views"][0] <= shown["alone"][0] - 0.15, shown
    assert shown["views"][1] >= shown["alone"][1] - 0.03, shown


def test_captions_with_words_are_the_captions_and_the_stream_ends_with_the_same_words(
    bundle, scenes
):
    images = [sw.render(s) for s in scenes[:8]]
    plain = bundle.caption(images)
    written = bundle.caption(images, return_words=True)
    assert [g.text for g in written] == plain
    for generated in written:
        assert generated.calibrated and generated.done
        assert [w for w, _ in generated.words] == generated.text.split()
        assert [w for w, _ in generated.raw_words] == generated.text.split()
    raw = bundle.caption(images, return_words=True, calibration=None)
    assert not any(g.calibrated for g in raw)
    assert [g.words for g in raw] == [g.raw_words for g in written]
    for image, generated in zip(images, written, strict=True):
        last = bundle.stream_caption(image).final()
        assert last.calibrated and last.text == generated.text
        np.testing.assert_allclose([p for _, p in last.words], [p for _, p in generated.words],
                                   atol=1e-4)  # fmt: skip
        np.testing.assert_allclose([p for _, p in last.raw_words],
                                   [p for _, p in generated.raw_words], atol=1e-4)  # fmt: skip


def test_a_word_the_encoder_does_not_see_loses_its_confidence(bundle):
    """Read "a large green star" after a large green square: the LM may follow the prefix,
    but the check against the image takes "star" down, and "green" stays."""
    image = sw.render(sw.Scene((sw.Obj("square", "green", "large", 0.5, 0.5),)))
    truth, wrong = bundle.read_text([image] * 2, ["a large green square", "a large green star"])
    calibration = bundle.calibration
    assert calibration.word(wrong[3]) < 0.2 < 0.8 < calibration.word(truth[3])
    assert calibration.word(wrong[2]) > 0.8  # the colour is right in both


def test_a_word_is_right_only_when_what_it_depends_on_is():
    """A word without alternatives ("of" after "left") takes at most the confidence of the
    word that called for it; after a place where the text could have ended, no word is
    surer than going on; without word experts every word keeps the LM's probability."""
    calibration = Calibration(experts=(1.0, 1.0))
    sure = lambda word: WordReading(word, 0.99)  # noqa: E731  (no alternatives)
    checked = lambda word, lm, seen: WordReading(
        word,
        lm,
        (  # noqa: E731
            Alternative(word, lm, seen),
            Alternative("other", 1 - lm, 1 - seen),
        ),
    )
    ending = WordReading("left", 0.6, (Alternative("left", 0.6, 0.1), Alternative(END, 0.4, 0.9)))
    words = [sure("a"), checked("large", 0.9, 0.9), sure("green"), ending, sure("of"),
             sure("a"), checked("small", 0.99, 0.99)]  # fmt: skip
    shown = calibration.words(words)
    going_on = calibration.word(ending)
    assert going_on < 0.2
    assert shown[0] == 0.99  # nothing before it
    assert shown[2] == pytest.approx(min(0.99, calibration.word(words[1])))
    assert shown[3:] == [going_on] * 4  # the clause after "left" is as sure as "left"
    assert Calibration().words(words) == [w.probability for w in words]


def test_an_object_the_image_does_not_show_is_unsure_in_every_word(bundle):
    """The LM may add an object that is not there ("… left of a small red circle" after one
    square): the text without it matches the image better, so every word of the added
    clause is shown unsure; where the image shows it, every word is sure."""
    one = sw.render(sw.Scene((sw.Obj("square", "green", "large", 0.5, 0.5),)))
    two = sw.render(sw.Scene((sw.Obj("square", "green", "large", 0.3, 0.5),
                              sw.Obj("circle", "red", "small", 0.75, 0.5))))  # fmt: skip
    text = "a large green square left of a small red circle"
    added, shown = bundle.read_text([one, two], [text] * 2)
    added, shown = bundle.calibration.words(added), bundle.calibration.words(shown)
    assert min(added[:4]) > 0.9 and max(added[4:]) < 0.2, added
    assert min(shown) > 0.9, shown


def test_answers_are_calibrated_and_choices_take_the_temperature(bundle, scenes):
    image = sw.render(scenes[0])
    question = "how many shapes are there?"
    (generated,) = bundle.answer([image], [question], return_words=True)
    assert generated.calibrated
    word, raw = generated.raw_words[0]
    assert generated.words[0][1] == pytest.approx(bundle.calibration.answer(raw))
    choices = ["one", "two", "three"]
    ((_, lm),) = bundle.answer([image], [question], choices, return_scores=True, calibration=None)
    softer = dataclasses.replace(bundle.calibration, choice_temperature=2.0)
    (_, shown), = bundle.answer([image], [question], choices, return_scores=True,
                                calibration=softer)  # fmt: skip
    assert sum(shown.values()) == pytest.approx(1.0)
    assert max(shown.values()) < max(lm.values())
    assert max(shown, key=shown.get) == max(lm, key=lm.get)


def test_few_shot_words_and_models_without_calibration_report_the_lm(bundle, trained):
    image = sw.render(sw.Scene((sw.Obj("circle", "red", "small", 0.5, 0.5),)))
    few_shot = bundle.stream_continue([image, "Caption:"], max_new_tokens=4).final()
    assert not few_shot.calibrated and few_shot.words == few_shot.raw_words
    assert trained.calibration is None
    generated = trained.caption([image], return_words=True)[0]
    assert not generated.calibrated and generated.words == generated.raw_words
    assert all(0 <= p <= 1 for _, p in generated.words)


def test_fit_calibration_on_a_small_set_gives_finite_numbers(bundle):
    examples = ShapeWorld().calibration_examples(40, seed=5)
    assert all(isinstance(e, CalibrationExample) and e.captions for e in examples)
    calibration = fit_calibration(bundle, examples, fitted_on="test")
    assert calibration.experts[0] == 1.0 and math.isfinite(calibration.experts[1])
    assert calibration.views == VIEWS  # caption words are read on shifted copies too
    assert calibration.answers.slope <= 1.0 and calibration.choice_temperature >= 1.0
    assert len(calibration.matches) == len(calibration.mismatches) == 101
    share, good = calibration.match(calibration.matches[50])
    assert share == pytest.approx(0.5, abs=0.02) and good
    assert calibration.match(calibration.mismatches[10]) == (0.0, False)
