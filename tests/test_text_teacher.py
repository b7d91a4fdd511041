"""The prefix stage's text teacher (`TrainConfig.prefix_text_teacher`): the frozen LM reading
an image's caption as text teaches it, token by token, how to read a question after the
image's prefix (KL between the two next-token distributions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_prefix_context import tiny_lm
from torch.nn.utils.rnn import pad_sequence

import vlm.training.prefix
from vlm import shapeworld as sw
from vlm.training import TrainConfig, train
from vlm.training.losses import text_teacher_loss


def teacher_of(captions: list[list[int]], texts: list[list[int]]):
    """(token ids, starts, mask) of caption + text rows, right-padded."""
    rows = [torch.tensor(c + t) for c, t in zip(captions, texts, strict=True)]
    n = max(map(len, texts))
    mask = (torch.arange(n)[None] < torch.tensor([[len(t)] for t in texts])).float()
    return pad_sequence(rows, batch_first=True), torch.tensor(list(map(len, captions))), mask


def test_a_prefix_that_reads_as_the_caption_has_no_teacher_loss():
    lm = tiny_lm()
    table = lm.get_input_embeddings()
    captions, texts = [[5, 6, 7], [8, 9, 10]], [[11, 12, 13, 14], [15, 16]]
    teacher = teacher_of(captions, texts)
    tokens = pad_sequence([torch.tensor(t) for t in texts], batch_first=True, padding_value=39)
    with torch.no_grad():  # the prefix is each row's caption, so the two read the same
        logits = lm(inputs_embeds=table(torch.cat([torch.tensor(captions), tokens], 1))).logits
        assert text_teacher_loss(lm, logits, 3, teacher) < 1e-5
        noise = torch.cat([torch.randn(2, 3, 16), table(tokens)], 1)
        assert text_teacher_loss(lm, lm(inputs_embeds=noise).logits, 3, teacher) > 1e-3


def test_each_row_is_read_after_its_own_caption_and_padding_is_not_taught():
    """Captions of two lengths in one batch, against the loss worked out row by row."""
    lm = tiny_lm()
    captions, texts = [[5, 6], [4, 8, 9, 10, 3]], [[11, 12, 13, 14], [15, 16]]
    teacher = teacher_of(captions, texts)
    student = torch.randn(2, 3 + 4, 40)  # a 3-vector prefix, then 4 text positions
    expected, count = 0.0, 0
    with torch.no_grad():
        for row, (caption, text) in enumerate(zip(captions, texts, strict=True)):
            read = lm(input_ids=torch.tensor([caption + text])).logits[0]
            target = read[len(caption) - 1 : len(caption) - 1 + len(text)].log_softmax(-1)
            mine = student[row, 2 : 2 + len(text)].log_softmax(-1)
            expected += F.kl_div(mine, target, log_target=True, reduction="sum")
            count += len(text)
        torch.testing.assert_close(text_teacher_loss(lm, student, 3, teacher), expected / count)


def test_shapeworld_prefix_stage_teaches_questions_from_the_caption(tmp_path, monkeypatch):
    seen = []

    def recording(lm, logits, prefix_length, teacher):
        seen.append(teacher)
        return text_teacher_loss(lm, logits, prefix_length, teacher)

    monkeypatch.setattr(vlm.training.prefix, "text_teacher_loss", recording)
    config = TrainConfig(
        out=tmp_path, size="tiny", batch_size=16, clip_steps=2, clip_examples=64,
        lm_steps=2, lm_examples=300, lm_batch_size=4, prefix_steps=6, prefix_examples=64,
        prefix_batch_size=8, prefix_context=0.0, prefix_text_teacher=1.0,
        checkpoint_every=10_000,
    )  # fmt: skip
    pipeline = train(config)  # the trainer's own check: no gradient reaches the frozen LM
    assert len(seen) == 6
    tokenizer = pipeline.tokenizer
    taught = 0
    for ids, starts, mask in seen:
        for row, start, row_mask in zip(ids.tolist(), starts.tolist(), mask, strict=True):
            text = tokenizer.decode(row[start : start + int(row_mask.sum())])
            if row_mask.any():  # a question, read after the image's caption line
                taught += 1
                caption = tokenizer.decode(row[:start])
                assert caption.startswith("Caption: a ") and caption.endswith("\n"), caption
                assert text.startswith("Question: ") and " Answer: " in text, text
            else:  # a caption item: nothing to read before it
                assert start == 1
    assert 0 < taught < 6 * 8
    # the teacher is the frozen LM reading captions: with --finetune-lm it is refused
    with pytest.raises(ValueError, match="frozen LM"):
        train(TrainConfig(**{**config.__dict__, "stages": ("prefix",), "finetune_lm": True}))


def test_rows_without_a_teacher_change_nothing():
    """A caption row (mask all zero) neither adds to the loss nor is read by the teacher."""
    lm = tiny_lm()
    ids, starts, mask = teacher_of([[5, 6], [4, 8, 9]], [[11, 12, 13], [15, 16, 17]])
    student = torch.randn(2, 3 + 3, 40)
    with torch.no_grad():
        alone = text_teacher_loss(lm, student[:1], 3, (ids[:1, :5], starts[:1], mask[:1]))
        mask[1] = 0
        torch.testing.assert_close(text_teacher_loss(lm, student, 3, (ids, starts, mask)), alone)
        mask[0] = 0
        assert text_teacher_loss(lm, student, 3, (ids, starts, mask)) == 0


def test_a_mapper_that_reads_the_question_is_taught_from_the_object_it_names(tmp_path, monkeypatch):
    """ShapeWorld's teacher lines: before a question about one object's colour, shape or size
    (or whether it is there) the teacher reads that object's caption alone, and its answer is
    in that line; other questions are read after the scene's caption."""
    seen = []

    def recording(lm, logits, prefix_length, teacher):
        seen.append(teacher)
        return text_teacher_loss(lm, logits, prefix_length, teacher)

    monkeypatch.setattr(vlm.training.prefix, "text_teacher_loss", recording)
    mapper = dict(kind="transformer", prefix_length=4, num_layers=1, num_heads=2,
                  reads_prompt=True)  # fmt: skip
    config = TrainConfig(
        out=tmp_path, size="tiny", batch_size=16, clip_steps=2, clip_examples=64,
        lm_steps=2, lm_examples=300, lm_batch_size=4, prefix_steps=12, prefix_examples=64,
        prefix_batch_size=8, prefix_context=0.0, mapper=mapper, checkpoint_every=10_000,
    )  # fmt: skip
    tokenizer = train(config).tokenizer  # the teacher's weight: the dataset's (1.0)
    about_one = about_scene = 0
    for ids, starts, mask in seen:
        for row, start, row_mask in zip(ids.tolist(), starts.tolist(), mask, strict=True):
            if not row_mask.any():
                continue
            line = tokenizer.decode(row[:start]).strip().removeprefix("Caption: ")
            text = tokenizer.decode(row[start : start + int(row_mask.sum())])
            question, answer = text.removeprefix("Question: ").split(" Answer: ")
            answer = answer.removesuffix(tokenizer.eos_token).strip()
            kind = sw.question_type(question)
            if kind in ("color", "shape", "size"):  # always about one object
                assert " left of " not in line, (line, text)  # that object alone
                (obj,) = sw.referents(_scene_of(line), question)
                assert getattr(obj, kind) == answer, (line, text)
                about_one += 1
            elif kind in ("count", "relation") and " left of " in line:
                about_scene += 1  # the scene's caption, all of its objects
    assert about_one > 0 and about_scene > 0


def _scene_of(caption: str) -> sw.Scene:
    """The objects a canonical caption names (positions made up, left to right)."""
    objects = []
    for i, part in enumerate(caption.split(" left of ")):
        _, size, color, shape = part.split()
        objects.append(sw.Obj(shape, color, size, 0.1 + 0.3 * i, 0.5))
    return sw.Scene(tuple(objects))
