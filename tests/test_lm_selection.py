"""LM selection (`--lm-candidates`): LM trainings from their own initialisations on the same
text, the one with the lowest loss on held-out text going on to the last step; and a stage's
checkpoint holds its own module, so a run resumes the LM stage after the CLIP stage ran in the
same process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vlm.training import TrainConfig, train

TINY = dict(size="tiny", batch_size=32, clip_examples=256, lm_examples=400, lm_lr=3e-3,
            checkpoint_every=100, val_every=0)  # fmt: skip


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def step_of(out, name: str) -> int:
    return json.loads((out / "checkpoints" / name / "step.json").read_text())["step"]


def test_the_candidate_with_the_lowest_held_out_loss_goes_on(tmp_path):
    config = TrainConfig(out=tmp_path, stages=("lm",), lm_steps=12, lm_candidates=3,
                         lm_select_steps=6, **TINY)  # fmt: skip
    train(config)
    (choice,) = [r for r in rows(tmp_path) if r["stage"] == "lm-selection"]
    losses, chosen = choice["candidates"], choice["chosen"]
    assert len(losses) == 3 and len(set(losses)) == 3  # each its own initialisation
    assert losses[chosen] == min(losses)
    for k in range(3):  # the others stopped at the choice, the chosen one went on
        assert step_of(tmp_path, f"lm-{k}") == (12 if k == chosen else 6)
    logged = [r["step"] for r in rows(tmp_path) if r["stage"] == f"lm-{chosen}" and "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 11 and 6 <= logged[-2] < 11
    # the saved LM is the chosen one's, trained on: its checkpoint's weights at the last step
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").state_dict()
    for k in range(3):
        weights = load_file(tmp_path / "checkpoints" / f"lm-{k}" / "model.safetensors")
        same = all(torch.equal(saved[name].float(), v.float()) for name, v in weights.items())
        assert same == (k == chosen)


def test_one_candidate_is_the_plain_lm_stage(tmp_path):
    train(TrainConfig(out=tmp_path, stages=("lm",), lm_steps=6, **TINY))
    assert not [r for r in rows(tmp_path) if r["stage"] == "lm-selection"]
    assert step_of(tmp_path, "lm") == 6


def test_the_lm_stage_resumes_after_the_clip_stage_ran_in_the_same_process(tmp_path):
    # the LM stage's checkpoint must hold the LM alone: with the CLIP model in it too, resuming
    # in a new process (where only the LM is prepared) loaded the CLIP weights into the LM
    config = TrainConfig(out=tmp_path, stages=("clip", "lm"), clip_steps=4, lm_steps=8, **TINY)
    train(config)
    (tmp_path / "lm" / "done").unlink()
    config.resume, config.lm_steps = True, 12
    train(config)
    logged = [r["step"] for r in rows(tmp_path) if r["stage"] == "lm" and "loss" in r]
    assert logged.count(0) == 1 and logged[-1] == 11  # picked up at step 8, not from scratch


def test_selection_without_held_out_text_is_refused(tmp_path, monkeypatch):
    from vlm.shapeworld.recipe import ShapeWorld

    monkeypatch.delattr(ShapeWorld, "selection_texts")
    config = TrainConfig(out=tmp_path, stages=("lm",), lm_steps=4, lm_candidates=2, **TINY)
    with pytest.raises(ValueError, match="held-out text to choose by"):
        train(config)
    assert not (tmp_path / "checkpoints").exists()  # refused before any candidate trained
