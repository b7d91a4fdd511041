"""A new user's own data, offline: a CSV and a folder of images captioned in their own words
train a small LM and a mapper on the tiny test encoder, validate while training, are scored on
the held-out part at the end, and the saved folder serves captions. Also: early stopping on
the validation loss, and a resumed run's progress bar and log."""

from __future__ import annotations

import csv
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_data import write_images

import vlm.training.loop as train_module
from vlm import Pipeline, PrefixMapper
from vlm import shapeworld as sw
from vlm.cli import main as cli
from vlm.data import FileDataset
from vlm.factory import build_encoder, build_lm, build_pipeline, train_tokenizer
from vlm.training import MODEL_SIZES, TrainConfig
from vlm.training.loop import Stage, run_stage

# how this user writes captions: not ShapeWorld's canonical sentence
STYLES = [
    "My picture: one {size} {color} {shape}.",
    "A {color} {shape} ({size}) sits on black.",
    "Just a {shape}, {color} and {size}.",
]


def save_random_pipeline(folder: Path) -> Path:
    """A tiny untrained pipeline (open_clip encoder, GPT-2, mapper) saved as a folder: parts
    to start from in seconds, where what is tested does not depend on what they learned."""
    torch.manual_seed(0)
    texts = [c for i, s in enumerate(own_scenes(24)) for c in own_captions(s, i)]
    tokenizer = train_tokenizer(texts * 4, 300)
    lm = build_lm(tokenizer, **MODEL_SIZES["tiny"]["lm"])
    encoder = build_encoder(MODEL_SIZES["tiny"]["clip"])
    build_pipeline(encoder, lm, tokenizer, {"prefix_length": 4}, device="cpu").save_pretrained(
        folder, dtype=torch.float32
    )
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    return save_random_pipeline(tmp_path_factory.mktemp("parts") / "pipeline")


def own_captions(scene: sw.Scene, i: int) -> list[str]:
    (obj,) = scene.objects
    fields = dict(size="big" if obj.size == "large" else "little", color=obj.color,
                  shape=obj.shape)  # fmt: skip
    return [style.format(**fields) for style in random.Random(i).sample(STYLES, 2)]


def own_scenes(n: int) -> list[sw.Scene]:
    rng = random.Random(7)
    return [sw.sample_scene(rng, n_objects=1) for _ in range(n)]


@pytest.fixture(scope="module")
def own_csv(tmp_path_factory) -> Path:
    """photos/NNNNN.jpg and mine.csv, one row per caption (two per image)."""
    root = tmp_path_factory.mktemp("own-csv")
    items = own_scenes(24)
    paths = write_images(root / "photos", items)
    with (root / "mine.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "caption"])
        for i, (path, scene) in enumerate(zip(paths, items, strict=True)):
            writer.writerows([f"photos/{path.name}", c] for c in own_captions(scene, i))
    return root / "mine.csv"


def own_folder(root: Path, items: list[sw.Scene]) -> Path:
    """Images with a sidecar .txt of two captions each."""
    for i, (path, scene) in enumerate(zip(write_images(root, items), items, strict=True)):
        path.with_suffix(".txt").write_text("\n".join(own_captions(scene, i)) + "\n")
    return root


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def own_train(data: Path, out: Path, saved: Path, *extra: str) -> list[str]:
    """A small LM trained on the captions (no --lm) and a mapper, on the tiny test encoder."""
    return [
        "train", "--data", str(data), "--out", str(out), "--size", "tiny",
        "--encoder", f"local-dir:{saved / 'encoder'}", "--lm-steps", "60", "--prefix-steps",
        "60", "--val-every", "20", "--checkpoint-every", "1000", "--prefix-lr", "3e-3", *extra,
    ]  # fmt: skip


def check_run(out: Path, held_out: int, printed: str) -> None:
    rows = log_rows(out)
    val = {stage: [r["val_loss"] for r in rows if r.get("stage") == stage and "val_loss" in r]
           for stage in ("lm", "prefix")}  # fmt: skip
    assert len(val["lm"]) == 3 and len(val["prefix"]) == 3, val  # every 20 of 60 steps
    assert val["lm"][-1] < val["lm"][0] and val["prefix"][-1] < val["prefix"][0]
    (scores,) = [r for r in rows if r.get("stage") == "eval"]
    assert scores["images"] == held_out and {"BLEU-4", "CIDEr", "ROUGE-L"} <= set(scores["scores"])
    assert f"held-out evaluation ({held_out} images)" in printed and "| CIDEr |" in printed


def test_csv_in_own_words_trains_validates_evaluates_and_serves(own_csv, parts,
                                                                tmp_path, capsys):  # fmt: skip
    out = tmp_path / "run"
    cli(own_train(own_csv, out, parts, "--val-fraction", "0.25"))
    printed = capsys.readouterr().out
    dataset = FileDataset([own_csv], val_fraction=0.25)
    held = {e.image for e in dataset.val_examples()}
    trained = {e.image for e in dataset.examples()}
    assert held and not held & trained and len(held | trained) == 24  # by image, not by row
    assert f"{2 * len(trained)} examples" in printed  # the training rows, two per image
    check_run(out, len(held), printed)

    pipeline = Pipeline.from_pretrained(out / "pipeline", device="cpu")
    (caption,) = pipeline.caption(sorted(held)[0])
    assert caption.strip() and pipeline.tokenizer.vocab_size <= 300  # its own small LM
    # the user's own eval command on the held-out part gives the scores the run logged
    held_csv = tmp_path / "held.csv"
    with held_csv.open("w", newline="") as handle:
        csv.writer(handle).writerows([("image_path", "caption")] + [
            (str(e.image), c) for e in dataset.val_examples() for c in e.captions
        ])  # fmt: skip
    cli(["eval", "captions", "--data", str(held_csv), "--model", str(out / "pipeline"),
         "--json", "--max-new-tokens", "60"])  # fmt: skip
    scores = json.loads(capsys.readouterr().out)["scores"]
    (logged,) = [r["scores"] for r in log_rows(out) if r.get("stage") == "eval"]
    assert scores == pytest.approx(logged, abs=1e-6)
    for name, value in scores.items():  # numbers, each in its metric's range
        assert isinstance(value, float) and 0 <= value <= (10 if name == "CIDEr" else 1), name
    # and they measure what was learned: the untrained parts score lower on the same images
    cli(["eval", "captions", "--data", str(held_csv), "--model", str(parts), "--json",
         "--max-new-tokens", "20"])  # fmt: skip
    untrained = json.loads(capsys.readouterr().out)["scores"]
    assert scores["CIDEr"] > untrained["CIDEr"] + 0.1, (scores, untrained)
    assert scores["BLEU-1"] > untrained["BLEU-1"] and scores["ROUGE-L"] > untrained["ROUGE-L"]
    # captions cut by the token limit are said to be, not silently scored
    cli(["eval", "captions", "--data", str(own_csv), "--model", str(out / "pipeline"),
         "--max-new-tokens", "2"])  # fmt: skip
    captured = capsys.readouterr()
    assert "warning: 24 of 24 outputs reached --max-new-tokens 2" in captured.err
    assert "note: 24 of 24 outputs reached --max-new-tokens 2" in captured.out


def test_folder_with_sidecars_and_val_data(parts, tmp_path, capsys):
    items = own_scenes(30)
    train_dir = own_folder(tmp_path / "train", items[:24])
    val_dir = own_folder(tmp_path / "val", items[24:])
    out = tmp_path / "run"
    cli(own_train(train_dir, out, parts, "--val-data", str(val_dir)))
    printed = capsys.readouterr().out
    assert "24 examples" in printed  # every training image: --val-data replaces the fraction
    check_run(out, 6, printed)
    (caption,) = Pipeline.from_pretrained(out / "pipeline").caption(val_dir / "00000.jpg")
    assert caption.strip()


def test_tokens_mapper_trains_with_any_lm(own_csv, parts, tmp_path):
    """--mapper-input tokens with a given --lm: num_tokens defaults to the encoder's full
    patch grid (it was 0, and the pipeline crashed on (0 - 1) ** 0.5)."""
    out = tmp_path / "run"
    cli(["train", "--data", str(own_csv), "--out", str(out), "--encoder",
         f"local-dir:{parts / 'encoder'}", "--lm", str(parts / "lm"),
         "--mapper-input", "tokens", "--mapper-layers", "1", "--prefix-length", "4",
         "--prefix-steps", "2", "--no-eval"])  # fmt: skip
    pipeline = Pipeline.from_pretrained(out / "pipeline", device="cpu")
    grid = pipeline.encoder.model.visual.grid_size
    assert pipeline.mapper.config["num_tokens"] == 1 + grid[0] * grid[1]
    assert isinstance(pipeline.caption(sorted(own_csv.parent.glob("photos/*.jpg"))[0])[0], str)
    with pytest.raises(ValueError, match="needs num_tokens ≥ 1"):  # not a crash later
        PrefixMapper(kind="transformer", input="tokens")
    odd = PrefixMapper(kind="transformer", input="tokens", num_tokens=3, **_sizes(pipeline))
    with pytest.raises(ValueError, match="1 \\+ grid²"):  # a pipeline's encoder gives 1 + grid²
        Pipeline(pipeline.encoder, pipeline.lm, pipeline.tokenizer, odd, pipeline.config,
                 device="cpu").caption(sorted(own_csv.parent.glob("photos/*.jpg"))[0])  # fmt: skip


def test_prompt_reading_mapper_trains_through_the_frozen_lm(own_csv, parts, tmp_path):
    """--reads-prompt: the mapper reads the LM's hidden states of each item's prompt in the
    prefix stage (the trainer's check: no gradient reaches the LM), and the saved pipeline
    conditions its prefixes on them."""
    out = tmp_path / "run"
    cli(["train", "--data", str(own_csv), "--out", str(out), "--encoder",
         f"local-dir:{parts / 'encoder'}", "--lm", str(parts / "lm"), "--reads-prompt",
         "--mapper-layers", "1", "--prefix-length", "4", "--prefix-steps", "2",
         "--no-eval"])  # fmt: skip
    pipeline = Pipeline.from_pretrained(out / "pipeline", device="cpu")
    assert pipeline.mapper.config["prompt_dim"] == pipeline.lm.config.hidden_size
    image = sorted(own_csv.parent.glob("photos/*.jpg"))[0]
    asked = pipeline.prefix([image], ["Question: what color is it? Answer:"])
    assert (asked - pipeline.prefix([image])).abs().max() > 0
    assert isinstance(pipeline.answer(image, "what color is it?")[0], str)


def _sizes(pipeline) -> dict:
    config = pipeline.mapper.config
    names = ("clip_dim", "lm_dim", "prefix_length", "num_heads")
    return {**{name: config[name] for name in names}, "num_layers": 1}


# ---------------------------------------------------------------------------- the stage loop


def linear_stage(tmp_path, steps, validate=None, resume=False, stop_at=None, **options):
    """run_stage on a one-weight model; `stop_at` kills the run at that step."""
    torch.manual_seed(0)
    module = torch.nn.Linear(1, 1)
    config = TrainConfig(out=tmp_path, checkpoint_every=10, resume=resume, **options)

    def batches(start):
        for step in itertools.count(start):
            if step == stop_at:
                raise KeyboardInterrupt
            yield torch.ones(4, 1)

    loss = lambda m, x: (m(x) - 3).pow(2).mean()  # noqa: E731
    stage = Stage("toy", module, loss, batches, steps, 1e-2, validate=validate)
    return run_stage(stage, config, Accelerator(cpu=True))


def test_resume_continues_the_bar_and_logs_no_step_twice(tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):  # killed at step 25: checkpoint at 20, logged 0-20
        linear_stage(tmp_path, 40, stop_at=25)
    bars = []
    real_tqdm = train_module.tqdm
    monkeypatch.setattr(train_module, "tqdm", lambda *a, **k: bars.append(k) or real_tqdm(*a, **k))
    linear_stage(tmp_path, 40, resume=True)
    assert bars[0]["initial"] == 20 and bars[0]["total"] == 40
    steps = [r["step"] for r in log_rows(tmp_path)]
    assert steps == [0, 10, 20, 30, 39]


def test_early_stopping_keeps_the_best_weights(tmp_path):
    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    weights = []

    def validate(module):
        weights.append(module.weight.detach().clone())
        return next(losses)

    module = linear_stage(tmp_path, 100, validate, val_every=5, early_stopping=2)
    rows = [r for r in log_rows(tmp_path) if "val_loss" in r]
    assert [r["val_loss"] for r in rows] == [3.0, 2.0, 2.5, 2.6]  # stopped after 2 worse
    assert max(r["step"] for r in log_rows(tmp_path)) < 20
    torch.testing.assert_close(module.weight, weights[1])  # the best validation's weights
