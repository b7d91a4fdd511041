"""Batching never changes an output: the bundled model's few-shot continuations, captions and
answers of a batch (left-padded, of mixed lengths) are those of each item alone."""

from __future__ import annotations

import pytest
from conftest import shapeworld_pipeline

TOKENS = 8


@pytest.fixture(scope="module")
def bundle():
    return shapeworld_pipeline()


@pytest.fixture(scope="module")
def pictures():
    """Four scenes: three of one object, one of two (a longer caption)."""
    from vlm import shapeworld as sw

    scenes = [
        sw.Scene((sw.Obj("circle", "red", "large", 0.5, 0.5),)),
        sw.Scene((sw.Obj("star", "blue", "small", 0.4, 0.6),)),
        sw.Scene((sw.Obj("square", "green", "large", 0.5, 0.5),)),
        sw.Scene((sw.Obj("triangle", "yellow", "large", 0.25, 0.5),
                  sw.Obj("cross", "purple", "small", 0.75, 0.4))),
    ]  # fmt: skip
    return [sw.render(scene, 128) for scene in scenes]


@pytest.fixture(scope="module")
def sequences(pictures):
    """Interleaved lists of very different lengths: 3 images, 1 image, text alone, 2 images,
    an image and a question."""
    red, blue, green, two = pictures
    return [
        [red, "Colour: red\n", blue, "Colour: blue\n", green, "Colour:"],
        [two, "Caption:"],
        ["Caption: a large red circle\nCaption:"],
        [blue, "Shape: star\n", green, "Shape:"],
        [red, "Question: what color is it? Answer:"],
    ]


@pytest.mark.parametrize("describe", [False, True], ids=["bare", "described"])
def test_continue_sequences_batched_equals_one_at_a_time(bundle, sequences, describe):
    batched = bundle.continue_sequences(sequences, max_new_tokens=TOKENS, describe=describe)
    alone = [
        bundle.continue_sequences([parts], max_new_tokens=TOKENS, describe=describe)[0]
        for parts in sequences
    ]
    assert batched == alone
    assert len(set(batched)) >= 4 and all(batched), batched  # real, different continuations
    # and the one-list call is the same again
    assert (
        bundle.continue_sequence(sequences[3], max_new_tokens=TOKENS, describe=describe)
        == (alone[3])
    )


def test_describing_reads_the_query_and_batching_keeps_it(bundle, sequences):
    """What the bundle gets right (the colour list needs each image described first; the
    shape list does not), batched or not: the outputs compared above are not all wrong."""
    bare = bundle.continue_sequences(sequences, max_new_tokens=TOKENS)
    described = bundle.continue_sequences(sequences, max_new_tokens=TOKENS, describe=True)
    assert described[0] == "green" and described[3] == bare[3] == "square"
    assert described[1].startswith("a large yellow triangle left of a small")


def test_captions_batched_equal_one_at_a_time(bundle, pictures):
    batched = bundle.caption(pictures, batch_size=len(pictures), max_new_tokens=20)
    in_twos = bundle.caption(pictures, batch_size=2, max_new_tokens=20)
    alone = [bundle.caption(picture, max_new_tokens=20)[0] for picture in pictures]
    assert batched == in_twos == alone == [
        "a large red circle", "a small blue star", "a large green square",
        "a large yellow triangle left of a small purple cross",
    ]  # fmt: skip
    beams = bundle.caption(pictures, num_beams=3, max_new_tokens=20)
    assert beams == [bundle.caption(p, num_beams=3, max_new_tokens=20)[0] for p in pictures]


QUESTIONS = [
    "what color is it?",
    "what shape is the small purple object on the right of the picture?",
    "how many shapes are there?",
    "what color is the cross?",
]


def test_answers_batched_equal_one_at_a_time(bundle, pictures):
    """Questions of different lengths, so the batch is left-padded: the same answers, and
    the same probability for each of their words (which the padding would shift first)."""
    batched = bundle.answer(pictures, QUESTIONS, return_words=True)
    alone = [bundle.answer([i], [q], return_words=True)[0]
             for i, q in zip(pictures, QUESTIONS, strict=True)]  # fmt: skip
    assert [a.text for a in batched] == [a.text for a in alone]
    for together, single in zip(batched, alone, strict=True):
        assert [w for w, _ in together.raw_words] == [w for w, _ in single.raw_words]
        assert [p for _, p in together.raw_words] == pytest.approx(
            [p for _, p in single.raw_words], abs=1e-4
        )
    texts = bundle.answer(pictures, QUESTIONS)
    assert texts == [a.text for a in alone]
    assert texts[0] == "red" and texts[2] == "one" and texts[3] == "purple", texts
    # scored choices too: each image's scores are its own, whatever the batch
    choices = ["red", "blue", "green", "purple"]
    scored = bundle.answer(pictures, "what color is it?", choices, return_scores=True)
    for image, (best, scores) in zip(pictures, scored, strict=True):
        ((best_alone, scores_alone),) = bundle.answer(
            [image], "what color is it?", choices, return_scores=True
        )
        assert best == best_alone
        assert scores == pytest.approx(scores_alone, abs=1e-4)
    assert [best for best, _ in scored[:3]] == ["red", "blue", "green"]
