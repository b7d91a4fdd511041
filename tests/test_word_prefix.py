"""A mapper that writes soft words (`vocab_size` > 0, `--writes-words`): each prefix vector is
a softmax over the LM's vocabulary times a frozen copy of its input embeddings, so the frozen
LM reads the prefix as it reads text. Tiny random parts."""

from __future__ import annotations

import torch

from vlm import Pipeline
from vlm.factory import build_pipeline
from vlm.mapper import PrefixMapper


def _mapper(vocab_size: int) -> PrefixMapper:
    torch.manual_seed(0)
    return PrefixMapper("transformer", 16, 8, 3, clip_length=2, num_layers=1, num_heads=2,
                        vocab_size=vocab_size)  # fmt: skip


def test_each_prefix_vector_is_a_mixture_of_the_words():
    mapper = _mapper(8)
    mapper.set_word_embeddings(torch.eye(8))  # then a prefix vector is its word distribution
    weights = mapper(torch.randn(4, 16))
    assert weights.shape == (4, 3, 8) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 3))
    words = torch.randn(8, 8)
    mapper.set_word_embeddings(words)
    x = torch.randn(4, 16)
    torch.testing.assert_close(mapper(x), mapper.word_weights(x) @ words)


def test_a_mapper_without_words_has_no_word_parameters():
    plain = _mapper(0)
    assert not plain.writes_words
    assert not any("word" in key for key in plain.state_dict())
    with_words = _mapper(8)
    assert with_words.writes_words and "word_embeddings" in with_words.state_dict()


def test_build_pipeline_copies_the_lms_embeddings_and_a_round_trip_keeps_them(
    trained, images, tmp_path
):
    pipeline = build_pipeline(trained.encoder, trained.lm, trained.tokenizer,
                              {"kind": "transformer", "prefix_length": 3, "num_layers": 1,
                               "num_heads": 2, "writes_words": True})  # fmt: skip
    table = trained.lm.get_input_embeddings().weight
    assert pipeline.mapper.config["vocab_size"] == table.shape[0]
    assert torch.equal(pipeline.mapper.word_embeddings, table.detach())
    assert not pipeline.mapper.word_embeddings.requires_grad  # a buffer: the LM stays frozen
    assert pipeline.mapper.word_embeddings.data_ptr() != table.data_ptr()  # a copy
    pipeline.save_pretrained(tmp_path)
    again = Pipeline.from_pretrained(tmp_path, device="cpu")
    assert again.mapper.writes_words
    assert torch.equal(again.mapper.word_embeddings, pipeline.mapper.word_embeddings)
    shown = list(images.values())[:2]  # the loaded soft words caption as the saved ones
    assert again.caption(shown, max_new_tokens=4) == pipeline.caption(shown, max_new_tokens=4)
