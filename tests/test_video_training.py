"""Training on clips (issue 43): the LM's text gains clip narratives (frame lines that say
where each object is, then what happened), and the prefix stage trains the mapper on paired
clips laid out exactly as `describe_video` and `answer_video` read them."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate import Accelerator

from vlm.factory import build_encoder, build_lm, build_pipeline, train_tokenizer
from vlm.prompts import VIDEO_PROMPT, frame_prompt
from vlm.shapeworld.clips import HELD_OUT_MOTIONS, describe_clip, sample_clip
from vlm.shapeworld.recipe import ShapeWorld, clip_texts
from vlm.training import MODEL_SIZES, TrainConfig
from vlm.training.prefix import PrefixRecipe
from vlm.training.text_batches import split_prompt

VIDEO = dict(narrative_share=0.15, clips_per_image=1 / 15)  # docs/video-lab.md's recipe


def test_the_lms_text_holds_narratives_of_every_motion():
    documents = ShapeWorld(**VIDEO).texts(600, seed=3)
    narratives = [d for d in documents if d.startswith(frame_prompt(0))]
    assert 0.08 < len(narratives) / len(documents) < 0.25
    assert all(f"\n{VIDEO_PROMPT} " in d for d in narratives)
    told = " ".join(narratives)
    assert " at x" in told and all(motion in told for motion in HELD_OUT_MOTIONS)
    assert VIDEO_PROMPT in ShapeWorld().answer_cues()  # descriptions weigh as answers
    # off (the bundle's recipe): the documents are what they were, draw for draw
    assert ShapeWorld().texts(200, 3) == ShapeWorld(clips_per_image=0.1).texts(200, 3)
    assert not [d for d in ShapeWorld().texts(200, 3) if "Frame at" in d]


def test_paired_clips_are_training_clips_a_frame_a_second_with_their_texts():
    data = ShapeWorld(clips_per_image=0.1)
    pool = data.video_data(60, seed=0)
    assert len(pool) == 6 and pool.frames.shape == (6, 4, 64, 64, 3)
    assert pool.times == (0.0, 1.0, 2.0, 3.0)
    assert len(pool.images()) == 24
    for texts in pool.texts:
        prompts = [p for p, _ in texts]
        assert prompts.count(VIDEO_PROMPT) == len(texts) // 2  # as often as the questions
        assert all(p == VIDEO_PROMPT or p.startswith("Question: ") for p in prompts)
    clip = sample_clip(random.Random(0))
    assert (VIDEO_PROMPT, f" {describe_clip(clip)}") in clip_texts(clip)
    assert ShapeWorld(clips_per_image=0).video_data(60, seed=0) is None
    assert "video" in ShapeWorld(**VIDEO).pipeline_config()["tasks"]
    assert "video" not in ShapeWorld().pipeline_config()["tasks"]


@pytest.fixture(scope="module")
def tiny_parts():
    """An untrained tiny encoder, and a tiny LM (128 positions) with a tokenizer of the
    recipe's own text, frozen."""
    encoder = build_encoder(MODEL_SIZES["tiny"]["clip"])
    tokenizer = train_tokenizer(ShapeWorld(**VIDEO).texts(400, seed=0), 300)
    lm = build_lm(tokenizer, **{**MODEL_SIZES["tiny"]["lm"], "n_positions": 128})
    return encoder, lm.requires_grad_(False), tokenizer


def test_a_clip_batch_teaches_the_mapper_through_the_video_layout(tiny_parts, monkeypatch):
    """A clip batch's loss is the LM's on the clip's text after its frames' prefixes, laid
    out by `Pipeline.video_sequence` (the inference path), and its gradient reaches the
    mapper only."""
    encoder, lm, tokenizer = tiny_parts
    data = ShapeWorld(clips_per_image=0.2)
    pipeline = build_pipeline(encoder, lm, tokenizer, MODEL_SIZES["tiny"]["mapper"],
                              device="cpu", **data.pipeline_config())  # fmt: skip
    config = TrainConfig(out=None, size="tiny", prefix_examples=40, prefix_batch_size=8)
    recipe = PrefixRecipe(data, pipeline, config, Accelerator(cpu=True))
    laid_out = []
    original = pipeline.video_sequence

    def spy(times, prefixes, prompt, need):
        laid_out.append((tuple(times), len(prefixes), prompt))
        return original(times, prefixes, prompt, need)

    monkeypatch.setattr(pipeline, "video_sequence", spy)
    kind, features, texts = recipe.clip_items(random.Random(0))
    assert kind == "clips" and features.shape[:2] == (2, 4) and len(texts) == 2
    loss = recipe.loss(pipeline.mapper.requires_grad_(True), (kind, features, texts))
    assert torch.isfinite(loss) and loss > 0
    assert [(times, frames) for times, frames, _ in laid_out] == [((0, 1, 2, 3), 4)] * 2
    assert [prompt for *_, prompt in laid_out] == [p for p, _ in texts]
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipeline.mapper.parameters())
    recipe.check()  # nothing frozen learnt


def test_frame_lines_are_a_share_of_the_prefix_stages_texts_after_a_timestamp():
    """With `frame_line_share`, an image's texts gain its frame line (where each object is)
    after a second's timestamp, split there as the prompt; the bundle's recipe (0) keeps its
    texts draw for draw, and frame lines are not taught from a caption (they say where)."""
    import re

    from vlm.config import PipelineConfig
    from vlm.prompts import FRAME_PROMPT

    data = ShapeWorld(frame_line_share=0.2)
    pool = data.prefix_data(50, seed=4)
    lines = [t for texts in pool.texts for t in texts if FRAME_PROMPT.match(t)]
    picked = sum(len([t for t in texts if FRAME_PROMPT.match(t)]) / len(texts)
                 for texts in pool.texts) / len(pool.texts)  # fmt: skip
    assert 0.15 < picked < 0.3
    assert {FRAME_PROMPT.match(t).group() for t in lines} <= {frame_prompt(s) for s in range(4)}
    config = PipelineConfig(encoder={}, mapper={}, **data.pipeline_config())
    prompt, target = split_prompt(lines[0], config)
    assert prompt == FRAME_PROMPT.match(lines[0]).group()
    one = r"a (small|large) [a-z]+ [a-z]+ at x[1-5] y[1-5]"
    targets = [split_prompt(t, config)[1] for t in lines]
    assert all(re.fullmatch(rf" {one}( left of {one})*| nothing", t) for t in targets)
    assert 0 < targets.count(" nothing") < len(targets) / 5  # empty frames' lines too
    assert config.video_frame_lines and "video" in config.tasks
    assert ShapeWorld().prefix_data(50, 4).texts == ShapeWorld(frame_line_share=0).prefix_data(
        50, 4).texts  # fmt: skip
    assert not ShapeWorld().pipeline_config().get("video_frame_lines")


def test_a_frame_line_is_not_taught_from_the_caption(tiny_parts):
    encoder, lm, tokenizer = tiny_parts
    data = ShapeWorld(frame_line_share=0.5)
    pipeline = build_pipeline(encoder, lm, tokenizer, MODEL_SIZES["tiny"]["mapper"],
                              device="cpu", **data.pipeline_config())  # fmt: skip
    config = TrainConfig(out=None, size="tiny", prefix_examples=8, prefix_batch_size=8,
                         prefix_text_teacher=1.0)  # fmt: skip
    recipe = PrefixRecipe(data, pipeline, config, Accelerator(cpu=True))
    item = next(i for i, texts in enumerate(recipe.texts) if "Question: " in " ".join(texts))
    split = [split_prompt(t, pipeline.config) for t in recipe.texts[item]]
    framed = [pair for pair in split if pair[0].startswith("Frame at")][:1]
    asked = [pair for pair in split if pair[0].startswith("Question:")][:1]
    for pairs, taught in ((framed, False), (asked, True)):
        prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
        tokens, labels = pipeline.sequences.training_rows(targets, prompts, eos=True,
                                                          device="cpu")  # fmt: skip
        _, _, mask = recipe.teacher_rows([item], prompts, tokens, labels)
        assert bool(mask.any()) is taught  # a question is taught from the caption


def test_calibration_clips_are_fresh_training_clips_a_frame_a_second():
    """Held-out clips for a video model's calibration: of the training split (no held-out
    combination or motion), a frame a second, deterministic from a seed of their own, each
    with its description and a question."""
    from vlm import shapeworld as sw

    data = ShapeWorld(frame_line_share=0.2)
    held_out = data.calibration_clips(30, seed=0)
    again = data.calibration_clips(30, seed=0)
    assert [c.description for c in held_out] == [c.description for c in again]
    assert [c.description for c in data.calibration_clips(30, seed=1)] != [
        c.description for c in held_out]  # fmt: skip
    assert all(len(c.frames) == 4 and c.fps == 1.0 for c in held_out)
    assert all(c.frames[0].size == (data.image_size, data.image_size) for c in held_out)
    for c in held_out:
        assert len(c.questions) == 1 and c.description.endswith(".")
        assert not any(m in c.description for m in HELD_OUT_MOTIONS)
        assert not any(f"{colour} {shape}" in c.description for colour, shape in sw.HELD_OUT)
