"""The shipped ShapeWorld bundle: a regression test of learned behaviour on fresh scenes."""

from __future__ import annotations

import json
import random

import pytest
import torch

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.presets import SHAPEWORLD_DIR
from vlm.shapeworld.evaluation import evaluate_shapeworld, one_change_captions

# Well under what the shipped bundle measures on 1,000 scenes per slice (docs/shapeworld.md:
# captions exact 99%, held-out combinations 95%, VQA 94% / held-out 92% / held-out phrasings
# 93%, zero-shot 100% / held-out 100%, R@5 100%, few-shot 0-shot 66% and 2-shot 61% from bare
# prefixes (never-seen formats 30%), each image described first 89% and 100% (never-seen
# formats 100%), as text 100% in both formats, explain's peak on the named object 98% (shapes
# named alone 96%)), since 100 scenes (10 per few-shot cell) are noisy.
FLOORS = {
    "caption_exact": 0.90,
    "held_out_caption_exact": 0.82,
    "zeroshot_train": 0.95,
    "zeroshot_held_out": 0.92,
    "vqa_overall": 0.88,
    "held_out_vqa_overall": 0.85,
    "phrasing_vqa_overall": 0.85,
    "retrieval_r5": 0.92,
    # 0-shot "Shape:" is now continued with the object's name ("green cross"), the caption's
    # order, rather than its shape: lower than the bundle before this one (93%). The few-shot
    # lists are also held to an image-blind guesser below (BLIND_MARGINS).
    "few_shot_seen_0shot": 0.50,
    "few_shot_text_seen_2shot": 0.85,
    "few_shot_text_held_out_2shot": 0.85,
    "few_shot_described_seen_0shot": 0.75,
    "few_shot_described_seen_2shot": 0.85,
    "few_shot_described_held_out_2shot": 0.85,
    "explain_peak_all": 0.90,
    "explain_peak_shape": 0.85,
    # the encoder prefers a scene's caption to every one-object change of it (shape 93%,
    # size 100%, colour 96% on scenes of two or three objects)
    "binding_shape": 0.82,
    "binding_size": 0.90,
    "binding_color": 0.85,
    # familiarity (issue 41; measured at n=1000, seed 1234: 0.9986, 0.9996, 1.0)
    "familiarity_auroc_photos": 0.99,
    "familiarity_auroc_white_background": 0.95,
    "familiarity_auroc_noise": 0.95,
    "familiarity_auroc_empty": 0.95,
}
# the share of in-world scenes called unfamiliar, clean and under JPEG-50 (measured 0.8-1.2% at
# n=1000, seed 1234)
CEILINGS = {"familiarity_false_alarms": 0.02, "familiarity_false_alarms_held_out": 0.02}


@pytest.fixture(scope="module")
def results():
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    return evaluate_shapeworld(pipeline, n=100, seed=777, perturbations=("clean", "jpeg50"))


def test_bundle_is_small_and_fp16():
    size = sum(p.stat().st_size for p in SHAPEWORLD_DIR.rglob("*") if p.is_file())
    assert size < 50_000_000
    from safetensors import safe_open

    profile = SHAPEWORLD_DIR / "familiarity.safetensors"  # statistics in fp32, not weights
    assert profile.stat().st_size < 100_000
    for weights in set(SHAPEWORLD_DIR.rglob("*.safetensors")) - {profile}:
        with safe_open(weights, "pt") as handle:
            assert all(handle.get_tensor(k).dtype == torch.float16 for k in handle.keys()), weights  # noqa: SIM118
    assert json.loads((SHAPEWORLD_DIR / "lm" / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("measure", sorted(FLOORS))
def test_bundle_clears_its_floor_on_fresh_scenes(results, measure):
    assert results[measure]["clean"] >= FLOORS[measure], results


# Few-shot lists against a guesser that never looks at an image and picks among the values
# the examples don't show (`few_shot_blind_*`, on the same lists: 0.28 at 0 shots, 0.50 at 2,
# where a size is always the one not shown). Measured here: 0-shot 0.70, 2-shot 0.60 from
# bare prefixes, 1.0 with each image described first.
BLIND_MARGINS = {
    "few_shot_seen_0shot": 0.25,
    "few_shot_seen_2shot": 0.05,
    "few_shot_described_seen_2shot": 0.30,
    "few_shot_described_held_out_2shot": 0.30,
}


def _blind(measure: str) -> str:
    return "few_shot_blind_" + measure.removeprefix("few_shot_").removeprefix("described_")


@pytest.mark.parametrize("measure", sorted(BLIND_MARGINS))
def test_few_shot_lists_beat_a_guesser_that_never_looks_at_the_image(results, measure):
    blind = results[_blind(measure)]["clean"]
    assert results[measure]["clean"] >= blind + BLIND_MARGINS[measure], (blind, results[measure])


@pytest.mark.xfail(strict=True, reason="a known gap (docs/shapeworld.md): from bare prefixes, "
                   "lists in a format never read in training score 0.43 against the blind "
                   "guesser's 0.50; colours 0.1-0.2 against 0.17")  # fmt: skip
def test_bare_prefix_lists_in_a_never_seen_format_beat_the_blind_guesser(results):
    blind = results["few_shot_blind_held_out_2shot"]["clean"]
    assert results["few_shot_held_out_2shot"]["clean"] >= blind + 0.05


@pytest.mark.parametrize("measure", sorted(CEILINGS))
def test_in_world_scenes_are_rarely_called_unfamiliar(results, measure):
    assert max(results[measure].values()) <= CEILINGS[measure], results[measure]


# Calibration (issue 41): the ECE of the confidence shown for answers, clean and under JPEG-50.
# At n=100 questions it is noisy (measured 0.028-0.042 here; 0.012-0.020 at n=1000, seed 1234).
ECE_CEILING = 0.07


@pytest.mark.parametrize("slice_", ["", "held_out_", "phrasing_"])
def test_the_confidence_shown_for_answers_is_calibrated(results, slice_):
    for measure in (f"{slice_}vqa_ece", f"{slice_}vqa_choice_ece"):
        assert max(results[measure].values()) <= ECE_CEILING, (measure, results[measure])


def test_the_encoder_check_lowers_wrong_caption_words_and_keeps_right_ones(results):
    """On held-out combinations the LM writes a wrong word at 0.74 on average here; shown,
    it is below 0.5 (0.175 at n=1000, seed 1234), while right words stay where they were."""
    for kind in ("clean", "jpeg50"):
        wrong = results["held_out_caption_words_wrong_shown"][kind]
        assert wrong <= results["held_out_caption_words_wrong_raw"][kind] - 0.15, results
        assert wrong < 0.5, results  # the target
        for slice_ in ("", "held_out_"):
            right = results[f"{slice_}caption_words_right_shown"][kind]
            assert right >= results[f"{slice_}caption_words_right_raw"][kind] - 0.05, results


@pytest.mark.parametrize("measure", sorted(FLOORS))
def test_jpeg_costs_little(results, measure):
    assert results[measure]["jpeg50"] >= results[measure]["clean"] - 0.10, results


def test_one_change_captions_change_exactly_one_attribute():
    scene = sw.sample_scene(random.Random(4), 3)
    true = sw.describe(scene)
    for field, n_values in (("shape", 5), ("size", 2), ("color", 7)):
        captions = one_change_captions(scene, field)
        assert len(captions) == len(set(captions)) == 3 * (n_values - 1)
        for caption in captions:
            changed = [a != b for a, b in zip(caption.split(), true.split(), strict=True)]
            assert sum(changed) == 1, (caption, true)


def _experiment(name: str):
    """A script of experiments/ (docs/shapeworld-lab.md's diagnosis), imported as a module."""
    import importlib.util

    path = SHAPEWORLD_DIR.parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_experiment_encodes_scenes_and_runs():
    """experiments/oracle_prefix.py (README's diagnosis) still runs: its tokens say each
    object exactly, and a few training steps through the frozen LM give a report."""
    oracle = _experiment("oracle_prefix")
    scene = sw.Scene(
        (sw.Obj("star", "red", "large", 0.7, 0.5), sw.Obj("circle", "blue", "small", 0.2, 0.3))
    )
    tokens = oracle.scene_tokens(scene)
    assert tokens.shape == (3, oracle.FEATURES) and not tokens[2].any()
    first = tokens[0]  # the leftmost object: the small blue circle
    assert first[sw.SHAPES.index("circle")] == 1 and first[: len(sw.SHAPES)].sum() == 1
    assert first[len(sw.SHAPES) + list(sw.COLORS).index("blue")] == 1
    assert first[len(sw.SHAPES) + len(sw.COLORS) + sw.SIZES.index("small")] == 1
    assert first[-2:].tolist() == pytest.approx([0.2, 0.3])
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    pipeline.lm.float()
    before = [p.clone() for p in pipeline.lm.parameters()]
    mapper = oracle.train_oracle(pipeline, steps=3, batch_size=8)
    assert all(
        torch.equal(a, b) for a, b in zip(before, pipeline.lm.parameters(), strict=True)
    )  # frozen
    report = oracle.evaluate_oracle(pipeline, mapper, n=4)
    assert {"caption_exact", "vqa_overall"} <= report.keys()  # 3 steps: its numbers mean nothing


def test_feature_probe_experiment_reads_features_and_runs():
    """experiments/feature_probe.py still runs: slot targets are right, both kinds of
    features have the expected shapes, and a few probe steps give accuracies."""
    probe = _experiment("feature_probe")
    scene = sw.Scene(
        (sw.Obj("star", "red", "large", 0.7, 0.5), sw.Obj("cross", "blue", "small", 0.2, 0.3))
    )
    n_shapes, n_sizes, n_colors = len(sw.SHAPES), len(sw.SIZES), len(sw.COLORS)
    expected = [sw.SHAPES.index("cross"), sw.SIZES.index("small"), list(sw.COLORS).index("blue")]
    expected += [sw.SHAPES.index("star"), sw.SIZES.index("large"), list(sw.COLORS).index("red")]
    assert probe.targets(scene) == expected + [n_shapes, n_sizes, n_colors]  # no third object
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    rng = random.Random(0)
    scenes = [sw.sample_scene(rng, 2) for _ in range(12)]
    mapper_tokens = probe.features(pipeline, scenes, "mapper")
    assert mapper_tokens.shape == (12, pipeline.mapper.config["num_tokens"], 128)
    grid = probe.features(pipeline, scenes, "block2")
    assert grid.shape == (12, 1 + 8 * 8, 96)
    y = torch.tensor([probe.targets(s) for s in scenes])
    accuracy = probe.probe(grid, y, n_train=8, steps=2)
    assert accuracy.keys() == {"shape", "size", "color"}  # 2 steps: its numbers mean nothing


def test_coca_ceiling_experiment_reads_the_clip_checkpoint(tmp_path):
    """experiments/coca_ceiling.py still runs: it rebuilds the CLIP stage's captioning
    decoder from a run's checkpoint (vocabulary included) and scores its greedy captions."""
    from vlm.training import TrainConfig, train

    experiment = _experiment("coca_ceiling")
    train(TrainConfig(out=tmp_path, size="tiny", stages=("clip",), clip_steps=2, batch_size=16,
                      clip_examples=64))  # fmt: skip
    encoder, head = experiment.load_caption_head(tmp_path, size="tiny")
    rng = random.Random(1)
    scenes = [sw.sample_scene(rng) for _ in range(5)]
    captions = experiment.head_captions(encoder, head, [sw.render(s) for s in scenes], 2)
    # the decoder writes only tokens of ShapeWorld's captions (its vocabulary, rebuilt from
    # the checkpoint): read back wrongly, it would write any of CLIP's 49,408 tokens
    words = {w for line in sw.corpus(random.Random(0), 500) for w in line.lower().split()}
    words |= {*sw.SHAPES, *sw.COLORS, *sw.SIZES, "a", "left", "of"}
    assert len(captions) == 5 and all(set(c.split()) <= words for c in captions), captions
    # scored by object count, checked against a hand count: 3 of 5 right
    guesses = [sw.describe(s) for s in scenes]
    guesses[1], guesses[4] = "a small red circle", sw.describe(scenes[4]) + " left of a star"
    counts = [len(s.objects) for s in scenes]
    expected = {"all": 3 / 5}
    for n in set(counts):
        right = [i not in (1, 4) for i, c in enumerate(counts) if c == n]
        expected[str(n)] = sum(right) / len(right)
    assert experiment.exact_by_count(guesses, scenes) == pytest.approx(expected)


class _RuleLM:
    """A stand-in LM for experiments/lookups.py: reads the text it is given and puts the
    highest logit on what `rule(caption objects, the text's last line)` names."""

    def __init__(self, tokenizer, rule):
        self.tokenizer, self.rule = tokenizer, rule

    def __call__(self, input_ids):
        lines = self.tokenizer.decode(input_ids[0]).split("\n")
        caption = lines[0].removeprefix("Caption: ")
        objects = [phrase.split()[1:] for phrase in caption.split(" left of ")]  # size colour shape
        word = self.rule(objects, lines[-1])
        logits = torch.zeros(1, input_ids.shape[1], len(self.tokenizer))
        logits[0, -1, self.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]] = 1.0
        return type("Output", (), {"logits": logits})


def _look_up(objects, line):
    """The right answer: the object the question (or the cue) names, then what is asked."""
    words = line.rstrip("?").replace("? Answer:", "").split()
    if line.startswith("Question: what color"):
        return next(color for _, color, shape in objects if shape == words[-1])
    if line.startswith("Question: what shape"):
        return next(shape for _, color, shape in objects if color == words[-2])
    if len(words) == 5:  # "Caption: there is a small": its colour
        return next(color for size, color, _ in objects if size == words[-1])
    return next(shape for _, color, shape in objects if color == words[-1])


def test_lookups_experiment_tells_a_lookup_from_a_guess_by_position():
    """experiments/lookups.py scores an LM that looks every answer up 1.00 everywhere, and
    one that names the first object's attributes 1.00 / 0.00 by object: it can tell the two."""
    experiment = _experiment("lookups")
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    scenes = experiment._distinct_pairs(random.Random(0), 12)
    right = experiment.lookups(_RuleLM(pipeline.tokenizer, _look_up), pipeline.tokenizer, scenes)
    assert set(right) == {f"binding {k} @ object {i}" for k in ("color", "shape") for i in (1, 2)
                          } | {"copying colour", "copying shape"}  # fmt: skip
    assert all(v == 1.0 for v in right.values()), right

    def first_object(objects, line):
        asked = _look_up(objects, line)
        return objects[0][1] if asked in (o[1] for o in objects) else objects[0][2]

    guess = experiment.lookups(
        _RuleLM(pipeline.tokenizer, first_object), pipeline.tokenizer, scenes
    )
    assert guess["binding color @ object 1"] == guess["binding shape @ object 1"] == 1.0
    assert guess["binding color @ object 2"] == guess["binding shape @ object 2"] == 0.0
    # and the real bundled LM gets a score in range for each, all from one short run
    real = experiment.lookups(pipeline.lm.float(), pipeline.tokenizer, scenes[:4])
    assert real.keys() == right.keys() and all(0.0 <= v <= 1.0 for v in real.values())


def test_text_answers_experiment_scores_the_lm_with_and_without_the_caption():
    """experiments/text_answers.py still runs, and the bundled LM reads its context: with
    the caption before the question it answers far more often than from its prior alone."""
    experiment = _experiment("text_answers")
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    pipeline.lm.float()
    rng = random.Random(3)
    scenes = [sw.sample_scene(rng) for _ in range(30)]
    scores = experiment.text_answers(pipeline.lm, pipeline.tokenizer, scenes)
    assert scores.keys() == experiment.CONTEXTS.keys()
    mean = {name: sum(by_type.values()) / len(by_type) for name, by_type in scores.items()}
    assert mean["caption before"] > mean["no context"] + 0.25, scores


def test_bundled_lm_looks_answers_up_in_its_context():
    """With the caption of a scene of two or three objects on the line before, the frozen LM
    answers "is there a green circle?": it checks the circle's colour. (Trained with answers
    weighing no more than other tokens, it answered at chance: 0.42 on these scenes.)"""
    experiment = _experiment("text_answers")
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    pipeline.lm.float()
    rng = random.Random(11)
    scenes = [sw.sample_scene(rng, rng.choice([2, 3])) for _ in range(40)]
    scores = experiment.text_answers(pipeline.lm, pipeline.tokenizer, scenes)["caption before"]
    assert scores["exists"] > 0.8, scores


def test_word_probability_experiment_scores_each_attribute_word():
    """experiments/word_probabilities.py still runs: one probability per attribute word of
    the caption, in caption order, with and without the visual prefix, and copying works for
    colours (what the diagnosis contrasts sizes with)."""
    experiment = _experiment("word_probabilities")
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    scene = sw.Scene(
        (sw.Obj("cross", "blue", "small", 0.2, 0.3), sw.Obj("star", "red", "large", 0.7, 0.5))
    )
    prefix = pipeline.prefix([sw.render(scene)])
    expected = [("size", 1), ("color", 1), ("shape", 1), ("size", 2), ("color", 2), ("shape", 2)]
    for context, visual in (("", prefix), (f"Caption: {sw.describe(scene)}\n", None)):
        words = experiment.word_probabilities(pipeline, scene, context, visual)
        assert [(kind, k) for kind, k, _ in words] == expected
        assert all(0.0 <= p <= 1.0 for _, _, p in words)
    copied = dict(((kind, k), p) for kind, k, p in words)
    assert copied["color", 2] > 0.5  # the second object's colour, copied from the line before


def test_bundled_lm_tells_the_two_sizes_apart():
    """The frozen LM must be able to write "small" or "large" from context (a GPT-2 init of its
    embeddings had made the two the same vector: every size a coin flip, whatever the prefix)."""
    experiment = _experiment("word_probabilities")
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    assert experiment.size_cosine(pipeline) < 0.9
    rng = random.Random(5)
    scenes = [sw.sample_scene(rng, rng.choice([2, 3])) for _ in range(40)]
    sizes = [
        p
        for scene in scenes
        for kind, _, p in experiment.word_probabilities(
            pipeline, scene, f"Caption: {sw.describe(scene)}\n"
        )
        if kind == "size"
    ]
    # copied from the line before: 0.92 on average with the bundle of 2026-11-30 (one of 96 at
    # 0.45), 0.87 with that of 2026-12-01 (6 of 96 at or under 0.5: its LM reads sizes off the
    # line before less surely, docs/shapeworld.md "Made-up few-shot formats"); a coin flip
    # would be 0.50 everywhere
    assert sum(sizes) / len(sizes) > 0.85 and sum(p <= 0.5 for p in sizes) <= 10, sizes


def test_bundle_answers_about_the_object_a_question_names_not_by_position():
    """Asked the colour of each object of a two-object scene, the bundle names that object's
    colour (the mapper reads the question and shows that object). Its LM alone answers by
    position: the bundle before this one scored about 0.64 on the first and 0.34 on the second."""
    pipeline = Pipeline.from_pretrained("shapeworld", device="cpu")
    rng = random.Random(41)
    scenes = []
    while len(scenes) < 30:
        scene = sw.sample_scene(rng, n_objects=2)
        first, second = scene.objects
        if first.shape != second.shape and first.color != second.color:
            scenes.append(scene)
    images = [sw.render(scene) for scene in scenes]
    for index in (0, 1):
        questions = [f"what color is the {scene.objects[index].shape}?" for scene in scenes]
        answers = pipeline.answer(images, questions)
        right = [a == s.objects[index].color for a, s in zip(answers, scenes, strict=True)]
        assert sum(right) / len(right) >= 0.8, (index, answers)
