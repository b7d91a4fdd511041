"""The prefix stage's text teacher (`TrainConfig.prefix_text_teacher`): the frozen LM reading
an image's caption as text teaches it, token by token, how to read a question after the
image's prefix (KL between the two next-token distributions)."""

from __future__ import annotations

import torch
from test_prefix_context import tiny_lm
from torch.nn.utils.rnn import pad_sequence

import vlm.train
from vlm.train import TrainConfig, text_teacher_loss, train


def test_a_prefix_that_reads_as_the_caption_has_no_teacher_loss():
    """Rows of two lengths: the teacher's logits are found after each row's own caption, and
    the padding of a shorter row is not taught."""
    lm = tiny_lm()
    table = lm.get_input_embeddings()
    captions = [[5, 6, 7], [8, 9, 10]]  # the student's prefix is as long as each caption
    texts = [[11, 12, 13, 14], [15, 16]]
    teacher_ids = pad_sequence([torch.tensor(c + t) for c, t in zip(captions, texts, strict=True)],
                               batch_first=True)  # fmt: skip
    tokens = pad_sequence([torch.tensor(t) for t in texts], batch_first=True, padding_value=39)
    mask = (torch.arange(4)[None] < torch.tensor([[4], [2]])).float()
    teacher = (teacher_ids, torch.tensor([3, 3]), mask)
    with torch.no_grad():
        as_caption = table(torch.tensor(captions))
        inputs = torch.cat([as_caption, table(tokens)], 1)
        student = lm(inputs_embeds=inputs).logits[:, 2:6]
        assert text_teacher_loss(lm, student, teacher) < 1e-5
        noise = torch.cat([torch.randn(2, 3, 16), table(tokens)], 1)
        assert text_teacher_loss(lm, lm(inputs_embeds=noise).logits[:, 2:6], teacher) > 1e-3
        # a row whose caption is longer than the prefix is read at its own offset
        longer = torch.tensor([[4, 5, 6, 7, *texts[0]]])
        shifted = (longer, torch.tensor([4]), mask[:1])
        student = lm(inputs_embeds=table(longer)).logits[:, 3:7]
        assert text_teacher_loss(lm, student, shifted) < 1e-5


def test_shapeworld_prefix_stage_teaches_questions_from_the_caption(tmp_path, monkeypatch):
    seen = []

    def recording(lm, student, teacher):
        seen.append((lm, teacher))
        return text_teacher_loss(lm, student, teacher)

    monkeypatch.setattr(vlm.train, "text_teacher_loss", recording)
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
    for _, (ids, starts, mask) in seen:
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
