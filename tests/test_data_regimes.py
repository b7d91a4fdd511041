"""The bundled world's data regimes (generalisation issue): the LM's text is the whole language,
while the image stages never show a HELD_OUT combination and ask only the seen question forms;
held-out few-shot formats appear nowhere in training."""

from __future__ import annotations

import random
import re

import pytest

from vlm import shapeworld as sw
from vlm.shapeworld.recipe import CAPTION_PROMPT, ShapeWorld

HELD_NAMES = [f"{c} {s}" for c, s in sw.HELD_OUT]


def names_in(text: str) -> set[str]:
    """Every colour-shape name a text mentions."""
    pattern = rf"\b({'|'.join(sw.COLORS)}) ({'|'.join(sw.SHAPES)})\b"
    return {" ".join(m) for m in re.findall(pattern, text)}


@pytest.fixture(scope="module")
def data():
    return ShapeWorld()


@pytest.fixture(scope="module")
def lm_texts(data):
    return data.texts(3000, seed=0)


@pytest.fixture(scope="module")
def prefix_pool(data):
    return data.prefix_data(600, seed=0)


@pytest.fixture(scope="module")
def clip_pool(data):
    return data.clip_data(600, seed=0)


def test_no_image_of_the_clip_or_prefix_stage_shows_a_held_out_combination(clip_pool, prefix_pool):
    # each item's first text is the canonical caption of the rendered scene (its every object);
    # a colourless view's names no colour, and its image holds nothing but greys
    for pool in (clip_pool, prefix_pool):
        captions = [texts[0].removeprefix(CAPTION_PROMPT).strip() for texts in pool.texts]
        assert len(captions) == len(pool) >= 600
        coloured = [i for i, c in enumerate(captions) if names_in(c)]
        assert not any(names_in(captions[i]) & set(HELD_NAMES) for i in coloured)
        for i in set(range(len(pool))) - set(coloured):
            assert not re.search(rf"\b({'|'.join(sw.COLORS)})\b", " ".join(pool.texts[i]))
            image = pool.images[i].int()
            assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
            drawn = image[..., 0][image[..., 0] > 40].float()  # no white: augmentation (JPEG,
            assert drawn.median() <= sw.GREYS[1] + 10  # rescaling) overshoots at edges only


def test_the_clip_stage_shows_a_share_of_colourless_views_and_their_twins(data, clip_pool):
    captions = [texts[0] for texts in clip_pool.texts]
    colourless = [not names_in(c) for c in captions]
    assert abs(sum(colourless) / len(captions) - data.colourless_share) < 0.1
    for first in range(0, len(captions), 2):  # twins: both colourless or neither, and distinct
        assert colourless[first] == colourless[first + 1]
        assert captions[first] != captions[first + 1]
    image = clip_pool.images[colourless.index(True)].int()
    assert image.max() >= sw.GREYS[0] - 16  # the shapes are drawn, not left black


def test_the_clip_stage_pairs_images_with_partial_captions_that_stay_true(clip_pool):
    # each item's last text leaves attributes out of every object (the same ones for all of
    # them) and names only what the object is, in the canonical order
    patterns = set()
    for texts in clip_pool.texts:
        objects = [p.split()[1:] for p in texts[0].split(" left of ")]  # size, [colour], shape
        parts = [p.split() for p in texts[-1].split(" left of ")]
        assert len(parts) == len(objects)
        kept = set()
        for (article, *words), (size, *colour, shape) in zip(parts, objects, strict=True):
            assert article == ("an" if words[0][0] in "aeiou" else "a")
            named = [w for w in (size, *colour) if w in words] + [shape]
            assert words == named[:-1] + [shape if shape in words else "shape"]
            assert words != [size, *colour, shape]  # something is left out
            kept.add((size in words, bool(colour) and colour[0] in words, shape in words))
        assert len(kept) == 1
        patterns |= kept
    keeps = {tuple(a in keep for a in ("size", "color", "shape")) for keep in sw.PARTIAL_KEEPS}
    assert patterns == keeps


def test_prefix_stage_asks_only_seen_forms_and_never_names_a_held_out_combination(prefix_pool):
    questions = [re.match(r"Question: (.+\?) Answer: (\w+)$", t) for ts in prefix_pool.texts
                 for t in ts if t.startswith("Question:")]  # fmt: skip
    assert len(questions) > 3000 and all(questions)
    asked = {q[1] for q in questions}
    assert not any(sw.is_held_out_form(q) for q in asked)
    assert not any(names_in(q) & set(HELD_NAMES) for q in asked)
    # every seen form of every kind is used (the seen pool is not just the canonical form)
    used = {form for q in asked for form in _forms_of(q)}
    seen = {f for forms in sw.QUESTION_FORMS.values() for f in forms} - sw.HELD_OUT_FORMS
    assert used == seen


def test_referents_are_the_objects_a_question_names_in_any_form():
    star = sw.Obj("star", "red", "small", 0.2, 0.5)
    circle = sw.Obj("circle", "blue", "large", 0.5, 0.5)
    other = sw.Obj("circle", "red", "small", 0.8, 0.5)
    scene = sw.Scene((star, circle, other))
    assert sw.referents(scene, "what colour is the star?") == (star,)
    assert sw.referents(scene, "what is the color of the star?") == (star,)  # held-out form
    assert sw.referents(scene, "which shape is blue?") == (circle,)
    assert sw.referents(scene, "how big is the red circle?") == (other,)
    assert sw.referents(scene, "what color is the circle?") == (circle, other)  # not unique
    assert sw.referents(scene, "do you see a green star?") == ()  # not there
    assert sw.referents(scene, "how many shapes are there?") == ()  # the whole scene
    assert sw.referents(scene, "what is left of the blue circle?") == ()
    with pytest.raises(ValueError, match="unknown question"):
        sw.referents(scene, "why is the star red?")


def test_prefix_stage_teacher_lines_caption_the_one_object_a_question_is_about(prefix_pool):
    lines = prefix_pool.teacher_lines
    assert len(lines) == len(prefix_pool.texts) and sum(map(len, lines)) > 1000
    for texts, taught in zip(prefix_pool.texts, lines, strict=True):
        prompts = {t.rpartition(" Answer:")[0] + " Answer:" for t in texts if "Answer:" in t}
        assert set(taught) <= prompts  # keyed by the prompt of one of the item's questions
        for prompt, line in taught.items():
            assert line.startswith(f"{CAPTION_PROMPT} a ") and " left of " not in line
            kind = sw.question_type(prompt.removeprefix("Question: ").removesuffix(" Answer:"))
            assert kind in ("color", "shape", "size", "exists")
            answer = next(t for t in texts if t.startswith(prompt)).rpartition(" ")[2]
            assert answer in line.split() or answer == "yes", (prompt, line)


def _forms_of(question: str) -> set[str]:
    return {form for forms in sw.QUESTION_FORMS.values() for form in forms
            if sw.form_pattern(form).fullmatch(question)}  # fmt: skip


def test_the_lm_reads_every_combination_every_form_and_k_shot_lists(lm_texts):
    text = "\n".join(lm_texts)
    assert set(sw.labels()) <= names_in(text)  # held-out combinations included
    lines = [line for doc in lm_texts for line in doc.split("\n")]
    asked = {m[1] for line in lines if (m := re.match(r"Question: (.+\?) Answer: \w+$", line))}
    assert set().union(*map(_forms_of, asked)) == {
        f for forms in sw.QUESTION_FORMS.values() for f in forms
    }
    named = {k for ks in sw.FEW_SHOT_KEYS.values() for k in ks} | set(sw.GENERIC_KEYS)
    key_lines = [line for line in lines if not line.startswith(("Caption:", "Question:"))]
    assert 0.15 < len(key_lines) / len(lines) < 0.6
    keys = "|".join(map(re.escape, sorted(named | set(sw.MADE_UP_KEYS), key=len, reverse=True)))
    separators = sw.SEPARATORS + sw.MADE_UP_SEPARATORS
    pattern = "|".join(map(re.escape, sorted(separators, key=len, reverse=True)))
    formats = [re.match(rf"({keys})({pattern})\w", line) for line in key_lines]
    assert all(formats)
    # about half the lists use a made-up key, half a made-up separator: formats vary
    made_up = [m[1] in sw.MADE_UP_KEYS for m in formats]
    assert 0.3 < sum(made_up) / len(made_up) < 0.7
    assert len({m[2] for m in formats}) > 20 and len({m[1] for m in formats}) > 200


def test_held_out_few_shot_formats_appear_in_no_training_text(lm_texts, prefix_pool, clip_pool):
    texts = list(lm_texts) + [t for ts in prefix_pool.texts + clip_pool.texts for t in ts]
    held = [*sw.HELD_OUT_KEYS, *(s.strip() for s in sw.HELD_OUT_SEPARATORS)]
    # the made-up formats do not spell a held-out one, even inside a longer word
    assert not any(h.lower() in key.lower() for h in sw.HELD_OUT_KEYS for key in sw.MADE_UP_KEYS)
    assert not any("=>" in separator for separator in sw.MADE_UP_SEPARATORS)
    for text in texts:
        words = set(re.findall(r"[\w=>]+", text))
        assert not words & set(held), text


def test_few_shot_documents_hide_the_query_value_in_about_half():
    rng = random.Random(3)
    hidden = 0
    separators = sorted(sw.SEPARATORS + sw.MADE_UP_SEPARATORS, key=len, reverse=True)
    separator = re.compile("|".join(map(re.escape, separators)))
    for _ in range(400):
        lines = sw.few_shot_document(rng, CAPTION_PROMPT).split("\n")
        values = [separator.split(line, maxsplit=1)[1] for line in lines[1::2]]
        assert len(lines) % 2 == 0 and all(line.startswith("Caption: ") for line in lines[::2])
        hidden += values[-1] not in values[:-1]
    assert 0.4 < hidden / 400 < 0.9


def test_the_lm_weighs_k_shot_values_as_answers(data, lm_texts):
    from vlm.factory import train_tokenizer
    from vlm.training.text_batches import answer_mask, pack_texts

    tokenizer = train_tokenizer(lm_texts[:1000], 400)
    document = "Caption: a small red circle\nHue: red\nCaption: a large blue star\nTag -> star"
    texts = ["Question: what color is it? Answer: red", document]
    length = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # one block, EOS each
    blocks = pack_texts(tokenizer, texts, length)
    marked = tokenizer.decode(blocks[answer_mask(tokenizer, blocks, "Answer:", data.answer_cues())])
    # the answer and the value after a seen key; "Hue" is a held-out key, never weighed
    assert marked.split() == ["red", "star"]


def test_colourless_views_draw_in_grey_and_speak_without_colour():
    scene = sw.Scene((sw.Obj("circle", "orange", "small", 0.3, 0.5),
                      sw.Obj("star", "white", "large", 0.7, 0.5)))  # fmt: skip
    assert sw.describe(scene, colour=False) == "a small circle left of a large star"
    assert not names_in(sw.paraphrase(scene, random.Random(0), colour=False))
    colourless = sw.partial_description(scene, random.Random(0), colour=False)
    assert colourless == "a circle left of a star"
    partials = {sw.partial_description(scene, random.Random(seed)) for seed in range(40)}
    assert "an orange circle left of a white star" in partials
    assert "a small orange shape left of a large white shape" in partials
    pixels = sw.render(scene, 64, grey=120).getcolors(64 * 64)
    assert all(r == g == b for _, (r, g, b) in pixels)
    assert max((n, c) for n, c in pixels if c[0] > 40)[1] == (120, 120, 120)
    with pytest.raises(ValueError, match="grey"):
        sw.render(scene, 64, grey=255)  # white is a palette colour, not a colourless grey
