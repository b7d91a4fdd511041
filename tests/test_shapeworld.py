"""Tests for vlm.shapeworld: scene sampling, rendering, captions and questions."""

import math
import random
import re
from collections import Counter

import pytest

from vlm.shapeworld import (
    COLORS,
    HELD_OUT,
    NUMBER_WORDS,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    TEMPLATES,
    Obj,
    Scene,
    corpus,
    describe,
    labels,
    paraphrase,
    question_type,
    questions,
    render,
    sample_scene,
)

N = 2000


def scenes(seed: int = 0, n: int = N, split: str = "train") -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, split=split) for _ in range(n)]


def combos(scene: Scene) -> set[tuple[str, str]]:
    return {(o.color, o.shape) for o in scene.objects}


# -----------------------------------------------------------------------------
# vocabulary


def test_vocabulary():
    assert len(SHAPES) == 5 and len(COLORS) == 7 and SIZES == ("small", "large")
    assert len(set(COLORS.values())) == 7
    assert len(labels()) == 35 and len(set(labels())) == 35 and "red circle" in labels()
    assert len(HELD_OUT) >= 5 and len(set(HELD_OUT)) == len(HELD_OUT)
    assert all(c in COLORS and s in SHAPES for c, s in HELD_OUT)
    assert max(Counter(c for c, _ in HELD_OUT).values()) <= 2
    assert max(Counter(s for _, s in HELD_OUT).values()) <= 2
    assert all(t.format("red circle").endswith("red circle") for t in TEMPLATES)


# -----------------------------------------------------------------------------
# captions


def test_describe():
    a = Obj("circle", "red", "small", 0.2, 0.5)
    b = Obj("star", "blue", "large", 0.5, 0.3)
    c = Obj("cross", "white", "small", 0.8, 0.7)
    assert a.name == "red circle" and a.phrase == "a small red circle"
    assert describe(Scene((a,))) == "a small red circle"
    assert describe(Scene((c, b))) == "a large blue star left of a small white cross"
    want = "a small red circle left of a large blue star left of a small white cross"
    assert describe(Scene((b, c, a))) == want
    assert Scene((c, a, b)).objects == (a, b, c)


def test_paraphrase_varied_and_true():
    rng = random.Random(0)
    seen = set()
    for scene in scenes(n=300):
        for _ in range(5):
            p = paraphrase(scene, rng)
            seen.add(p)
            assert p == p.lower() and not p.endswith(".")
            assert all(o.phrase in p for o in scene.objects)
            # a chain 'X left of Y left of Z' must list the objects in x order ('right': reversed)
            if m := re.search(r" (?:to the )?(left|right) of ", p):
                chain = re.split(r" (?:to the )?(?:left|right) of ", p.removeprefix("there is "))
                phrases = [o.phrase for o in scene.objects]
                assert chain == (phrases if m[1] == "left" else phrases[::-1])
    assert len(seen) > 500


# -----------------------------------------------------------------------------
# sampling


def test_splits():
    assert not any(combos(s) & set(HELD_OUT) for s in scenes(split="train"))
    assert all(combos(s) & set(HELD_OUT) for s in scenes(split="held_out"))
    anys = scenes(n=500, split="any")
    assert any(combos(s) & set(HELD_OUT) for s in anys)
    assert any(not combos(s) & set(HELD_OUT) for s in anys)
    with pytest.raises(ValueError, match="split"):
        sample_scene(random.Random(0), split="test")


def test_layout():
    counts = Counter()
    for scene in scenes(split="any"):
        objs = scene.objects
        counts[len(objs)] += 1
        assert list(objs) == sorted(objs, key=lambda o: o.x)
        for o in objs:
            # the square's corners reach 0.8 * sqrt(2) = 1.13 of its outer radius
            r = 1.14 * o.radius
            assert r <= o.x <= 1 - r and r <= o.y <= 1 - r
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert b.x - a.x >= 0.12
                assert math.hypot(a.x - b.x, a.y - b.y) > 1.14 * (a.radius + b.radius)
    assert set(counts) == {1, 2, 3}
    assert all(len(sample_scene(random.Random(i), n_objects=3).objects) == 3 for i in range(50))


def test_deterministic():
    assert scenes(seed=7, n=50) == scenes(seed=7, n=50)
    assert scenes(seed=7, n=50) != scenes(seed=8, n=50)


# -----------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize("size", [64, 128])
def test_render(size):
    rng = random.Random(0)
    for i, shape in enumerate(SHAPES * 4):
        color = list(COLORS)[i % len(COLORS)]
        obj = Obj(shape, color, SIZES[i % 2], rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
        img = render(Scene((obj,)), size=size)
        assert img.mode == "RGB" and img.size == (size, size)
        # the triangle's centroid is its centre, so all five shapes cover the centre pixel
        px = img.getpixel((int(obj.x * size), int(obj.y * size)))
        assert all(abs(p - q) <= 40 for p, q in zip(px, COLORS[color], strict=True)), (shape, px)
        assert img.getpixel((0, 0)) == (0, 0, 0)
        assert img.getpixel((size - 1, size - 1)) == (0, 0, 0)


def test_render_scene():
    for scene in scenes(n=20, split="any"):
        img = render(scene, size=64)
        for o in scene.objects:
            px = img.getpixel((int(o.x * 64), int(o.y * 64)))
            assert all(abs(p - q) <= 60 for p, q in zip(px, COLORS[o.color], strict=True))


# -----------------------------------------------------------------------------
# questions, checked by re-parsing each question against the scene


def check(scene: Scene, q: str, a: str) -> None:
    objs = scene.objects
    kind = question_type(q)
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        ref = [o for o in objs if o.shape == m[1]]
        assert kind == "color" and len(ref) == 1 and a == ref[0].color
    elif m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        ref = [o for o in objs if o.color == m[1]]
        assert kind == "shape" and len(ref) == 1 and a == ref[0].shape
    elif q == "how many shapes are there?":
        assert kind == "count" and a == NUMBER_WORDS[len(objs)]
    elif m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        present = any(o.color == m[1] and o.shape == m[2] for o in objs)
        assert kind == "exists" and a == ("yes" if present else "no")
    elif m := re.fullmatch(r"what size is the (\w+) (\w+)\?", q):
        ref = [o for o in objs if o.color == m[1] and o.shape == m[2]]
        assert kind == "size" and len(ref) == 1 and a == ref[0].size
    elif m := re.fullmatch(r"what is (left|right) of the (\w+) (\w+)\?", q):
        ref = [o for o in objs if o.color == m[2] and o.shape == m[3]]
        assert kind == "relation" and len(ref) == 1
        side = [o for o in objs if (o.x < ref[0].x if m[1] == "left" else o.x > ref[0].x)]
        assert len(side) == 1 and a == side[0].shape
    else:
        raise AssertionError(f"unparsed question {q!r}")


def test_questions():
    kinds, answers = Counter(), Counter()
    for scene in scenes(split="any"):
        qa = questions(scene)
        assert qa == questions(scene)
        qs = [q for q, _ in qa]
        assert len(qs) == len(set(qs))
        for q, a in qa:
            assert q == q.lower() and q.endswith("?") and a.isalpha() and a == a.lower()
            check(scene, q, a)
            kinds[question_type(q)] += 1
            answers[a] += 1
    assert set(kinds) == set(QUESTION_TYPES)
    assert answers["yes"] == answers["no"]


def test_question_type():
    assert question_type("what color is the star?") == "color"
    assert question_type("what is right of the red square?") == "relation"
    with pytest.raises(ValueError):
        question_type("why is the sky black?")


def test_corpus():
    lines = list(corpus(random.Random(0), 200))
    assert len(lines) == 200 and all(isinstance(line, str) and line for line in lines)
    qa = [line for line in lines if line.startswith("Question: ")]
    assert qa and all(re.fullmatch(r"Question: [a-z ]+\? Answer: [a-z]+", line) for line in qa)
    held = {f"{c} {s}" for c, s in HELD_OUT}
    assert not any(name in line for line in lines for name in held)


def test_every_question_form_asks_the_same_as_the_canonical_one():
    from vlm.shapeworld import HELD_OUT_FORMS, QUESTION_FORMS, is_held_out_form, parse_question

    rng = random.Random(5)
    pools = {"seen": Counter(), "held_out": Counter()}
    for scene in scenes(n=400, split="any"):
        canonical = dict(questions(scene))
        for pool, counts in pools.items():
            for q, a in questions(scene, rng, forms=pool):
                assert is_held_out_form(q) == (pool == "held_out"), q
                kind, twin = parse_question(q)
                counts[kind] += 1
                if twin != q or q in canonical:  # a form naming its object: same answer
                    assert canonical[twin] == a, (q, twin)
                    check(scene, twin, a)
                else:  # "what color is it?": the scene's one object
                    assert len(scene.objects) == 1 and a in (scene.objects[0].color,
                                                             scene.objects[0].shape)  # fmt: skip
    assert set(pools["seen"]) == set(pools["held_out"]) == set(QUESTION_TYPES)
    for kind, forms in QUESTION_FORMS.items():
        assert len([f for f in forms if f not in HELD_OUT_FORMS]) >= 3, kind
        assert any(f in HELD_OUT_FORMS for f in forms), kind
    assert {f for forms in QUESTION_FORMS.values() for f in forms} >= HELD_OUT_FORMS
    with pytest.raises(ValueError):
        questions(scenes(n=1)[0], forms="seen")  # a random form needs an rng


def test_question_type_reads_every_form():
    assert question_type("how big is the red star?") == "size"
    assert question_type("what is to the left of the blue cross?") == "relation"
    assert question_type("what shape is it?") == "shape"
