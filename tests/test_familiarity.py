"""Familiarity: a model says when an image is unlike what it was trained on (issue 41)."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import shapeworld_pipeline
from PIL import Image
from test_app import ROOT, pinned_env

from vlm import shapeworld as sw
from vlm.examples import photo_examples, shapeworld_examples
from vlm.familiarity import PROFILE_NAME, UNKNOWN, FamiliarityProfile
from vlm.pipeline import Pipeline
from vlm.serve import familiarity_notice
from vlm.shapeworld import evaluation as evaluate

SEED = 5151  # the tests' own scenes: neither the profile's seeds (7001, 7002) nor an eval seed


def test_a_profile_scores_its_own_distribution_uniformly_and_outliers_near_zero(tmp_path):
    rng = np.random.default_rng(0)
    scale = np.linspace(3, 0.1, 32)
    fit, reference, fresh = (rng.normal(size=(n, 32)) * scale for n in (4000, 2000, 2000))
    profile = FamiliarityProfile.fit(fit, reference, components=8, false_alarms=0.01)
    scores = profile.scores(fresh)
    assert abs(np.mean(scores) - 0.5) < 0.05 and abs(np.mean(scores < 0.01) - 0.01) < 0.01
    outliers = rng.normal(size=(50, 32)) * scale + 6  # a shift along every direction
    assert profile.scores(outliers).max() == 0 and not any(
        f.familiar for f in profile.familiarity(outliers)
    )
    assert FamiliarityProfile.load(tmp_path) is None  # no file: no profile
    loaded = FamiliarityProfile.load(profile.save(tmp_path).parent)
    np.testing.assert_allclose(loaded.scores(fresh), scores, atol=2e-3)  # stored as float32
    assert loaded.false_alarms == 0.01


@pytest.fixture(scope="module")
def bundle():
    return shapeworld_pipeline()


def test_the_bundle_knows_its_world_and_not_photos(bundle):
    rng = random.Random(f"familiarity-test-{SEED}")
    seen = [sw.render(sw.sample_scene(rng, split="train")) for _ in range(150)]
    held = [sw.render(sw.sample_scene(rng, split="held_out")) for _ in range(150)]
    examples = [str(path) for path, _ in shapeworld_examples()]
    for name, images in (("seen", seen), ("held-out combinations", held),
                         ("bundled scenes", examples)):  # fmt: skip
        familiar = [f.familiar for f in bundle.familiarity(images)]
        assert np.mean(familiar) >= 0.97, (name, np.mean(familiar))
    photos = bundle.familiarity([str(p) for p in photo_examples()])
    assert photos and not any(f.familiar for f in photos)
    assert all(0 <= f.score < 0.01 for f in photos)


def test_the_bundle_tells_the_world_from_outside_it(bundle):
    """The issue's AUROC targets on the tests' own seed (`eval shapeworld` has them at n=1000,
    measured in docs/familiarity.md); shapes outside the world are reported, not required."""
    rng = random.Random(f"familiarity-auroc-{SEED}")
    inside = [f.score for f in bundle.familiarity(
        [sw.render(sw.sample_scene(rng, split="any")) for _ in range(200)])]  # fmt: skip
    outside = evaluate.outside_world(60, SEED)
    for name, floor in (
        ("photos", 0.99),
        ("white_background", 0.95),
        ("noise", 0.95),
        ("empty", 0.95),
    ):
        scores = [f.score for f in bundle.familiarity(outside[name])]
        assert evaluate.auroc(inside, scores) >= floor, name


def test_the_profile_survives_save_and_load_and_a_model_without_one_says_unknown(bundle, tmp_path):
    bundle.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / PROFILE_NAME).is_file()
    copy = Pipeline.from_pretrained(tmp_path / "copy", device="cpu")
    photo = str(photo_examples()[0])
    assert copy.familiarity([photo]) == bundle.familiarity([photo])
    copy.familiarity_profile = None
    copy.save_pretrained(tmp_path / "without")
    assert not (tmp_path / "without" / PROFILE_NAME).exists()
    blind = Pipeline.from_pretrained(tmp_path / "without", device="cpu")
    assert blind.familiarity([photo]) == [UNKNOWN]
    assert "cannot tell" in familiarity_notice("x", blind.config, blind.familiarity([photo]))


def test_the_notice_says_which_images_are_a_guess(bundle):
    scene, photo = str(shapeworld_examples()[0][0]), str(photo_examples()[0])
    config = bundle.config
    assert familiarity_notice("shapeworld", config, bundle.familiarity([scene])) == ""
    one = familiarity_notice("shapeworld", config, bundle.familiarity([photo]))
    assert "This image looks unlike anything the `shapeworld` model was trained on" in one
    assert "(synthetic coloured shapes on black)" in one and "a guess" in one
    some = familiarity_notice("shapeworld", config, bundle.familiarity([scene, photo, scene]))
    assert "Image 2 of 3 looks unlike" in some


def test_the_cli_says_on_stderr_that_a_photo_is_outside_the_world(tmp_path):
    photo, scene = photo_examples()[0], shapeworld_examples()[0][0]
    result = subprocess.run(
        [sys.executable, "-m", "vlm", "caption", str(photo), str(scene)], capture_output=True,
        text=True, env=pinned_env(tmp_path, PYTHONPATH=str(ROOT)), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{photo}: unlike anything shapeworld was trained on" in result.stderr
    assert str(scene) not in result.stderr
    assert len(result.stdout.splitlines()) == 2  # the captions themselves, as before


def test_a_noise_image_is_unfamiliar(bundle):
    noise = Image.fromarray(np.random.default_rng(SEED).integers(0, 256, (96, 96, 3), np.uint8))
    assert bundle.familiarity(noise)[0].familiar is False


def test_an_empty_frame_is_unfamiliar(bundle):
    """A frame with no shape (a covered camera, a clip whose objects have all gone) is not
    what the model learned to describe: flagged, where it once scored just above the
    threshold (the CLIP stage's colourless views made dark frames look typical)."""
    frames = evaluate.outside_world(40, SEED)["empty"] + [Image.new("RGB", (64, 64))]
    assert not any(f.familiar for f in bundle.familiarity(frames))
