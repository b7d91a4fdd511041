"""A mapper that reads the task prompt (InstructBLIP-style): the frozen LM's hidden states of
"Caption:" or "Question: … Answer:" join the image tokens, so the prefix can depend on the
task. Tiny random parts: the wiring, the padding mask, and that every task path passes its
own prompt."""

from __future__ import annotations

import pytest
import torch

from vlm import Pipeline
from vlm.mapper import PrefixMapper
from vlm.prompts import question_prompt


def _mapper(clip_dim: int, lm_dim: int, prompt_dim: int, **kw) -> PrefixMapper:
    torch.manual_seed(0)
    return PrefixMapper("transformer", clip_dim, lm_dim, 3, clip_length=2, num_layers=2,
                        num_heads=4, prompt_dim=prompt_dim, **kw)  # fmt: skip


def test_padding_does_not_change_the_prefix_and_the_prompt_does():
    mapper = _mapper(16, 32, 8).eval()
    image = torch.randn(2, 16)
    prompt = torch.randn(2, 3, 8)
    alone = mapper(image, prompt)
    padded = torch.cat([prompt, torch.randn(2, 4, 8)], dim=1)  # noise where the mask is off
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, :3] = True
    torch.testing.assert_close(mapper(image, padded, mask), alone)
    other = mapper(image, torch.randn(2, 3, 8))
    assert (other - alone).abs().max() > 1e-3  # another prompt, another prefix
    with pytest.raises(ValueError, match="reads the task prompt"):
        mapper(image)
    with pytest.raises(ValueError, match="needs kind='transformer'"):
        PrefixMapper("mlp", 16, 32, 3, prompt_dim=8)


def test_a_mapper_without_prompt_is_clipcaps_as_before():
    """prompt_dim=0 (every ClipCap checkpoint): the same keys and the same output."""
    plain = _mapper(16, 32, 0)
    assert not plain.reads_prompt
    assert not any(key.startswith("prompt") for key in plain.state_dict())
    torch.manual_seed(0)
    again = PrefixMapper("transformer", 16, 32, 3, clip_length=2, num_layers=2, num_heads=4)
    x = torch.randn(2, 16)
    torch.testing.assert_close(plain(x), again(x))


def test_hub_mixin_round_trip_keeps_the_prompt_reader(tmp_path):
    mapper = _mapper(16, 32, 8)
    mapper.save_pretrained(tmp_path)
    again = PrefixMapper.from_pretrained(tmp_path)
    assert again.config == mapper.config and again.reads_prompt
    x, prompt = torch.randn(2, 16), torch.randn(2, 5, 8)
    assert torch.equal(again(x, prompt), mapper(x, prompt))


@pytest.fixture()
def prompted(trained):
    """The conftest's tiny parts with a prompt-reading mapper (random weights)."""
    hidden = trained.lm.config.hidden_size
    mapper = PrefixMapper("transformer", trained.encoder.embed_dim, hidden, 3, num_layers=1,
                          num_heads=4, normalize_input=True, prompt_dim=hidden)  # fmt: skip
    return Pipeline(trained.encoder, trained.lm, trained.tokenizer, mapper.eval(),
                    trained.config, "cpu")  # fmt: skip


def test_prompt_states_are_the_lms_and_padding_free(prompted):
    prompts = ["Caption:", "Question: what color is the star? Answer:"]
    states, mask = prompted.prompt_states(prompts)
    assert not states.requires_grad and states.dtype == torch.float32
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompted.tokenizer(prompt)["input_ids"]])
        alone = prompted.lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        assert int(mask[row].sum()) == ids.shape[1]
        torch.testing.assert_close(states[row, : ids.shape[1]], alone, atol=1e-5, rtol=1e-4)


def test_each_task_gives_the_mapper_its_own_prompt(prompted, images, monkeypatch):
    pictures = list(images.values())[:2]
    caption = prompted.prefix(pictures)
    torch.testing.assert_close(caption, prompted.prefix(pictures, ["Caption:"] * 2))
    questions = ["what color is the star?", "how many shapes are there?"]
    asked = [question_prompt(q, prompted.config.question_template) for q in questions]
    conditioned = prompted.prefix(pictures, asked)
    assert (conditioned - caption).abs().max() > 1e-4
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        prompted.prefix(pictures, asked[:1])

    seen: list = []
    original = prompted.prefix

    def spy(images, prompts=None):
        seen.append(prompts)
        return original(images, prompts)

    monkeypatch.setattr(prompted, "prefix", spy)
    prompted.answer(pictures, questions, max_new_tokens=2)
    prompted.answer(pictures, questions, choices=["red", "two"])
    list(prompted.stream_answer(pictures[0], questions[0], max_new_tokens=2))
    prompted.caption(pictures, max_new_tokens=2)
    assert seen == [asked, asked, asked[:1], None]  # None: the caption prompt


def test_a_question_too_long_for_the_lm_is_refused_before_any_image_is_encoded(monkeypatch):
    """The bundled mapper reads the question through the LM, so a question longer than the LM's
    positions must be a clear error before the prompt or the image is read (it was an
    IndexError from the position table)."""
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    assert pipeline.mapper.reads_prompt

    def never(*args, **kwargs):
        raise AssertionError("encoded an image for a question that cannot be answered")

    monkeypatch.setattr(pipeline, "image_features", never)
    image = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
    with pytest.raises(ValueError, match="too long"):
        pipeline.answer(image, "what color is it? " * 40)
    with pytest.raises(ValueError, match="too long"):
        pipeline.prompt_states(["what color is it? " * 40])
