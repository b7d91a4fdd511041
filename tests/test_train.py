"""The trainer, end to end on tiny dims: it runs, lowers its losses, resumes, and leaves the
encoder and the LM bit-identical while it trains the prefix."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from vlm import Pipeline
from vlm.encoder import Encoder
from vlm.train import TrainConfig, train

SMALL = dict(
    size="tiny", batch_size=32, clip_examples=256, lm_examples=400, prefix_examples=256,
    clip_lr=1e-3, lm_lr=3e-3, prefix_lr=1e-2,
)  # fmt: skip


def losses(out, stage):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["stage"] == stage]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    config = TrainConfig(out=out, clip_steps=80, lm_steps=250, prefix_steps=150, **SMALL)
    pipeline = train(config)
    return out, config, pipeline


def test_every_stage_lowers_its_loss(run):
    out, _, _ = run
    # the tiny prefix stage starts near the LM's own loss on the text, so its drop is smaller
    for stage, factor in (("clip", 0.9), ("lm", 0.9), ("prefix", 0.95)):
        curve = [loss for _, loss in losses(out, stage)]
        assert min(curve[-3:]) < factor * curve[0], (stage, curve)


def test_prefix_stage_leaves_encoder_and_lm_bit_identical(run):
    out, _, pipeline = run
    encoder = Encoder.load({"model": f"local-dir:{out / 'encoder'}"})
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(pipeline.encoder.model.state_dict()[key].cpu(), value), key
    lm = AutoModelForCausalLM.from_pretrained(out / "lm")
    for key, value in lm.state_dict().items():
        assert torch.equal(pipeline.lm.state_dict()[key].cpu(), value), key


def test_bundle_loads_and_is_fp16_on_disk(run):
    out, _, _ = run
    from safetensors import safe_open

    for weights in ("mapper.safetensors", "lm/model.safetensors"):
        with safe_open(out / "pipeline" / weights, "pt") as handle:
            keys = list(handle.keys())
            assert all(handle.get_tensor(k).dtype == torch.float16 for k in keys)
    assert "lm_head.weight" not in keys  # tied to the LM's input embedding: saved once
    lm_config = json.loads((out / "pipeline" / "lm" / "config.json").read_text())
    assert lm_config["dtype"] == "float16"  # what is on disk, not the live model's float32
    pipeline = Pipeline.from_pretrained(out / "pipeline", device="cpu")
    assert pipeline.config.caption_prompt == "Caption:"
    assert isinstance(pipeline.caption([torch.zeros(32, 32, 3).numpy()], max_new_tokens=4)[0], str)


def test_resume_continues_from_the_checkpoint(tmp_path):
    config = TrainConfig(out=tmp_path, stages=("clip",), clip_steps=10, checkpoint_every=5, **SMALL)
    train(config)
    first = losses(tmp_path, "clip")
    config.clip_steps, config.resume = 20, True
    (tmp_path / "encoder" / "done").unlink()  # pretend the run stopped before finishing
    train(config)
    steps = [s for s, _ in losses(tmp_path, "clip")]
    assert steps[: len(first)] == [s for s, _ in first]
    assert steps[len(first)] == 10  # picked up at the checkpoint, not from scratch
