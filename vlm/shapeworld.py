"""
ShapeWorld: a tiny synthetic world of coloured shapes for training and evaluating a small VLM.

A scene holds 1-3 non-overlapping filled shapes on a black background. Everything about a scene
is known exactly, so we can render it, caption it and ask it questions with unambiguous answers.
A few colour-shape combinations (HELD_OUT) never appear in training scenes, which lets us test
compositional generalisation: the model has seen purple things and triangles, never both at once.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

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
    def radius(self) -> float:
        return RADIUS[self.size]


@dataclass(frozen=True)
class Scene:
    """A set of objects, always stored sorted left to right by x."""

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.x)))


def _fits(x: float, y: float, r: float, placed: list[tuple[float, float, float]]) -> bool:
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
            if not _fits(x, y, r, placed):
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


def render(scene: Scene, size: int = 128) -> Image.Image:
    """Render a scene as a size x size RGB image, drawn at 4x and downsampled for antialiasing."""
    big = 4 * size
    img = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o.shape, o.x * big, o.y * big, o.radius * big, COLORS[o.color])
    return img.resize((size, size), Image.Resampling.LANCZOS)


# -----------------------------------------------------------------------------
# language: captions, paraphrases, questions


def describe(scene: Scene) -> str:
    """The canonical caption: object phrases left to right, joined by ' left of '."""
    return " left of ".join(o.phrase for o in scene.objects)


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """A randomly chosen alternative phrasing of the scene, always true of it."""
    phrases = [o.phrase for o in scene.objects]
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


def questions(scene: Scene) -> list[tuple[str, str]]:
    """
    All unambiguous question-answer pairs about a scene, deterministic, one-word answers.
    Only objects that can be referred to uniquely are asked about.
    """
    objs = scene.objects
    shapes = Counter(o.shape for o in objs)
    colors = Counter(o.color for o in objs)
    names = Counter(o.name for o in objs)
    qa: list[tuple[str, str]] = []
    # colour of the unique object of a shape, shape of the unique object of a colour
    for o in objs:
        if shapes[o.shape] == 1:
            qa.append((f"what color is the {o.shape}?", o.color))
    for o in objs:
        if colors[o.color] == 1:
            qa.append((f"what shape is the {o.color} object?", o.shape))
    qa.append(("how many shapes are there?", NUMBER_WORDS[len(objs)]))
    # existence: a 'yes' per present combo and a 'no' per present combo, for balance. The 'no'
    # keeps the shape and takes the next absent colour; held-out combos are never used as a 'no'
    # so that training text teaches no prior against them
    present = [o.name for o in objs]
    asked: set[str] = set()
    for o in objs:
        if o.name in asked:
            continue
        qa.append((f"is there a {o.name}?", "yes"))
        asked.add(o.name)
        order = list(COLORS)
        i = order.index(o.color)
        for c in order[i + 1 :] + order[:i]:
            name = f"{c} {o.shape}"
            if name not in present and name not in asked and (c, o.shape) not in HELD_OUT:
                qa.append((f"is there a {name}?", "no"))
                asked.add(name)
                break
    for o in objs:
        if names[o.name] == 1:
            qa.append((f"what size is the {o.name}?", o.size))
    # relations: objects are sorted by x, so index i has exactly i objects to its left
    n = len(objs)
    for i, o in enumerate(objs):
        if names[o.name] != 1:
            continue
        if i == 1:
            qa.append((f"what is left of the {o.name}?", objs[0].shape))
        if i == n - 2:
            qa.append((f"what is right of the {o.name}?", objs[n - 1].shape))
    return qa


def question_type(question: str) -> str:
    """Classify a question string into one of QUESTION_TYPES."""
    prefixes = {
        "what color is": "color",
        "what shape is": "shape",
        "how many": "count",
        "is there": "exists",
        "what size is": "size",
        "what is left of": "relation",
        "what is right of": "relation",
    }
    for prefix, kind in prefixes.items():
        if question.startswith(prefix):
            return kind
    raise ValueError(f"unknown question type: {question!r}")


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
            yield f"Question: {q} Answer: {a}"
