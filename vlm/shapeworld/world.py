"""
ShapeWorld: a tiny synthetic world of coloured shapes for training and evaluating a small VLM.

A scene holds 1-3 non-overlapping filled shapes on a black background. Everything about a scene
is known exactly, so we can render it, caption it and ask it questions with unambiguous answers.
A few colour-shape combinations (HELD_OUT) never appear in training scenes, which lets us test
compositional generalisation: the model has seen purple things and triangles, never both at once.
Questions come in several forms (QUESTION_FORMS), of which HELD_OUT_FORMS are never asked of a
training image, and k-shot lists (few_shot_document) in formats of which HELD_OUT_KEYS and
HELD_OUT_SEPARATORS appear nowhere in training: the language model reads them only as text.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..prompts import qa_text

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "GREYS",
    "RADIUS",
    "HELD_OUT",
    "SPLITS",
    "QUESTION_TYPES",
    "TEMPLATES",
    "NUMBER_WORDS",
    "BOUND",
    "MARGIN",
    "PAD",
    "MIN_DX",
    "MAX_TRIES",
    "labels",
    "Obj",
    "Scene",
    "fits",
    "sample_scene",
    "render",
    "describe",
    "PARTIAL_KEEPS",
    "partial_description",
    "paraphrase",
    "QUESTION_FORMS",
    "HELD_OUT_FORMS",
    "FORM_POOLS",
    "form_pattern",
    "questions",
    "parse_question",
    "question_type",
    "referents",
    "is_held_out_form",
    "corpus",
    "FEW_SHOT_ATTRIBUTES",
    "FEW_SHOT_KEYS",
    "GENERIC_KEYS",
    "SEPARATORS",
    "HELD_OUT_KEYS",
    "HELD_OUT_SEPARATORS",
    "attribute",
    "few_shot_document",
    "everyday_captions",
    "write_captioned_folder",
    "MADE_UP_KEYS",
    "MADE_UP_SEPARATORS",
]


# -----------------------------------------------------------------------------
# the world's vocabulary

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 255),
    "yellow": (245, 230, 20),
    "purple": (150, 60, 200),
    "orange": (255, 140, 0),
    "white": (255, 255, 255),
}
SIZES = ("small", "large")
# Colourless views (the encoder learns shape apart from colour): every object drawn in one grey
# of this range, which is no palette colour (white is 255), captioned without colour words.
GREYS = (90, 170)
RADIUS = {"small": 0.085, "large": 0.15}  # outer radius, as a fraction of the image side

# (colour, shape) pairs that never occur in training scenes; each colour and shape at most twice
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("purple", "triangle"),
    ("green", "star"),
    ("orange", "circle"),
    ("white", "square"),
    ("blue", "cross"),
)
SPLITS = ("train", "held_out", "any")

QUESTION_TYPES = ("color", "shape", "count", "exists", "size", "relation")
TEMPLATES = ("a small {}", "a large {}", "a {}")  # zero-shot classification prompts
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# placement geometry (fractions of the image side)
BOUND = 1.15  # bounding-circle radius / outer radius; covers the square's corners (0.8 * sqrt 2)
MARGIN = 0.03  # minimum gap between the bounding circles of two objects
PAD = 0.02  # minimum gap between a bounding circle and the image border
MIN_DX = 0.12  # minimum horizontal distance between two centres, so left/right is obvious
MAX_TRIES = 10_000  # whole-layout rejection-sampling attempts (3 large objects: ~2% succeed)


def labels() -> list[str]:
    """All 35 colour-shape labels, e.g. 'red circle', in COLORS x SHAPES order."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


# -----------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class Obj:
    """One shape; (x, y) is its centre in [0, 1] image units, y pointing down."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.color not in COLORS or self.size not in SIZES:
            raise ValueError(f"unknown shape, color or size in {self}")

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.name}"

    @property
    def colourless_phrase(self) -> str:
        return f"a {self.size} {self.shape}"

    @property
    def radius(self) -> float:
        return RADIUS[self.size]


@dataclass(frozen=True)
class Scene:
    """A set of objects, always stored sorted left to right by x."""

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.x)))


def fits(x: float, y: float, r: float, placed: list[tuple[float, float, float]]) -> bool:
    """Whether a bounding circle (x, y, r) keeps clear of all placed ones, in x and in space."""
    for px, py, pr in placed:
        if abs(x - px) < MIN_DX or math.hypot(x - px, y - py) < r + pr + MARGIN:
            return False
    return True


def _layout(rng: random.Random, radii: list[float]) -> list[tuple[float, float]]:
    """Random centres for bounding circles of the given radii: inside, separated, no overlap."""
    for _ in range(MAX_TRIES):
        placed: list[tuple[float, float, float]] = []
        for r in radii:
            lo, hi = r + PAD, 1.0 - r - PAD
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if not fits(x, y, r, placed):
                break  # start the whole layout again, keeping things simple and unbiased
            placed.append((x, y, r))
        else:
            return [(x, y) for x, y, _ in placed]
    raise RuntimeError(f"could not place {len(radii)} objects in {MAX_TRIES} tries")


def sample_scene(rng: random.Random, n_objects: int | None = None, split: str = "train") -> Scene:
    """
    A random scene, deterministic given the rng state.
    split 'train': no object is a HELD_OUT combo; 'held_out': at least one is; 'any': anything.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = rng.randint(1, 3) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be in 1..3, got {n}")
    every = [(c, s) for c in COLORS for s in SHAPES]
    allowed = [cs for cs in every if cs not in HELD_OUT] if split == "train" else every
    combos = [rng.choice(allowed) for _ in range(n)]
    if split == "held_out":
        combos[rng.randrange(n)] = rng.choice(HELD_OUT)
    sizes = [rng.choice(SIZES) for _ in range(n)]
    centres = _layout(rng, [BOUND * RADIUS[s] for s in sizes])
    objs = (Obj(s, c, z, x, y) for (c, s), z, (x, y) in zip(combos, sizes, centres, strict=True))
    return Scene(tuple(objs))


# -----------------------------------------------------------------------------
# rendering


def _polygon(cx: float, cy: float, radii: list[float], start: float = -90.0) -> list[tuple]:
    """Vertices at evenly spaced angles (degrees, starting straight up) with the given radii."""
    step = 360.0 / len(radii)
    points = []
    for i, r in enumerate(radii):
        a = math.radians(start + i * step)
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one filled shape with outer radius r (pixels) centred on (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.8 * r  # side 1.6 r: about the circle's area
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        # upward equilateral triangle, centroid on the centre, slightly enlarged to hold its own
        draw.polygon(_polygon(cx, cy, [1.1 * r] * 3), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.45 * r] * 5), fill=fill)
    elif shape == "cross":
        t = 0.3 * r  # half arm thickness: arms 0.6 r wide, clearly a '+'
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 128, grey: int | None = None) -> Image.Image:
    """Render a scene as a size x size RGB image, drawn at 4x and downsampled for antialiasing.
    `grey` (in GREYS): a colourless view, every object drawn in that grey."""
    if grey is not None and not GREYS[0] <= grey <= GREYS[1]:
        raise ValueError(f"grey must lie in {GREYS}, got {grey}")
    big = 4 * size
    img = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = COLORS[o.color] if grey is None else (grey, grey, grey)
        _draw(draw, o.shape, o.x * big, o.y * big, o.radius * big, fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


# -----------------------------------------------------------------------------
# language: captions, paraphrases, questions


def _phrases(scene: Scene, colour: bool) -> list[str]:
    return [o.phrase if colour else o.colourless_phrase for o in scene.objects]


def describe(scene: Scene, colour: bool = True) -> str:
    """The canonical caption: object phrases left to right, joined by ' left of '.
    `colour=False`: without colour words ("a small circle left of a large star")."""
    return " left of ".join(_phrases(scene, colour))


# What a partial caption keeps of every object (alt-text rarely names everything): the rest is
# left out, so the encoder learns each attribute's words apart from the others ("a star" is
# every star, whatever its colour and size). A colourless view keeps only its shapes.
PARTIAL_KEEPS: tuple[tuple[str, ...], ...] = (
    ("color", "shape"), ("size", "shape"), ("shape",), ("size", "color"), ("color",),
)  # fmt: skip


def _partial_phrase(o: Obj, keep: tuple[str, ...]) -> str:
    words = [getattr(o, attribute) for attribute in ("size", "color") if attribute in keep]
    text = " ".join([*words, o.shape if "shape" in keep else "shape"])
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def partial_description(scene: Scene, rng: random.Random, colour: bool = True) -> str:
    """The canonical caption with attributes left out, the same for every object, by a random
    one of PARTIAL_KEEPS ("an orange star left of a white cross", "a red shape"); always true
    of the scene. `colour=False`: shapes only ("a star left of a circle")."""
    keep = rng.choice(PARTIAL_KEEPS) if colour else ("shape",)
    return " left of ".join(_partial_phrase(o, keep) for o in scene.objects)


def paraphrase(scene: Scene, rng: random.Random, colour: bool = True) -> str:
    """A randomly chosen alternative phrasing of the scene, always true of it."""
    phrases = _phrases(scene, colour)
    if len(phrases) == 1:
        options = [
            phrases[0],
            f"there is {phrases[0]}",
            f"an image of {phrases[0]}",
            f"{phrases[0]} on a black background",
        ]
        return rng.choice(options)
    rev = phrases[::-1]
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    options = [
        " left of ".join(phrases),
        " to the left of ".join(phrases),
        " right of ".join(rev),
        " to the right of ".join(rev),
        "there is " + " left of ".join(phrases),
        f"{NUMBER_WORDS[len(phrases)]} shapes: {listed}",
        f"from left to right: {listed}",
    ]
    return rng.choice(options)


# Ways of asking each kind of question ("left"/"right" are the two relation kinds). The first
# form of a kind is canonical. The LM's text uses every form; images are paired only with the
# others: HELD_OUT_FORMS are never asked of any training image, so a model answering them has
# carried them over from its language model. Forms ending in " it?" need a one-object scene.
QUESTION_FORMS: dict[str, tuple[str, ...]] = {
    "color": ("what color is the {shape}?", "which color is the {shape}?",
              "what colour is the {shape}?", "the {shape} is which color?",
              "what is the color of the {shape}?", "what color is it?"),
    "shape": ("what shape is the {color} object?", "which shape is {color}?",
              "what shape is the {color} thing?", "the {color} object is which shape?",
              "what is the shape of the {color} object?", "what shape is it?"),
    "count": ("how many shapes are there?", "how many objects are there?",
              "how many shapes do you see?", "how many things are there?",
              "how many objects are in the picture?"),
    "exists": ("is there a {name}?", "is there any {name}?", "can you see a {name}?",
               "does the picture show a {name}?", "do you see a {name}?"),
    "size": ("what size is the {name}?", "is the {name} small or large?",
             "which size is the {name}?", "the {name} has which size?", "how big is the {name}?"),
    "left": ("what is left of the {name}?", "which shape is left of the {name}?",
             "what shape is left of the {name}?", "what is to the left of the {name}?"),
    "right": ("what is right of the {name}?", "which shape is right of the {name}?",
              "what shape is right of the {name}?", "what is to the right of the {name}?"),
}  # fmt: skip
HELD_OUT_FORMS: frozenset[str] = frozenset({
    "what is the color of the {shape}?", "what color is it?",
    "what is the shape of the {color} object?", "what shape is it?",
    "how many objects are in the picture?", "do you see a {name}?", "how big is the {name}?",
    "what is to the left of the {name}?", "what is to the right of the {name}?",
})  # fmt: skip
FORM_POOLS = ("canonical", "seen", "held_out", "all")
_RELATION_KINDS = {"left": "relation", "right": "relation"}


def form_pattern(form: str) -> re.Pattern:
    words = {"{shape}": r"(?P<shape>\w+)", "{color}": r"(?P<color>\w+)",
             "{name}": r"(?P<name>\w+ \w+)"}  # fmt: skip
    pattern = re.escape(form)
    for slot, group in words.items():
        pattern = pattern.replace(re.escape(slot), group)
    return re.compile(pattern)


_PATTERNS = [(kind, form, form_pattern(form)) for kind, forms in QUESTION_FORMS.items()
             for form in forms]  # fmt: skip


def _forms(kind: str, pool: str, one_object: bool) -> list[str]:
    forms = [f for f in QUESTION_FORMS[kind] if one_object or not f.endswith(" it?")]
    if pool == "canonical":
        return forms[:1]
    if pool == "seen":
        return [f for f in forms if f not in HELD_OUT_FORMS]
    if pool == "held_out":
        return [f for f in forms if f in HELD_OUT_FORMS]
    if pool == "all":
        return forms
    raise ValueError(f"forms must be one of {FORM_POOLS}, got {pool!r}")


def _asks(scene: Scene, held_out_no: bool) -> list[tuple[str, dict[str, str], str]]:
    """(kind, slots, answer) of every unambiguous question about a scene, deterministic."""
    objs = scene.objects
    shapes = Counter(o.shape for o in objs)
    colors = Counter(o.color for o in objs)
    names = Counter(o.name for o in objs)
    asks: list[tuple[str, dict[str, str], str]] = []
    # colour of the unique object of a shape, shape of the unique object of a colour
    asks += [("color", {"shape": o.shape}, o.color) for o in objs if shapes[o.shape] == 1]
    asks += [("shape", {"color": o.color}, o.shape) for o in objs if colors[o.color] == 1]
    asks.append(("count", {}, NUMBER_WORDS[len(objs)]))
    # existence: a 'yes' per present combo and a 'no' per present combo, for balance. The 'no'
    # keeps the shape and takes the next absent colour; unless `held_out_no`, held-out combos
    # are never used as a 'no', so that what is paired with images teaches no prior against them
    present = [o.name for o in objs]
    asked: set[str] = set()
    for o in objs:
        if o.name in asked:
            continue
        asks.append(("exists", {"name": o.name}, "yes"))
        asked.add(o.name)
        order = list(COLORS)
        i = order.index(o.color)
        for c in order[i + 1 :] + order[:i]:
            name = f"{c} {o.shape}"
            allowed = held_out_no or (c, o.shape) not in HELD_OUT
            if name not in present and name not in asked and allowed:
                asks.append(("exists", {"name": name}, "no"))
                asked.add(name)
                break
    asks += [("size", {"name": o.name}, o.size) for o in objs if names[o.name] == 1]
    # relations: objects are sorted by x, so index i has exactly i objects to its left
    n = len(objs)
    for i, o in enumerate(objs):
        if names[o.name] != 1:
            continue
        if i == 1:
            asks.append(("left", {"name": o.name}, objs[0].shape))
        if i == n - 2:
            asks.append(("right", {"name": o.name}, objs[n - 1].shape))
    return asks


def questions(
    scene: Scene, rng: random.Random | None = None, forms: str = "canonical",
    held_out_no: bool = False,
) -> list[tuple[str, str]]:  # fmt: skip
    """
    All unambiguous question-answer pairs about a scene, one-word answers; only objects that
    can be referred to uniquely are asked about. `forms` chooses how each is asked: the
    canonical form (deterministic), or with `rng` a random one of the `seen` forms (those
    paired with images), the `held_out` forms (never paired with an image; questions of a
    kind that has none applicable are left out) or `all`. `held_out_no`: a 'no' question may
    name a HELD_OUT combination (the LM's text; never with images).
    """
    if forms != "canonical" and rng is None:
        raise ValueError(f"forms={forms!r} picks a form at random: give an rng")
    one_object = len(scene.objects) == 1
    qa = []
    for kind, slots, answer in _asks(scene, held_out_no):
        options = _forms(kind, forms, one_object)
        if options:
            form = options[0] if forms == "canonical" else rng.choice(options)
            qa.append((form.format(**slots), answer))
    return qa


def _slots(question: str) -> tuple[str, dict[str, str]]:
    """(kind of QUESTION_FORMS, the words its slots hold) of a question in any of its forms."""
    for kind, _form, pattern in _PATTERNS:
        if match := pattern.fullmatch(question):
            return kind, match.groupdict()
    raise ValueError(f"unknown question type: {question!r}")


def parse_question(question: str) -> tuple[str, str]:
    """(kind, the question in its canonical form) of a question in any of QUESTION_FORMS; the
    kind is one of QUESTION_TYPES. A one-object form ("what color is it?") has no canonical
    twin to name its object, so it is returned unchanged."""
    kind, slots = _slots(question)
    canonical = QUESTION_FORMS[kind][0]
    needed = re.findall(r"{(\w+)}", canonical)
    text = canonical.format(**slots) if all(k in slots for k in needed) else question
    return _RELATION_KINDS.get(kind, kind), text


def question_type(question: str) -> str:
    """Classify a question string (in any of QUESTION_FORMS) into one of QUESTION_TYPES."""
    return parse_question(question)[0]


# which attribute of its object a question of each kind names it by ("the star": its shape)
_NAMED_BY = {"color": "shape", "shape": "color", "size": "name", "exists": "name"}


def referents(scene: Scene, question: str) -> tuple[Obj, ...]:
    """The objects of a scene that a question (in any of QUESTION_FORMS) is about: the shape a
    colour question names, the colour a shape question names, the object a size or existence
    question names. Count and relation questions are about the scene as a whole: none."""
    kind, slots = _slots(question)
    key = _NAMED_BY.get(kind)
    if key is None or key not in slots:  # the scene, or a one-object form ("what color is it?")
        return ()
    return tuple(o for o in scene.objects if getattr(o, key) == slots[key])


def is_held_out_form(question: str) -> bool:
    """Whether a question is asked in one of HELD_OUT_FORMS."""
    return any(form in HELD_OUT_FORMS and pattern.fullmatch(question)
               for _, form, pattern in _PATTERNS)  # fmt: skip


def corpus(rng: random.Random, n: int, split: str = "train") -> Iterator[str]:
    """n lines of training text: captions, paraphrases and 'Question: ... Answer: ...' lines."""
    for _ in range(n):
        scene = sample_scene(rng, split=split)
        kind = rng.random()
        if kind < 0.3:
            yield describe(scene)
        elif kind < 0.5:
            yield paraphrase(scene, rng)
        else:
            q, a = rng.choice(questions(scene))
            yield qa_text(q, a)


# -----------------------------------------------------------------------------
# few-shot lists (Frozen): examples of a made-up format set the attribute and the format

# An item of a k-shot list is a scene followed by a "<key><separator><value>" line; the LM must
# infer from the examples which attribute the key asks for. Keys of an attribute, plus generic
# keys that say nothing (only the values tell), are read in the LM's text; HELD_OUT_KEYS and
# HELD_OUT_SEPARATORS appear nowhere in training, text or images.
FEW_SHOT_ATTRIBUTES = ("color", "shape", "size", "count", "name")
FEW_SHOT_KEYS: dict[str, tuple[str, ...]] = {
    "color": ("Colour", "Color", "colour", "color", "Paint"),
    "shape": ("Shape", "shape", "Kind", "Type"),
    "size": ("Size", "size", "Big or small"),
    "count": ("Count", "Number", "How many"),
    "name": ("Object", "Thing", "Name"),
}
GENERIC_KEYS = ("Answer", "Value", "Label", "Output", "Result", "Tag", "Word", "A", "Out", "Q")
SEPARATORS = (": ", " = ", " -> ", " - ")
HELD_OUT_KEYS = ("Hue", "Form", "Scale", "Property", "Reply")
HELD_OUT_SEPARATORS = (" => ",)


def _made_up_formats(n_keys: int = 300) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Made-up keys (pseudo-words: "Bako", "tirune") and separators (" ~ ", ":: ", " | "),
    drawn once from a fixed seed. Half of the k-shot lists in the LM's text use them, so a key
    or separator the LM never read is the usual case, not a surprise: with only the named ones
    the LM learned them by heart, and a list after "Hue" or " => " got 49% and 0% (as text).
    None contains a held-out key or separator, nor a word the scenes are described with."""
    rng = random.Random("made-up-few-shot-formats")
    banned = [k.lower() for k in HELD_OUT_KEYS]
    words = {*COLORS, *SHAPES, *SIZES, *NUMBER_WORDS, "caption", "question", "answer"}
    keys: set[str] = set()
    while len(keys) < n_keys:
        syllables = (rng.choice("bdfgklmnprstvz") + rng.choice("aeiou")
                     for _ in range(rng.randint(1, 3)))  # fmt: skip
        word = "".join(syllables) + rng.choice(["", "", "n", "r", "s"])
        if any(b in word for b in banned) or word in words:
            continue
        keys.add(word.capitalize() if rng.random() < 0.6 else word)
    marks = [":", "=", "-", "~", "|", ">", "*", "#", "/", ";", "."]
    separators: set[str] = set()
    while len(separators) < 24:
        mark = "".join(rng.choice(marks) for _ in range(rng.randint(1, 2)))
        separator = rng.choice(["", " "]) + mark + " "
        if "=>" not in separator and separator not in SEPARATORS + HELD_OUT_SEPARATORS:
            separators.add(separator)
    return tuple(sorted(keys)), tuple(sorted(separators))


MADE_UP_KEYS, MADE_UP_SEPARATORS = _made_up_formats()


def attribute(scene: Scene, name: str) -> str:
    """A scene's value of a few-shot attribute; all but `count` describe its one object."""
    if name == "count":
        return NUMBER_WORDS[len(scene.objects)]
    if len(scene.objects) != 1:
        raise ValueError(f"the {name} of a scene needs a one-object scene")
    obj = scene.objects[0]
    return obj.name if name == "name" else getattr(obj, name)


def few_shot_document(rng: random.Random, caption_prompt: str, split: str = "any") -> str:
    """A k-shot list for the LM's text: 1-4 examples and a query, each a scene written as a
    caption line (after `caption_prompt`: where a visual prefix will stand) and then its
    "<key><separator><value>" line, in a seen format (half of the keys and, drawn apart,
    half of the separators made up: MADE_UP_KEYS, MADE_UP_SEPARATORS). In about half of the
    lists the query's value is missing from the examples, so copying does not pay."""
    kind = rng.choice(FEW_SHOT_ATTRIBUTES)
    named = rng.random() < 0.5  # else a made-up key; the separator is drawn apart from it
    key = rng.choice(FEW_SHOT_KEYS[kind] + GENERIC_KEYS if named else MADE_UP_KEYS)
    separator = rng.choice(SEPARATORS if rng.random() < 0.5 else MADE_UP_SEPARATORS)
    k = rng.randint(1, 4)
    objects = None if kind == "count" else 1
    scenes = [sample_scene(rng, objects, split=split) for _ in range(k + 1)]
    if rng.random() < 0.5:  # the query's value differs from every example's
        shown = {attribute(s, kind) for s in scenes[:k]}
        for _ in range(50):
            if attribute(scenes[k], kind) not in shown:
                break
            scenes[k] = sample_scene(rng, objects, split=split)
    lines = []
    for scene in scenes:
        text = describe(scene) if rng.random() < 0.7 else paraphrase(scene, rng)
        lines += [f"{caption_prompt} {text}", f"{key}{separator}{attribute(scene, kind)}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- a folder of captioned scenes

_HOW_MANY = {1: "one shape", 2: "two shapes", 3: "three shapes"}
_EVERYDAY_SIZE = {"small": "little", "large": "big"}


def everyday_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Two captions of a scene as someone might write them (not ShapeWorld's canonical
    sentence), true of it, objects left to right."""
    things = [f"a {_EVERYDAY_SIZE[o.size]} {o.color} {o.shape}" for o in scene.objects]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    styles = [
        f"The picture has {_HOW_MANY[len(things)]}: {listed}.",
        f"From left to right: {listed}.",
        f"I drew {listed} on black.",
        f"{listed[0].upper()}{listed[1:]}, nothing else.",
    ]
    return rng.sample(styles, 2)


def write_captioned_folder(
    folder: str | Path, n: int, seed: int = 0, size: int = 64
) -> list[tuple[Path, Scene]]:
    """Write `n` scenes as `<i>.png` with a sidecar `<i>.txt` of two `everyday_captions`: a
    folder as `vlm train --data` reads one, to try training on before your own images.
    Returns each image's path and scene."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for i in range(n):
        scene = sample_scene(rng)
        path = folder / f"{i:04d}.png"
        render(scene, size).save(path)
        path.with_suffix(".txt").write_text("\n".join(everyday_captions(scene, rng)) + "\n")
        written.append((path, scene))
    return written
