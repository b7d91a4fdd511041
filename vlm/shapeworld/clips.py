"""ShapeWorld that moves: short clips in which each object moves left, right, up or down,
appears, disappears or stays, with their descriptions in time order and questions about them.

A clip is a set of tracks (an object, what it does and when) over `seconds` at `fps`; every
frame is a ShapeWorld scene (objects apart, left and right obvious), so each frame has its
caption too, and its frame line (`describe_frame`: the caption with where each object is, on
a grid of GRID × GRID cells), from which what happened can be read: a frame a second shows
every appearance and disappearance (they happen on whole seconds) and every move (one that
crosses a cell at least). HELD_OUT combinations keep their meaning (never in a training clip), and
HELD_OUT_MOTIONS are motions never paired with any training clip: the language model reads
them in text only (`clip_narrative`), as HELD_OUT_FORMS for questions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from PIL import Image

from ..prompts import TRACKS_PROMPT, VIDEO_PROMPT, frame_prompt, qa_text
from .world import (
    BOUND,
    COLORS,
    HELD_OUT,
    MARGIN,
    MAX_TRIES,
    MIN_DX,
    NUMBER_WORDS,
    PAD,
    RADIUS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    describe,
    render,
)

MOTIONS = ("moves left", "moves right", "moves up", "moves down", "appears", "disappears",
           "stays")  # fmt: skip
DIRECTIONS = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1),
              "moves down": (0, 1)}  # fmt: skip
# motions never shown in a training clip: the LM reads them in clip narratives only
HELD_OUT_MOTIONS: tuple[str, ...] = ("moves down",)
CLIP_SPLITS = ("train", "held_out", "held_out_motion", "any")
TRAVEL = (0.25, 0.4)  # how far a moving object goes over the clip (fraction of the side)
SECONDS, FPS = 4, 4  # a clip's length and frame rate
GRID = 5  # cells a side for where an object is in a frame line (x1 … x5 left to right, y1 …
# y5 top to bottom): a move's shortest travel over three seconds, 0.8 × 0.25 of the side,
# crosses a cell boundary


@dataclass(frozen=True)
class Track:
    """One object of a clip: where it starts (`obj`), what it does, and for an object that
    appears or disappears, the frame where that happens (its first or first missing frame)."""

    obj: Obj
    motion: str
    at: int = 0  # the frame of an appearance or disappearance
    travel: float = 0.0  # how far a moving object goes, over the whole clip

    def where(self, frame: int, frames: int) -> Obj | None:
        """The object as it is in `frame` (None where it is not there)."""
        if self.motion == "appears" and frame < self.at:
            return None
        if self.motion == "disappears" and frame >= self.at:
            return None
        if self.motion not in DIRECTIONS:
            return self.obj
        dx, dy = DIRECTIONS[self.motion]
        done = frame / max(1, frames - 1)
        return replace(self.obj, x=self.obj.x + dx * self.travel * done,
                       y=self.obj.y + dy * self.travel * done)  # fmt: skip

    @property
    def start(self) -> int:
        """When what it does begins (a move or a stay: from the first frame)."""
        return self.at if self.motion in ("appears", "disappears") else 0


@dataclass(frozen=True)
class Clip:
    """A few seconds of ShapeWorld: its tracks, length and frame rate."""

    tracks: tuple[Track, ...]
    seconds: float = SECONDS
    fps: float = FPS

    @property
    def frames(self) -> int:
        return max(1, round(self.seconds * self.fps))

    def scene(self, frame: int) -> Scene:
        """The scene of one frame (objects that are not there left out)."""
        shown = (t.where(frame, self.frames) for t in self.tracks)
        return Scene(tuple(o for o in shown if o is not None))

    def scenes(self) -> list[Scene]:
        return [self.scene(i) for i in range(self.frames)]


def _frame_ok(objects: list[Obj]) -> bool:
    """Whether a frame's objects keep inside the image and apart, left and right obvious."""
    for i, o in enumerate(objects):
        r = BOUND * RADIUS[o.size]
        if not (r + PAD <= o.x <= 1 - r - PAD and r + PAD <= o.y <= 1 - r - PAD):
            return False
        for p in objects[:i]:
            gap = math.hypot(o.x - p.x, o.y - p.y) - r - BOUND * RADIUS[p.size]
            if abs(o.x - p.x) < MIN_DX or gap < MARGIN:
                return False
    return True


def _motions(rng: random.Random, n: int, split: str) -> list[str]:
    allowed = [m for m in MOTIONS if m not in HELD_OUT_MOTIONS] if split != "any" else MOTIONS
    motions = [rng.choice(allowed) for _ in range(n)]
    if split == "held_out_motion":
        motions[rng.randrange(n)] = rng.choice(HELD_OUT_MOTIONS)
    if all(m == "stays" for m in motions):  # something happens in every clip
        motions[rng.randrange(n)] = rng.choice([m for m in allowed if m != "stays"])
    return motions


def sample_clip(rng: random.Random, split: str = "train", n_objects: int | None = None,
                seconds: float = SECONDS, fps: float = FPS) -> Clip:  # fmt: skip
    """A random clip of 1-3 objects, something happening in it, deterministic given the rng.

    `split` "train": no HELD_OUT combination, no HELD_OUT_MOTIONS; "held_out": an object of a
    HELD_OUT combination that does something (moves, appears or disappears; seen motions);
    "held_out_motion": seen combinations, an object doing a HELD_OUT_MOTIONS; "any":
    anything."""
    if split not in CLIP_SPLITS:
        raise ValueError(f"split must be one of {CLIP_SPLITS}, got {split!r}")
    n = rng.randint(1, 3) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be in 1..3, got {n}")
    frames = max(1, round(seconds * fps))
    every = [(c, s) for c in COLORS for s in SHAPES]
    seen = [cs for cs in every if cs not in HELD_OUT]
    for _ in range(MAX_TRIES):
        motions = _motions(rng, n, split)
        combos = rng.sample(every if split == "any" else seen, n)  # one name, one object
        if split == "held_out":
            active = [i for i, m in enumerate(motions) if m != "stays"]
            combos[rng.choice(active)] = rng.choice([c for c in HELD_OUT if c not in combos])
        tracks = []
        for (colour, shape), motion in zip(combos, motions, strict=True):
            size = rng.choice(SIZES)
            r = BOUND * RADIUS[size]
            obj = Obj(shape, colour, size, rng.uniform(r + PAD, 1 - r - PAD),
                      rng.uniform(r + PAD, 1 - r - PAD))  # fmt: skip
            # on a whole second before the last, so that a frame a second shows it happened
            # and two of them in one clip are in an order the frames show (then left first)
            seconds_in = max(1, int(seconds) - 1)
            at = (
                round(fps) * rng.randint(1, seconds_in)
                if motion in ("appears", "disappears")
                else 0
            )
            travel = rng.uniform(*TRAVEL) if motion in DIRECTIONS else 0.0
            tracks.append(Track(obj, motion, at if frames > 1 else 0, travel))
        clip = Clip(tuple(tracks), seconds, fps)
        every_frame = [[t.where(i, frames) for t in tracks] for i in range(frames)]
        if all(_frame_ok([o for o in objects if o is not None]) for objects in every_frame):
            return clip
    raise RuntimeError(f"could not place a {n}-object clip in {MAX_TRIES} tries")


def render_clip(clip: Clip, size: int = 128) -> list[Image.Image]:
    """The clip's frames, at `clip.fps`."""
    return [render(scene, size) for scene in clip.scenes()]


def _ordered(clip: Clip) -> list[Track]:
    """The tracks in time order: when what they do begins, then left to right at the start."""
    return sorted(clip.tracks, key=lambda t: (t.start, t.obj.x))


def describe_clip(clip: Clip) -> str:
    """The canonical description, one sentence per object in time order ("a small red circle
    moves right. a large blue star appears.")."""
    return " ".join(f"{t.obj.phrase} {t.motion}." for t in _ordered(clip))


def _names(tracks: list[Track]) -> str:
    return " and ".join(t.obj.name for t in tracks) or "nothing"


def clip_questions(clip: Clip) -> list[tuple[str, str]]:
    """(question, answer) pairs about the clip: what moved, which way each mover went, what
    appeared, what disappeared, what is there at the end and how many."""
    ordered = _ordered(clip)
    moved = [t for t in ordered if t.motion in DIRECTIONS]
    last = clip.scene(clip.frames - 1)
    pairs = [("what moved?", _names(moved))]
    for track in moved:
        pairs.append((f"which way did the {track.obj.name} move?", track.motion.split()[1]))
    pairs += [
        ("what appeared?", _names([t for t in ordered if t.motion == "appears"])),
        ("what disappeared?", _names([t for t in ordered if t.motion == "disappears"])),
        ("what is there at the end?", describe(last) if last.objects else "nothing"),
        ("how many shapes are there at the end?", NUMBER_WORDS[len(last.objects)]),
    ]
    return pairs


def cell(o: Obj) -> str:
    """Where an object is on the frame's GRID × GRID cells: "x2 y5"."""
    column, row = (min(GRID, 1 + int(v * GRID)) for v in (o.x, o.y))
    return f"x{column} y{row}"


def describe_frame(scene: Scene) -> str:
    """A frame line: the canonical caption with where each object is ("a small red circle at
    x2 y3 left of a large blue star at x4 y1"), "nothing" for an empty frame."""
    if not scene.objects:
        return "nothing"
    return " left of ".join(f"{o.phrase} at {cell(o)}" for o in scene.objects)


def _sampled(clip: Clip, every: float) -> list[int]:
    """The frames a narrative describes: one `every` seconds from the first."""
    return list(range(0, clip.frames, max(1, round(every * clip.fps))))


def clip_tracks(clip: Clip, every: float = 1.0) -> str:
    """Each object's track as read from the frame lines, `every` seconds: in the order the
    lines first show them (the first frame left to right, then those that appear), its
    phrase, its cell in each line ("-" where it is not there) and what it does ("a small red
    circle x2 y3 x3 y3 x3 y3 x4 y3 moves right; a large blue star - - x4 y1 x4 y1 appears").
    The step between the lines and what happened, each part of it read off one place: a
    3-layer LM reading what happened straight from the lines bound objects and moves wrong."""
    picked = _sampled(clip, every)
    seen: list[Track] = []
    for frame in picked:
        here = [t for t in clip.tracks if t.where(frame, clip.frames) is not None]
        here.sort(key=lambda t: t.where(frame, clip.frames).x)
        seen += [t for t in here if t not in seen]
    tracks = []
    for track in seen:
        cells = [cell(o) if (o := track.where(f, clip.frames)) else "-" for f in picked]
        tracks.append(f"{track.obj.phrase} {' '.join(cells)} {track.motion}")
    return "; ".join(tracks)


def clip_narrative(clip: Clip, rng: random.Random | None = None, every: float = 1.0) -> str:
    """A text for the language model: the clip's frames described one by one, `every`
    seconds, each after its timestamp (`vlm.prompts.frame_prompt`) by its frame line
    (`describe_frame`), then each object's track (`clip_tracks`), then what happened, then
    (with `rng`) one question about it and its answer."""
    lines = [f"{frame_prompt(f / clip.fps)} {describe_frame(clip.scene(f))}"
             for f in _sampled(clip, every)]  # fmt: skip
    lines.append(f"{TRACKS_PROMPT} {clip_tracks(clip, every)}")
    lines.append(f"{VIDEO_PROMPT} {describe_clip(clip)}")
    if rng is not None:
        lines.append(qa_text(*rng.choice(clip_questions(clip))))
    return "\n".join(lines)
