"""Prefix-stage rows of two (image, text) items (`TrainConfig.prefix_context`): the frozen LM
reads the second prefix after the first item, as in a k-shot list, and both are scored."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import vlm.training.prefix
from vlm.sequences import prefix_loss
from vlm.training import TrainConfig, train


def tiny_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).eval()


def labelled(tokens: list[int], scored_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = [-100] * scored_from + tokens[scored_from:]
    return torch.tensor(tokens), torch.tensor(labels)


def test_context_rows_are_one_unpadded_sequence_scored_on_both_items():
    lm = tiny_lm()
    prefix, before_prefix = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    # the context's first row is shorter: its padding (label -100) must not sit between items
    before_rows = [labelled([5, 6, 7], 1), labelled([8, 9, 10, 11, 12], 1)]
    rows = [labelled([13, 14, 15, 16], 1), labelled([17, 18], 0)]
    pad = lambda r, v: torch.nn.utils.rnn.pad_sequence(r, batch_first=True, padding_value=v)  # noqa: E731
    before_tokens = pad([t for t, _ in before_rows], 0)
    before = (before_prefix, before_tokens, pad([y for _, y in before_rows], -100))
    tokens, labels = pad([t for t, _ in rows], 0), pad([y for _, y in rows], -100)
    with torch.no_grad():
        batched = prefix_loss(lm, prefix, tokens, labels, before)
        table = lm.get_input_embeddings()
        total, count = 0.0, 0
        for i in range(2):  # each row by hand: [context prefix][its text][prefix][text]
            (bt, by), (t, y) = before_rows[i], rows[i]
            inputs = torch.cat([before_prefix[i], table(bt), prefix[i], table(t)])[None]
            ignore = torch.full((3,), -100)
            target = torch.cat([ignore, by, ignore, y])
            logits = lm(inputs_embeds=inputs).logits[0, :-1]
            losses = F.cross_entropy(logits, target[1:], reduction="none", ignore_index=-100)
            total, count = total + losses.sum(), count + int((target[1:] != -100).sum())
    torch.testing.assert_close(batched, total / count)
    # and the context changes the second item's loss: it is read, not just concatenated away
    with torch.no_grad():
        assert not torch.isclose(batched, prefix_loss(lm, prefix, tokens, labels))


def test_a_context_item_ends_its_line_without_eos(saved_pipeline):
    from vlm import Pipeline

    pipeline = Pipeline.from_pretrained(saved_pipeline, device="cpu")
    tokenizer = pipeline.tokenizer
    tokens, labels = pipeline.sequences.training_rows([" a red square\n"], ["Caption:"], eos=False)
    ids = tokenizer("Caption: a red square\n", add_special_tokens=False)["input_ids"]
    assert tokens[0].tolist() == ids and tokenizer.eos_token_id not in labels[0].tolist()
    scored = [i for i in labels[0].tolist() if i != -100]
    assert tokenizer.decode(scored) == " a red square\n"


def test_shapeworld_prefix_stage_trains_on_rows_of_two(tmp_path, monkeypatch):
    calls, tokens = [], []

    def recording(lm, prefix, tokens_, labels, context=None):
        calls.append(context)
        if context is not None:
            tokens.append(tokens_)
        return prefix_loss(lm, prefix, tokens_, labels, context)

    monkeypatch.setattr(vlm.training.prefix, "prefix_loss", recording)
    config = TrainConfig(
        out=tmp_path, size="tiny", batch_size=16, clip_steps=2, clip_examples=64,
        lm_steps=2, lm_examples=300, lm_batch_size=4, prefix_steps=20, prefix_examples=64,
        prefix_batch_size=2, prefix_context=1.0, prefix_text_teacher=0.0,
        checkpoint_every=10_000,
    )  # fmt: skip
    train(config)  # (no text teacher: rows of one would not go through prefix_loss)
    paired = [c for c in calls if c is not None]
    # every batch is asked for rows of two, but the tiny LM reads only 64 positions: a row of
    # two that would not fit is read as two rows of one (seeded: both happen)
    assert 0 < len(paired) < len(calls) == 20
    assert all(c[0].shape[0] == 1 for c in paired)  # half the batch: 2 items in 1 row
    pairs = zip(paired, tokens, strict=True)
    assert all(2 * 4 + c[1].shape[1] + t.shape[1] <= 64 for c, t in pairs)
    losses = [row["loss"] for row in map(json.loads, (tmp_path / "log.jsonl").open())
              if row.get("stage") == "prefix" and "loss" in row]  # fmt: skip
    assert losses and all(torch.isfinite(torch.tensor(losses)))
