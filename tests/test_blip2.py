"""BLIP-2 through the pipeline's own caption/answer code is BLIP-2: a tiny random BLIP-2,
saved in the published layout, gives token for token what `Blip2ForConditionalGeneration.
generate` gives on the same inputs (batched, left-padded, questions of different lengths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fake_hub import add_folder, use_cache
from PIL import Image
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    OPTConfig,
)

from vlm import Pipeline
from vlm.blip2 import QFormerMapper, is_cached
from vlm.presets import PRESETS, SHAPEWORLD_DIR
from vlm.tasks import UnsupportedTaskError

QUERIES = 4
QUESTIONS = ["what is it?", "what colour is the large shape on the left of the picture?", "why?"]


def opt_like_tokenizer(bos_first: bool = True):
    """A local tokenizer that, like OPT's, starts every text with its BOS token (or, with
    `bos_first` False, one that adds no special token, as GPT-2's)."""
    tokenizer = AutoTokenizer.from_pretrained(SHAPEWORLD_DIR / "lm")
    if bos_first:
        bos = tokenizer.bos_token
        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
        )
    assert (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id) == bos_first
    return tokenizer


@pytest.fixture(scope="module", params=["bos-first", "no-bos"])
def blip2_folder(tmp_path_factory, request) -> Path:
    """A tiny random BLIP-2 in the published folder layout (sharded safetensors + processor),
    with a tokenizer that starts a text with BOS (OPT's way) and with one that does not: the
    pipeline writes BLIP-2's prompts as its processor does with either."""
    folder = tmp_path_factory.mktemp("blip2") / "tiny-blip2"
    tokenizer = opt_like_tokenizer(request.param == "bos-first")
    processor = Blip2Processor(
        BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=QUERIES
    )
    width = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**width, intermediate_size=64, image_size=32, patch_size=8),
        qformer_config=Blip2QFormerConfig(**width, intermediate_size=64, encoder_hidden_size=32),
        text_config=OPTConfig(
            **width, vocab_size=len(tokenizer), ffn_dim=64, max_position_embeddings=128,
            word_embed_proj_dim=32, init_std=0.3,  # varied tokens, not one repeated
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=QUERIES,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(folder, max_shard_size="100KB")
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(blip2_folder):
    model = Blip2ForConditionalGeneration.from_pretrained(blip2_folder).eval()
    processor = Blip2Processor.from_pretrained(blip2_folder)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def pipeline(blip2_folder):
    return Pipeline.from_pretrained(blip2_folder, device="cpu")


@pytest.fixture(scope="module")
def photos(images):
    """Three different pictures (ShapeWorld scenes and a noise photo) in different sizes."""
    pictures = list(images.values())[:2]
    noise = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (48, 80, 3), generator=noise, dtype=torch.uint8)
    return [*pictures, Image.fromarray(pixels.numpy())]


def new_tokens(output: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row's generated tokens up to and including the first EOS."""
    rows = []
    for row in output.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def spy_generate(pipeline, monkeypatch) -> list[torch.Tensor]:
    outputs = []
    original = pipeline.lm.generate

    def generate(*args, **kwargs):
        outputs.append(original(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(pipeline.lm, "generate", generate)
    return outputs


def test_parts_are_blip2s(pipeline, reference):
    model, _ = reference
    assert isinstance(pipeline.mapper, QFormerMapper) and pipeline.mapper.prefix_length == QUERIES
    assert type(pipeline.lm).__name__ == "OPTForCausalLM"
    assert pipeline.config.question_template == "Question: {question} Answer:"
    assert not any(p.requires_grad for p in pipeline.lm.parameters())


def test_captions_are_token_identical_to_blip2(pipeline, reference, photos, monkeypatch):
    model, processor = reference
    outputs = spy_generate(pipeline, monkeypatch)
    # 16 new tokens: a random model may start two pictures' captions alike (it did for 8)
    captions = pipeline.caption(photos, max_new_tokens=16)
    inputs = processor(images=photos, return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=16)[:, QUERIES + 1 :]  # queries + BOS
    eos = pipeline.tokenizer.eos_token_id
    assert new_tokens(outputs[0], eos) == new_tokens(expected, eos)
    assert len({tuple(t) for t in new_tokens(expected, eos)}) == len(photos)  # not degenerate
    texts = processor.batch_decode(expected, skip_special_tokens=True)
    assert captions == [t.strip() for t in texts]


def test_answers_are_token_identical_to_blip2(pipeline, reference, photos, monkeypatch):
    model, processor = reference
    outputs = spy_generate(pipeline, monkeypatch)
    answers = pipeline.answer(photos, QUESTIONS, max_new_tokens=6)
    prompts = [f"Question: {q} Answer:" for q in QUESTIONS]
    inputs = processor(images=photos, text=prompts, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any()  # the batch really is padded
    expected = model.generate(**inputs, max_new_tokens=6)[:, inputs["input_ids"].shape[1] :]
    eos = pipeline.tokenizer.eos_token_id
    assert new_tokens(outputs[0], eos) == new_tokens(expected, eos)
    texts = processor.batch_decode(expected, skip_special_tokens=True)
    assert answers == [t.strip() for t in texts]


def test_one_image_few_shot_is_its_caption(pipeline, photos):
    assert (
        pipeline.continue_sequence([photos[0]], max_new_tokens=8)
        == pipeline.caption(photos[:1], max_new_tokens=8)[0]
    )


def test_blip2_refuses_contrastive_tasks(pipeline, photos):
    assert pipeline.tasks == {"caption", "answer", "few_shot"}
    for call in (
        lambda: pipeline.classify(photos, ["a cat", "a dog"]),
        lambda: pipeline.build_index(photos),
        lambda: pipeline.explain(photos[0], "a cat"),
    ):
        with pytest.raises(UnsupportedTaskError, match="not trained to .*models that can: .*"):
            call()


def test_saves_in_the_published_layout_and_reloads(pipeline, photos, tmp_path):
    pipeline.save_pretrained(tmp_path / "again")
    assert Blip2ForConditionalGeneration.from_pretrained(tmp_path / "again") is not None
    again = Pipeline.from_pretrained(tmp_path / "again", device="cpu")
    assert again.caption(photos, max_new_tokens=5) == pipeline.caption(photos, max_new_tokens=5)


def test_preset_loads_its_hub_repo_from_the_cache(
    blip2_folder, pipeline, photos, monkeypatch, tmp_path
):
    """`Pipeline.from_pretrained("blip2-opt-2.7b")` through the preset's real code: the hub
    repo, found in a local cache holding the tiny model under the real repo id."""
    preset = PRESETS["blip2-opt-2.7b"]
    cache = use_cache(monkeypatch, tmp_path)
    assert not is_cached(preset.repo_id)
    snapshot = add_folder(cache, preset.repo_id, blip2_folder)
    assert preset.is_cached()
    next(snapshot.glob("model-*.safetensors")).unlink()  # one shard missing
    assert not preset.is_cached()
    add_folder(cache, preset.repo_id, blip2_folder)
    loaded = Pipeline.from_pretrained("blip2-opt-2.7b", device="cpu")
    assert loaded.config.name == "blip2-opt-2.7b"
    assert loaded.caption(photos, max_new_tokens=5) == pipeline.caption(photos, max_new_tokens=5)
    by_id = Pipeline.from_pretrained(preset.repo_id, device="cpu")
    assert by_id.answer(photos, QUESTIONS) == pipeline.answer(photos, QUESTIONS)
