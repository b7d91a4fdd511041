"""Options that were tried and removed (`vlm.mapper.RETIRED_OPTIONS`): a saved folder that
names one at its "off" value loads as before, one that sets it otherwise is refused by name,
and what vlm writes no longer names it."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.errors import ConfigError
from vlm.factory import build_encoder, build_lm, build_pipeline, train_tokenizer
from vlm.mapper import RETIRED_OPTIONS, PrefixMapper
from vlm.training import MODEL_SIZES


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """A tiny untrained pipeline (transformer mapper reading the prompt), saved: seconds to
    build, and its greedy captions are as deterministic as a trained one's."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(sw.corpus(random.Random(0), 200), 300)
    lm = build_lm(tokenizer, **MODEL_SIZES["tiny"]["lm"])
    mapper = {"kind": "transformer", "prefix_length": 3, "num_layers": 1, "num_heads": 4,
              "clip_length": 2, "reads_prompt": True}  # fmt: skip
    pipeline = build_pipeline(build_encoder(MODEL_SIZES["tiny"]["clip"]), lm, tokenizer, mapper,
                              device="cpu", caption_prompt="Caption:", stop=["\n"])  # fmt: skip
    folder = tmp_path_factory.mktemp("saved") / "tiny-pipeline"
    pipeline.save_pretrained(folder)
    return folder


def _with_mapper_option(saved_pipeline, tmp_path, **options):
    folder = tmp_path / "old-pipeline"
    shutil.copytree(saved_pipeline, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mapper"].update(options)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_folder_with_the_soft_word_option_off_loads_as_before(saved_pipeline, tmp_path):
    folder = _with_mapper_option(saved_pipeline, tmp_path, vocab_size=0)
    old = Pipeline.from_pretrained(folder, device="cpu")
    plain = Pipeline.from_pretrained(saved_pipeline, device="cpu")
    assert "vocab_size" not in old.mapper.config
    assert old.mapper.config == plain.mapper.config
    for a, b in zip(
        old.mapper.state_dict().values(), plain.mapper.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    pictures = [sw.render(sw.sample_scene(random.Random(i)), 32) for i in range(3)]
    assert old.caption(pictures, max_new_tokens=6) == plain.caption(pictures, max_new_tokens=6)
    again = tmp_path / "saved-again"
    old.save_pretrained(again)  # what vlm writes now leaves the retired option out
    assert "vocab_size" not in json.loads((again / "config.json").read_text())["mapper"]


def test_a_folder_with_the_soft_word_option_on_is_refused_by_name(saved_pipeline, tmp_path):
    folder = _with_mapper_option(saved_pipeline, tmp_path, vocab_size=500)
    with pytest.raises(ConfigError, match="vocab_size") as error:
        Pipeline.from_pretrained(folder, device="cpu")
    assert "removed" in str(error.value) and "older vlm" in str(error.value)


def test_unknown_mapper_keys_are_still_refused(saved_pipeline, tmp_path):
    folder = _with_mapper_option(saved_pipeline, tmp_path, vocab_sizes=0)
    with pytest.raises(ConfigError, match="unknown key 'vocab_sizes'"):
        Pipeline.from_pretrained(folder, device="cpu")


def test_from_config_drops_retired_options_at_their_off_value_only():
    config = dict(kind="transformer", clip_dim=16, lm_dim=32, prefix_length=3, clip_length=2,
                  num_layers=1, num_heads=4)  # fmt: skip
    mapper = PrefixMapper.from_config({**config, **RETIRED_OPTIONS})
    assert mapper.config == PrefixMapper(**config).config
    assert not set(RETIRED_OPTIONS) & set(mapper.config)
    assert not any("word" in name for name in mapper.state_dict())
    for key in RETIRED_OPTIONS:
        with pytest.raises(ConfigError, match=key):
            PrefixMapper.from_config({**config, key: 500})
        with pytest.raises(TypeError):  # not an argument of the mapper any more
            PrefixMapper(**config, **{key: 0})
