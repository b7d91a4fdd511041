"""experiments/tutorial_recipe.py (issue 46, docs/tutorial-recipe.md) in its smallest setting:
every embedding's encoder stage and the same prefix stage into the bundled frozen LM run end
to end, and the table gets every column it promises, "–" only where a measure does not apply."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe():
    path = ROOT / "experiments" / "tutorial_recipe.py"
    spec = importlib.util.spec_from_file_location("tutorial_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smallest_setting_fills_the_table(recipe, tmp_path):
    out = tmp_path / "runs"
    rows = recipe.main(["--out", str(out), "--size", "tiny", "--encoder-steps", "3",
                        "--prefix-steps", "3", "--batch-size", "8", "--examples", "64",
                        "--n", "10"])  # fmt: skip
    assert list(rows) == list(recipe.ARMS)
    assert json.loads((out / "results.json").read_text()) == rows
    for arm, row in rows.items():
        assert list(row) == list(recipe.COLUMNS)
        missing = {column for column, value in row.items() if value is None}
        text_side = {"zero-shot seen", "zero-shot held-out", "text→image R@5"}
        expected = {  # no text tower: no zero-shot, no search, no explain
            "autoencoder": text_side | {"explain peak"},
            "word_embedding": {"explain peak"},  # its zero-shot goes through word vectors
        }.get(arm, set())
        assert missing == expected, (arm, missing)
        for column, value in row.items():
            if value is not None and not column.endswith("(s)"):
                assert 0.0 <= value <= 1.0, (arm, column, value)
        assert row["encoder stage (s)"] > 0 and row["encoder step (s)"] > 0
        assert (out / arm / "encoder" / "open_clip_config.json").is_file()
    # the autoencoder's reconstructions: the scenes over their rebuilding, one PNG
    picture = Image.open(out / "autoencoder" / "reconstructions.png")
    assert picture.height * 3 == picture.width  # two rows of six square scenes
    table = recipe.table(rows)
    assert table.count("\n") == 1 + len(recipe.ARMS) and "| autoencoder | " in table
    # a rerun at the same budget reads the arms measured before (a long run can go on in
    # several sittings); at another budget an arm is measured again
    (out / "clip" / "encoder" / "open_clip_config.json").unlink()
    assert recipe.main(["--out", str(out), "--size", "tiny", "--encoder-steps", "3",
                        "--prefix-steps", "3", "--batch-size", "8", "--examples", "64",
                        "--n", "10"]) == rows  # fmt: skip
    assert not (out / "clip" / "encoder" / "open_clip_config.json").exists()
    again = recipe.main(["--out", str(out), "--arms", "clip", "--size", "tiny",
                         "--encoder-steps", "4", "--prefix-steps", "3", "--batch-size", "8",
                         "--examples", "64", "--n", "10"])  # fmt: skip
    assert list(again) == ["clip"]
    assert (out / "clip" / "encoder" / "open_clip_config.json").is_file()


def test_the_word_embedding_loss_ranks_each_scene_by_its_own_words(recipe):
    """DeViSE's hinge rank loss on the frozen LM's word vectors: zero when each image's vector
    is its own scene's target (the two scenes' words differ enough), positive when two images
    point at each other's scenes, and larger with a larger margin."""
    vectors = recipe.word_vectors(recipe.WORLD_WORDS)
    texts = ("a large red circle", "a small blue star")
    targets = torch.stack([recipe.scene_target(t, vectors) for t in texts])
    assert torch.allclose(targets.norm(dim=1), torch.ones(2))
    assert (targets[0] @ targets[1]).item() < 1 - recipe.MARGIN
    assert recipe.hinge_rank_loss(3 * targets, targets).item() == 0.0  # the norm is ignored
    swapped = recipe.hinge_rank_loss(targets.flip(0), targets)
    assert swapped.item() > 0
    assert recipe.hinge_rank_loss(targets.flip(0), targets, margin=1.0) > swapped
