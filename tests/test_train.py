"""The trainer, end to end on tiny dims: it runs, lowers its losses, resumes, and leaves the
encoder and the LM bit-identical while it trains the prefix."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.encoder import Encoder
from vlm.training import TrainConfig, train

SMALL = dict(
    size="tiny", batch_size=32, clip_examples=256, lm_examples=400, prefix_examples=256,
    clip_lr=1e-3, lm_lr=3e-3, prefix_lr=1e-2,
)  # fmt: skip


def losses(out, stage):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["stage"] == stage and "loss" in r]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    config = TrainConfig(out=out, clip_steps=80, lm_steps=250, prefix_steps=150, **SMALL)
    pipeline = train(config)
    return out, config, pipeline


def test_every_stage_lowers_its_loss(run):
    out, _, _ = run
    # measured (best of the last three logged losses / the first): clip 0.43, lm 0.05, prefix
    # 0.89; the prefix stage starts near the LM's own loss on the text, so its drop is smaller
    for stage, factor in (("clip", 0.6), ("lm", 0.15), ("prefix", 0.93)):
        curve = [loss for _, loss in losses(out, stage)]
        assert min(curve[-3:]) < factor * curve[0], (stage, curve)


def test_a_run_writes_a_familiarity_profile_of_its_training_images(run):
    out, config, pipeline = run
    from vlm.familiarity import PROFILE_NAME

    saved = Pipeline.from_pretrained(config.bundle or out / "pipeline", device="cpu")
    assert (Path(config.bundle or out / "pipeline") / PROFILE_NAME).is_file()
    rng = random.Random("profile-test")
    scenes = [sw.render(sw.sample_scene(rng)) for _ in range(40)]
    assert np.mean([f.familiar for f in saved.familiarity(scenes)]) >= 0.9
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert saved.familiarity([noise])[0].familiar is False


def test_a_run_writes_a_calibration_from_held_out_scenes(run):
    out, config, _ = run
    folder = Path(config.bundle or out / "pipeline")
    saved = Pipeline.from_pretrained(folder, device="cpu")
    calibration = saved.calibration
    assert calibration is not None and "ShapeWorld" in calibration.fitted_on
    assert calibration.experts is not None and calibration.answers.slope <= 1.0
    assert len(calibration.matches) == 101  # search scores read as percentiles of true matches
    image = sw.render(sw.sample_scene(random.Random("calibration-test")))
    assert saved.caption([image], return_words=True)[0].calibrated


def test_prefix_stage_leaves_encoder_and_lm_bit_identical(run):
    out, _, pipeline = run
    encoder = Encoder.load({"model": f"local-dir:{out / 'encoder'}"})
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(pipeline.encoder.model.state_dict()[key].cpu(), value), key
    lm = AutoModelForCausalLM.from_pretrained(out / "lm")
    for key, value in lm.state_dict().items():
        assert torch.equal(pipeline.lm.state_dict()[key].cpu(), value), key


def test_the_ablation_fine_tunes_the_lm_with_the_mapper(run, tmp_path):
    """--finetune-lm (ClipCap's other variant, for the frozen-vs-finetuned table): the prefix
    stage trains the LM too, from the same encoder and LM; the encoder stays as it was."""
    out, _, _ = run
    for part in ("encoder", "lm"):
        shutil.copytree(out / part, tmp_path / part)
    config = TrainConfig(out=tmp_path, stages=("prefix",), prefix_steps=20, finetune_lm=True,
                         **SMALL)  # fmt: skip
    tuned = train(config)
    lm = AutoModelForCausalLM.from_pretrained(out / "lm")
    changed = [
        k for k, v in lm.state_dict().items() if not torch.equal(tuned.lm.state_dict()[k].cpu(), v)
    ]
    assert len(changed) > len(lm.state_dict()) // 2, changed
    assert not any(p.requires_grad for p in tuned.lm.parameters())  # frozen again for serving
    encoder = Encoder.load({"model": f"local-dir:{out / 'encoder'}"})
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(tuned.encoder.model.state_dict()[key].cpu(), value), key


def test_bundle_loads_and_is_fp16_on_disk(run):
    out, _, trained = run
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
    # what loads is the trained model, rounded to fp16 once
    for part in ("mapper", "lm"):
        saved, live = getattr(pipeline, part).state_dict(), getattr(trained, part).state_dict()
        assert saved.keys() == live.keys()
        for key, value in live.items():
            assert torch.equal(saved[key], value.cpu().half().float()), (part, key)


def test_resume_continues_from_the_checkpoint(tmp_path):
    config = TrainConfig(out=tmp_path, stages=("clip",), clip_steps=10, checkpoint_every=5, **SMALL)
    train(config)
    first = losses(tmp_path, "clip")
    trained = Encoder.load({"model": f"local-dir:{tmp_path / 'encoder'}"}).model.state_dict()
    # resumed at its end, the stage has no step left: the encoder it saves is what it restored
    config.resume = True
    (tmp_path / "encoder" / "done").unlink()  # pretend the run stopped before finishing
    train(config)
    assert losses(tmp_path, "clip") == first  # no step ran
    restored = Encoder.load({"model": f"local-dir:{tmp_path / 'encoder'}"}).model.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in trained.items())
    config.clip_steps = 20
    (tmp_path / "encoder" / "done").unlink()
    train(config)
    steps = [s for s, _ in losses(tmp_path, "clip")]
    assert steps[: len(first)] == [s for s, _ in first]
    assert steps[len(first)] == 10  # picked up at the checkpoint, not from scratch


def test_caption_head_learns_captions_from_patch_tokens_and_skips_padding():
    """CoCa's captioning loss in the CLIP stage: the head must be able to write a caption from
    the patch tokens (so the encoder is pushed to keep what the caption says), and padding is
    never a target."""
    from vlm.caption_head import CaptionHead

    torch.manual_seed(0)
    tokens = torch.tensor([[49406, 320, 1901, 49407, 0, 0], [49406, 320, 1746, 2866, 49407, 0]])
    head = CaptionHead(sorted(set(tokens.unique().tolist())), width=32, layers=1,
                       context_length=9)  # fmt: skip
    patches = torch.randn(2, 4, 32)
    padded_more = torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    assert torch.allclose(head(patches, tokens), head(patches, padded_more), atol=1e-5)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    first = head(patches, tokens).item()
    for _ in range(60):
        loss = head(patches, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
    # what it writes depends on the image: the other image's patches make its captions unlikely
    assert head(patches.flip(0), tokens).item() > 5 * loss.item()
    # and it writes them: greedy decoding gives each image's caption, without start and end
    assert head.generate(patches, start=49406, end=49407) == [[320, 1901], [320, 1746, 2866]]


def test_clip_stage_with_captioning_loss_trains_and_saves_a_plain_open_clip(tmp_path):
    """`clip_caption_weight` > 0 (the default) adds CoCa's captioning loss; the decoder is
    training-only, so the saved encoder is the same open_clip CLIP as without it (same keys,
    loads as usual)."""
    config = TrainConfig(out=tmp_path, stages=("clip",), clip_steps=60, clip_caption_weight=1.0,
                         **SMALL)  # fmt: skip
    train(config)
    curve = [loss for _, loss in losses(tmp_path, "clip")]
    assert min(curve[-2:]) < 0.8 * curve[0], curve
    encoder = Encoder.load({"model": f"local-dir:{tmp_path / 'encoder'}"})
    train(TrainConfig(out=tmp_path / "plain", stages=("clip",), clip_steps=1,
                      clip_caption_weight=0.0, **SMALL))  # fmt: skip
    plain = Encoder.load({"model": f"local-dir:{tmp_path / 'plain' / 'encoder'}"})
    assert encoder.model.state_dict().keys() == plain.model.state_dict().keys()


def test_answer_mask_marks_only_the_answers_in_packed_text(run):
    from transformers import AutoTokenizer

    from vlm.training.text_batches import answer_mask, pack_texts

    tokenizer = AutoTokenizer.from_pretrained(run[0] / "lm")
    documents = [
        "Caption: a small red circle\nQuestion: is there a red circle? Answer: yes\n"
        "Question: what color is the circle? Answer: red",
        "Question: how many shapes are there? Answer: one",
    ]
    length = sum(len(tokenizer(d)["input_ids"]) + 1 for d in documents)  # one block, EOS each
    blocks = pack_texts(tokenizer, documents, length)
    marked = blocks[answer_mask(tokenizer, blocks, "Answer:")]
    assert tokenizer.decode(marked).split() == ["yes", "red", "one"]  # not the newline or EOS
    # in short blocks, a block that starts inside an answer cannot tell: nothing there is marked
    blocks = pack_texts(tokenizer, documents, 8)
    marked = tokenizer.decode(blocks[answer_mask(tokenizer, blocks, "Answer:")])
    assert marked and set(marked) <= set(" yesredone")


def test_answer_mask_reads_many_cues_as_each_cue_alone(run):
    from transformers import AutoTokenizer

    from vlm.training.text_batches import answer_mask, pack_texts

    tokenizer = AutoTokenizer.from_pretrained(run[0] / "lm")
    documents = [
        "Caption: a small red circle\nBako ~ red\nCaption: a large star\nTag -> star\nzu: one",
        "Question: how many shapes are there? Answer: one\nTag: two",
    ]
    length = sum(len(tokenizer(d)["input_ids"]) + 1 for d in documents)  # one block, EOS each
    blocks = pack_texts(tokenizer, documents, length)
    cues = ["Bako ~", "Tag ->", "Tag:", "zu:", "Nowhere ="]
    together = answer_mask(tokenizer, blocks, "Answer:", cues)
    alone = [answer_mask(tokenizer, blocks, "", [c]) for c in cues]
    answers = answer_mask(tokenizer, blocks, "Answer:")
    assert torch.equal(together, torch.stack(alone).any(0) | answers)
    assert tokenizer.decode(blocks[together]).split() == ["red", "star", "one", "one", "two"]
    # a cue that ends inside a longer one ("Tag -" in "Tag ->") does not make the rest an answer
    marked = tokenizer.decode(blocks[answer_mask(tokenizer, blocks, "", ["Tag -", "Tag ->"])])
    assert marked.split() == ["star"]


@pytest.mark.parametrize("base, length", [(5, 3), (7, 20), (400, 9), (50257, 5), (3, 30)])
def test_windows_are_found_exactly_whatever_their_length(base, length):
    from vlm.training.text_batches import _rows_in

    generator = torch.Generator().manual_seed(base)
    windows = torch.randint(0, base, (50, 200), generator=generator).unfold(1, length, 1)
    picked = windows[torch.randint(0, 50, (20,)), torch.randint(0, windows.shape[1], (20,))]
    rows = torch.cat([picked, torch.randint(0, base, (30, length), generator=generator)])
    naive = (windows[:, :, None, :] == rows).all(-1).any(-1)
    assert naive.sum() >= 20 and torch.equal(_rows_in(windows, rows, base), naive)


def test_the_trainer_reports_its_progress_in_order_and_stops_when_asked(tmp_path):
    """The library call the CLI and the page share: events in order, samples captioned as
    the prefix stage learns, and a stop that leaves a checkpoint a resumed run goes on from."""
    import threading

    from vlm.training import Progress

    events, stop = [], threading.Event()

    def on_event(event):
        events.append(event)
        if event.kind == "step" and event.stage == "prefix" and event.step >= 21:
            stop.set()  # as the page's Stop button does

    config = TrainConfig(out=tmp_path, clip_steps=20, lm_steps=30, prefix_steps=60,
                         checkpoint_every=1000, **SMALL)  # fmt: skip
    progress = Progress(on_event, stop, sample_every=10)
    assert train(config, progress) is None  # stopped: no model
    kinds = [(e.kind, e.stage) for e in events]
    assert kinds[0] == ("stage", "clip") and kinds[-1] == ("stopped", "prefix")
    stages = [stage for kind, stage in kinds if kind == "stage"]
    assert stages == ["clip", "lm", "prefix"]
    for stage in stages:  # steps counted up within each stage, each with its loss
        steps = [e.step for e in events if e.kind == "step" and e.stage == stage]
        assert steps == sorted(steps) and steps[0] == 1
        assert all(e.loss > 0 for e in events if e.kind == "step" and e.stage == stage)
    samples = [e.samples for e in events if e.kind == "samples"]
    assert len(samples) == 2 and all(len(s) == 4 for s in samples)  # after steps 10 and 20
    assert all(isinstance(c, str) for s in samples for c in s.values())
    seconds = [e.seconds for e in events]
    assert seconds == sorted(seconds)
    stopped = events[-1]
    assert stopped.step == 21  # the step event after step 21 asked it to stop
    assert json.loads((tmp_path / "checkpoints" / "prefix" / "step.json").read_text()) == {
        "step": 21}  # fmt: skip
    # the stopped stage goes on from its checkpoint; the finished ones are not run again
    events.clear()
    config.resume = True
    pipeline = train(config, Progress(events.append))
    assert pipeline is not None and events[-1].kind == "done"
    assert [(e.kind, e.stage, e.step) for e in events if e.kind == "stage"] == [
        ("stage", "prefix", 21)]  # fmt: skip
    assert Pipeline.from_pretrained(events[-1].path, device="cpu").caption(
        [sw.render(sw.sample_scene(random.Random(0)))])[0]  # fmt: skip
