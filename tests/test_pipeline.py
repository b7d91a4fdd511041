"""The Pipeline's tasks on tiny models trained in conftest: behaviour, not just shapes."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import CAPTIONS, COLOR_QUESTION

from vlm import Pipeline
from vlm.mapper import PrefixMapper
from vlm.sequences import Sequences


def test_prefix_shape(trained, images):
    prefix = trained.prefix(list(images.values()))
    assert prefix.shape == (3, 4, trained.lm.config.hidden_size)


def test_caption_returns_the_right_sentence(trained, images):
    assert trained.caption(list(images.values())) == CAPTIONS


def test_batched_and_unbatched_captions_are_identical(trained, images):
    batched = trained.caption(list(images.values()), batch_size=3)
    single = [trained.caption(image)[0] for image in images.values()]
    assert batched == single == CAPTIONS


def test_beam_search_and_sampling(trained, images):
    assert trained.caption(list(images.values()), num_beams=3) == CAPTIONS
    # the tiny model is sure of each word: at 0.7 the nucleus holds one token, the greedy one
    torch.manual_seed(0)
    sampled = trained.caption(list(images.values()), do_sample=True, temperature=0.7, top_p=0.9)
    assert sampled == CAPTIONS
    # hot and with the whole distribution, it does sample: other captions come out
    hot = set()
    for seed in range(5):
        torch.manual_seed(seed)
        hot.update(trained.caption(list(images.values()), do_sample=True, temperature=5.0))
    assert hot - set(CAPTIONS), hot


def test_answer_free_form_and_with_choices(trained, images):
    pictures = list(images.values())
    expected = [c.split()[2] for c in CAPTIONS]
    assert trained.answer(pictures, COLOR_QUESTION) == expected
    results = trained.answer(
        pictures, COLOR_QUESTION, ["red", "blue", "yellow"], return_scores=True
    )
    for (best, scores), want in zip(results, expected, strict=True):
        assert best == want
        assert abs(sum(scores.values()) - 1) < 1e-5
        assert max(scores, key=scores.get) == want


def test_answer_batched_questions_of_different_lengths(trained, images):
    """Left padding must not change answers: batched == one at a time."""
    pictures = list(images.values())
    questions = [COLOR_QUESTION, "  " + COLOR_QUESTION, COLOR_QUESTION]
    assert trained.answer(pictures, questions) == [
        trained.answer([p], [q])[0] for p, q in zip(pictures, questions, strict=True)
    ]


def test_classify_probabilities_and_ranking(trained, images):
    results = trained.classify(list(images.values()), CAPTIONS, templates=["{}"])
    for caption, probs in zip(CAPTIONS, results, strict=True):
        assert abs(sum(probs.values()) - 1) < 1e-5
        assert next(iter(probs)) == caption
    assert len(trained.label_weights) >= 1  # kept per label set
    with pytest.raises(ValueError):
        trained.classify(list(images.values()), [" ", ""])


def test_classify_dedupes_labels(trained, images):
    probs = trained.classify(list(images.values())[:1], CAPTIONS + CAPTIONS[:1], ["{}"])[0]
    assert sorted(probs) == sorted(CAPTIONS)


def test_few_shot_continuation_follows_the_example(trained, images):
    """One example in the format the tiny model learned, then the query: it continues in that
    format, one of its captions, and stops at the end of the line. (Which caption is beyond
    it: the query's in 2 of the 6 orderings; it mostly writes "a large blue circle", as an LM
    that never saw two images in one text may.)"""
    answers = {}
    for example, query in itertools.permutations(CAPTIONS, 2):
        parts = [images[example], f"Caption: {example}\n", images[query], "Caption:"]
        answers[example, query] = trained.continue_sequence(parts, max_new_tokens=16)
    assert set(answers.values()) <= set(CAPTIONS), answers


def test_describe_images_writes_each_caption_after_its_image(trained, images, monkeypatch):
    """describe=True is the same continuation as the list with each image's own greedy
    caption written after it by hand; a ready prefix is described too, text left as it is,
    and every image is encoded once."""
    names = list(images)
    prefix = trained.prefix([images[names[2]]])[0]
    parts = [prefix, "Shape: circle\n", images[names[1]], "Shape:"]
    third, second = trained.caption([images[names[i]] for i in (2, 1)])
    encoded = []
    prefix_of = trained.prefix
    counted = lambda pics: encoded.append(len(pics)) or prefix_of(pics)  # noqa: E731
    monkeypatch.setattr(trained, "prefix", counted)
    described = trained.describe_images([parts])[0]
    assert encoded == [1]  # the image; the ready prefix is not encoded again
    assert described[0] is prefix and described[4:] == [f"Caption: {second}\n", "Shape:"]
    assert described[1:3] == [f"Caption: {third}\n", "Shape: circle\n"]
    assert torch.allclose(described[3], prefix_of([images[names[1]]])[0], atol=1e-5)
    monkeypatch.undo()
    expected = trained.continue_sequence(described, max_new_tokens=6)
    assert trained.continue_sequence(parts, max_new_tokens=6, describe=True) == expected
    streamed = trained.stream_continue(parts, max_new_tokens=6, describe=True).final().text
    assert streamed == expected


def test_describing_writes_only_the_caption_lines_that_fit(trained, images, monkeypatch):
    """From the last image back: with room for one caption line only the query's is written;
    with room for none the list is read bare; too long even bare is the usual error."""
    names = list(images)
    parts = [images[names[0]], "Shape: circle\n", images[names[1]], "Shape:"]
    bare = len(trained.embed(parts))
    lines = [p for p in trained.describe_images([parts])[0] if str(p).startswith("Caption:")]
    query_line = len(trained._token_ids(lines[1]))
    for limit, kept in ((bare + 1, []), (bare + 1 + query_line, [lines[1]])):
        monkeypatch.setattr(Sequences, "max_positions", property(lambda self, n=limit: n))
        described = trained.describe_images([parts], fit=True)[0]
        assert [p for p in described if isinstance(p, str) and p.startswith("Caption:")] == kept
        trained.continue_sequence(parts, max_new_tokens=1, describe=True)  # fits: no error
    monkeypatch.setattr(Sequences, "max_positions", property(lambda self: bare))
    with pytest.raises(ValueError, match="too long"):
        trained.continue_sequence(parts, max_new_tokens=1, describe=True)


def test_an_image_with_its_caption_written_is_not_described_again(trained, images):
    """Examples that are captions ("Caption: …"), and a query followed by "Caption:", are
    read as given: describing would write each caption twice."""
    names = list(images)
    parts = [images[names[0]], "Caption: a small red square\n", images[names[1]], " Caption:"]
    described = trained.describe_images([parts])[0]
    assert [p for p in described if isinstance(p, str)] == [parts[1], parts[3]]
    mixed = [images[names[0]], "Shape: circle\n", images[names[1]], "Caption:"]
    assert sum(isinstance(p, str) for p in trained.describe_images([mixed])[0]) == 3


def test_save_and_load_round_trip(trained, saved_pipeline, images):
    loaded = Pipeline.from_pretrained(saved_pipeline, device="cpu")
    pictures = list(images.values())
    assert torch.allclose(loaded.prefix(pictures), trained.prefix(pictures), atol=1e-6)
    assert loaded.caption(pictures) == trained.caption(pictures)
    assert loaded.classify(pictures, CAPTIONS, ["{}"]) == trained.classify(
        pictures, CAPTIONS, ["{}"]
    )


def test_loaded_pipeline_is_frozen(saved_pipeline):
    loaded = Pipeline.from_pretrained(saved_pipeline, device="cpu")
    assert not any(p.requires_grad for p in loaded.lm.parameters())
    assert not any(p.requires_grad for p in loaded.encoder.model.parameters())
    assert not loaded.lm.training


def test_mapper_hub_mixin_round_trip(tmp_path):
    mapper = PrefixMapper("transformer", 16, 32, 3, clip_length=2, num_layers=1, num_heads=4)
    mapper.save_pretrained(tmp_path)
    again = PrefixMapper.from_pretrained(tmp_path)
    x = torch.randn(2, 16)
    assert again.config == mapper.config
    assert torch.equal(again(x), mapper(x))


def test_token_input_mapper_reads_image_tokens(trained, images):
    """input="tokens": the mapper reads the pooled embedding + a grid of patch tokens."""
    mapper = PrefixMapper(
        "transformer", trained.encoder.embed_dim, trained.lm.config.hidden_size, 3,
        num_layers=1, num_heads=4, input="tokens", num_tokens=5, normalize_input=True,
    )  # fmt: skip
    pipeline = Pipeline(
        trained.encoder, trained.lm, trained.tokenizer, mapper, trained.config, "cpu"
    )
    features = pipeline.image_features(list(images.values()))
    assert features.shape == (3, 5, trained.encoder.embed_dim)
    pooled = trained.encoder.encode_images(list(images.values()))
    assert torch.allclose(features[:, 0], pooled, atol=1e-5)  # first token: the embedding
    assert pipeline.prefix(list(images.values())).shape == (3, 3, trained.lm.config.hidden_size)
    with pytest.raises(ValueError):
        PrefixMapper("mlp", 8, 8, 2, input="tokens")


def test_threads_share_one_pipeline_safely(trained, images):
    """The app serves requests in threads: patch tokens (explain) and pooled embeddings
    (captions, search) at once must each get their own kind of output, and the class-weight
    cache must survive concurrent label sets."""
    from concurrent.futures import ThreadPoolExecutor

    image = list(images.values())[0]
    pixels = trained.encoder.pixels([image])
    expected_tokens = trained.encoder.encode_tokens(pixels)
    expected_pooled = trained.encoder.encode_pixels(pixels)

    def work(i: int):
        if i % 3 == 0:
            return "tokens", trained.encoder.encode_tokens(pixels)
        if i % 3 == 1:
            return "pooled", trained.encoder.encode_pixels(pixels)
        return "labels", trained.classify(image, [f"label {i % 20}", "a large red square"])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(120)))
    for kind, value in results:
        if kind == "tokens":
            torch.testing.assert_close(value, expected_tokens)
        elif kind == "pooled":
            torch.testing.assert_close(value, expected_pooled)
        else:
            assert len(value[0]) == 2 and abs(sum(value[0].values()) - 1) < 1e-5


def test_label_weights_keep_the_label_sets_used_most_recently(trained):
    from vlm.zeroshot import ClassWeights

    weights = ClassWeights(trained.encoder, trained.device, size=2)
    first, second = weights(["a red circle"], ["{}"]), weights(["a blue star"], ["{}"])
    assert weights(["a red circle"], ["{}"]) is first  # kept: not built again
    weights(["a green cross"], ["{}"])  # a third set: the least recently used one goes
    assert len(weights) == 2 and weights(["a red circle"], ["{}"]) is first
    again = weights(["a blue star"], ["{}"])
    assert again is not second and torch.equal(again, second)  # built again, the same
