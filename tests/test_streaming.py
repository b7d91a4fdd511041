"""Streamed text (vlm.streaming): the same text as without streaming, written a piece at a time,
each word with the probability the frozen LM gave it (checked against the LM's own logits)."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import CAPTIONS, COLOR_QUESTION

from vlm import Pipeline
from vlm.examples import photo_examples, shapeworld_examples
from vlm.presets import SHAPEWORLD_DIR
from vlm.streaming import Generated, print_stream, word_probabilities

DECODINGS = [
    {},
    {"num_beams": 3},
    {"do_sample": True, "temperature": 1.5, "top_p": 0.9},
    {"max_new_tokens": 3},
]


@pytest.fixture(scope="module")
def bundled():
    return Pipeline.from_pretrained(SHAPEWORLD_DIR, device="cpu")


@pytest.fixture(scope="module")
def scenes():
    """Bundled examples: one object, and two (a caption of ten words)."""
    examples = shapeworld_examples()
    one = next(p for p, t in examples if " left of " not in t["caption"])
    two = next(p for p, t in examples if " left of " in t["caption"])
    return [one, two]


def same_as_unstreamed(pipeline, image, decoding):
    torch.manual_seed(0)
    expected = pipeline.caption([image], **decoding)[0]
    torch.manual_seed(0)
    snapshots = list(pipeline.stream_caption(image, **decoding))
    assert snapshots[-1].done and not any(s.done for s in snapshots[:-1])
    assert snapshots[-1].text == expected, decoding
    return snapshots


@pytest.mark.parametrize("decoding", DECODINGS)
def test_bundled_stream_ends_with_the_caption(bundled, scenes, decoding):
    for image in scenes:
        same_as_unstreamed(bundled, image, decoding)


@pytest.mark.parametrize("decoding", DECODINGS)
def test_tiny_stream_ends_with_the_caption(trained, images, decoding):
    for image in images.values():
        same_as_unstreamed(trained, image, decoding)


def test_answers_and_few_shot_stream_to_the_same_text(trained, images):
    pictures = list(images.values())
    for picture, want in zip(pictures, [c.split()[2] for c in CAPTIONS], strict=True):
        assert trained.stream_answer(picture, COLOR_QUESTION).final().text == want
    parts = [pictures[0], f"Caption: {CAPTIONS[0]}\n", pictures[1], "Caption:"]
    streamed = trained.stream_continue(parts, max_new_tokens=8).final().text
    assert streamed == trained.continue_sequence(parts, max_new_tokens=8)
    with pytest.raises(ValueError, match="nothing to continue"):
        trained.stream_continue([])


def test_a_long_caption_is_written_a_word_at_a_time(bundled, scenes):
    snapshots = same_as_unstreamed(bundled, scenes[1], {})
    final = snapshots[-1].text
    texts = [s.text for s in snapshots[:-1]]
    assert len(set(texts) - {"", final}) >= 2  # partial texts before the whole one
    assert all(final.startswith(t) for t in texts)  # greedy: each one the next's beginning
    assert len(final.split()) >= 8


def test_beam_search_yields_the_winning_beam_once(bundled, scenes):
    snapshots = same_as_unstreamed(bundled, scenes[1], {"num_beams": 5})
    assert len(snapshots) == 1


def lm_probabilities(pipeline, image, token_ids) -> torch.Tensor:
    """The LM's own next-token distributions [n, V] along a caption: the prefix, the prompt,
    then each token, read by one forward pass."""
    prefix = pipeline.prefix([image])[0]
    sequence = pipeline.embed([prefix, pipeline.config.caption_prompt])
    table = pipeline.lm.get_input_embeddings()
    embeds = torch.cat([sequence, table(torch.tensor(token_ids))])[None]
    with torch.inference_mode():
        logits = pipeline.lm(inputs_embeds=embeds).logits[0].float()
    n = len(token_ids)
    return logits[-n - 1 : -1].softmax(-1)  # the position before each token predicts it


@pytest.mark.parametrize("decoding", [{}, {"num_beams": 5}])
def test_probabilities_are_the_lms_and_greedy_takes_the_likeliest(bundled, scenes, decoding):
    for image in scenes:
        final = bundled.stream_caption(image, **decoding).final()
        ids = [t for t, _ in final.tokens]
        probs = torch.tensor([p for _, p in final.tokens])
        assert ((probs > 0) & (probs <= 1)).all()
        expected = lm_probabilities(bundled, image, ids)
        chosen = expected[torch.arange(len(ids)), ids]
        torch.testing.assert_close(probs, chosen, atol=2e-4, rtol=2e-3)
        if not decoding:  # greedy: the token taken is the LM's most likely at every step
            assert expected.argmax(-1).tolist() == ids
        assert [w for w, _ in final.words] == final.text.split()
        assert all(0 < p <= 1 for _, p in final.words)


def test_sampling_reports_the_lms_probability_not_the_sampler(bundled):
    """Sampled tokens that are not the LM's favourite keep the LM's probability for them."""
    photo = photo_examples()[0]  # not a ShapeWorld scene: the LM is unsure of some words
    off_favourite = 0
    for seed in range(5):
        torch.manual_seed(seed)
        final = bundled.stream_caption(photo, do_sample=True, temperature=2.5).final()
        ids = [t for t, _ in final.tokens]
        lm = lm_probabilities(bundled, photo, ids)
        expected = lm[torch.arange(len(ids)), ids]
        torch.testing.assert_close(torch.tensor([p for _, p in final.tokens]), expected,
                                   atol=2e-4, rtol=2e-3)  # fmt: skip
        off_favourite += int((lm.argmax(-1) != torch.tensor(ids)).sum())
    assert off_favourite > 0  # the sampler did leave the greedy path


def test_a_words_probability_is_the_product_of_its_tokens():
    raw = " a large.\nmore"  # tokens: " a" | " lar" | "ge" | ".\n" | "more"; trimmed at "."
    words = word_probabilities("a large.", raw, [2, 6, 8, 10, 14], [0.5, 0.4, 0.5, 0.9, 0.1])
    assert [w for w, _ in words] == ["a", "large."]
    assert words[0][1] == pytest.approx(0.5) and words[1][1] == pytest.approx(0.4 * 0.5 * 0.9)


def test_spans_give_the_text_back_with_a_probability_per_word():
    written = Generated("a  small\tstar", [("a", 0.9), ("small", 0.5), ("star", 0.7)], [])
    spans = written.spans()
    assert "".join(piece for piece, _ in spans) == written.text
    assert [(p, s) for p, s in spans if s is not None] == written.words


def test_an_error_in_the_lm_reaches_the_reader(bundled, scenes):
    stream = bundled.stream_caption(scenes[0], do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        stream.final()


def test_print_stream_writes_the_caption_on_one_line(bundled, scenes):
    out = io.StringIO()
    final = print_stream(bundled.stream_caption(scenes[1]), "image.png\t", file=out)
    assert out.getvalue() == f"image.png\t{bundled.caption([scenes[1]])[0]}\n"
    assert final.done and final.text in out.getvalue()
