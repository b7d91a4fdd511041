"""Tiny models built and trained here, offline, in seconds: the fixtures of the test suite."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("VLM_DEVICE", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import functools  # noqa: E402
import random  # noqa: E402
from itertools import repeat  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from vlm import shapeworld as sw  # noqa: E402
from vlm.factory import build_encoder, build_lm, build_pipeline, train_tokenizer  # noqa: E402
from vlm.sequences import prefix_loss  # noqa: E402
from vlm.training import MODEL_SIZES, TrainConfig
from vlm.training.loop import Stage, run_stage  # noqa: E402
from vlm.training.text_batches import pack_texts  # noqa: E402

# Three scenes the tiny models learn to tell apart, with their captions and Q/A.
SCENES = {
    "a large red square": sw.Scene((sw.Obj("square", "red", "large", 0.5, 0.5),)),
    "a large blue circle": sw.Scene((sw.Obj("circle", "blue", "large", 0.5, 0.5),)),
    "a large yellow star": sw.Scene((sw.Obj("star", "yellow", "large", 0.5, 0.5),)),
}
CAPTIONS = list(SCENES)
COLOR_QUESTION = "what color is it?"


def caption_text(caption: str) -> str:
    return f"Caption: {caption}"


def qa_text(caption: str) -> str:
    return f"Question: {COLOR_QUESTION} Answer: {caption.split()[2]}"


@pytest.fixture(scope="session")
def images():
    return {caption: sw.render(scene, 64) for caption, scene in SCENES.items()}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, images):
    """A tiny CLIP, GPT-2 and mapper, each trained briefly with the real trainer's loop."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(out=out, size="tiny", checkpoint_every=10_000)
    accelerator = Accelerator(cpu=True)
    texts = [caption_text(c) for c in CAPTIONS] + [qa_text(c) for c in CAPTIONS]

    encoder = build_encoder(MODEL_SIZES["tiny"]["clip"])
    pixels = encoder.pixels(list(images.values()))
    tokens = encoder.tokenizer(CAPTIONS)
    from open_clip import ClipLoss

    clip_loss = ClipLoss()

    def clip_step(model, _):
        out = model(pixels, tokens)
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    encoder.model = run_stage(Stage(
        "clip", encoder.model.requires_grad_(True), clip_step, lambda s: repeat(None), 60, 3e-3,
    ), config, accelerator).requires_grad_(False)  # fmt: skip

    tokenizer = train_tokenizer(texts * 20 + list(sw.corpus(random.Random(0), 300)), 300)
    lm = build_lm(tokenizer, **MODEL_SIZES["tiny"]["lm"])
    documents = [  # each about one scene, so the LM learns to use its context
        "\n".join(random.Random(i).sample([caption_text(c), qa_text(c)], 2))
        for i in range(40) for c in CAPTIONS
    ]  # fmt: skip
    random.Random(0).shuffle(documents)
    blocks = pack_texts(tokenizer, documents, 32)
    lm = run_stage(Stage(
        "lm", lm, lambda m, _: m(input_ids=blocks, labels=blocks).loss,
        lambda s: repeat(None), 400, 3e-3,
    ), config, accelerator).requires_grad_(False)  # fmt: skip

    pipeline = build_pipeline(
        encoder,
        lm,
        tokenizer,
        {"prefix_length": 4},
        device="cpu",
        caption_prompt="Caption:",
        stop=["\n"],
    )
    features = encoder.encode_images(list(images.values()))
    pairs = [(i, t) for i, c in enumerate(CAPTIONS) for t in (caption_text(c), qa_text(c))]
    rows = torch.tensor([i for i, _ in pairs])
    p_tokens, p_labels = pipeline.sequences.training_rows([t for _, t in pairs], device="cpu")
    pipeline.mapper = run_stage(Stage(
        "prefix", pipeline.mapper.requires_grad_(True),
        lambda m, _: prefix_loss(pipeline.lm, m(features[rows]), p_tokens, p_labels),
        lambda s: repeat(None), 300, 1e-2,
    ), config, accelerator)  # fmt: skip
    return pipeline


@pytest.fixture(scope="session")
def saved_pipeline(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny-pipeline"
    trained.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def image_files(images, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for i, (caption, image) in enumerate(images.items()):
        paths[caption] = folder / f"{i}-{caption.replace(' ', '_')}.png"
        image.save(paths[caption])
    return paths


@functools.cache
def shapeworld_pipeline():
    """The bundled model, loaded once per session: what a server running it must answer."""
    from vlm import Pipeline

    return Pipeline.from_pretrained("shapeworld", device="cpu")
