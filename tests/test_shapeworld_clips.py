"""vlm.shapeworld.clips: ShapeWorld that moves. Clips are deterministic, keep their held-out
parts held out, every frame is a valid scene, and the description, the questions and the
narrative say what the frames show."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from vlm import shapeworld as sw
from vlm.prompts import TRACKS_PROMPT, VIDEO_PROMPT, frame_prompt
from vlm.shapeworld.clips import (
    DIRECTIONS,
    HELD_OUT_MOTIONS,
    MOTIONS,
    Clip,
    Track,
    cell,
    clip_narrative,
    clip_questions,
    clip_tracks,
    describe_clip,
    describe_frame,
    render_clip,
    sample_clip,
)
from vlm.shapeworld.world import Obj


def clips(split: str, n: int = 300, seed: int = 0):
    rng = random.Random(f"clips-{split}-{seed}")
    return [sample_clip(rng, split) for _ in range(n)]


def test_the_same_rng_gives_the_same_clip():
    assert clips("train", 20) == clips("train", 20)
    assert clips("train", 20) != clips("train", 20, seed=1)


def test_each_split_keeps_its_held_out_parts():
    for clip in clips("train"):
        assert not {(t.obj.color, t.obj.shape) for t in clip.tracks} & set(sw.HELD_OUT)
        assert not {t.motion for t in clip.tracks} & set(HELD_OUT_MOTIONS)
    for clip in clips("held_out"):
        active = {(t.obj.color, t.obj.shape) for t in clip.tracks if t.motion != "stays"}
        assert active & set(sw.HELD_OUT)
        assert not {t.motion for t in clip.tracks} & set(HELD_OUT_MOTIONS)
    for clip in clips("held_out_motion"):
        assert {t.motion for t in clip.tracks} & set(HELD_OUT_MOTIONS)
        assert not {(t.obj.color, t.obj.shape) for t in clip.tracks} & set(sw.HELD_OUT)
    seen = {t.motion for clip in clips("any", 600) for t in clip.tracks}
    assert seen == set(MOTIONS)
    with pytest.raises(ValueError, match="split"):
        sample_clip(random.Random(0), "test")


def test_every_frame_is_a_scene_of_objects_apart_and_inside():
    for clip in clips("any", 200):
        assert any(t.motion != "stays" for t in clip.tracks)  # something happens
        names = [t.obj.name for t in clip.tracks]
        assert len(set(names)) == len(names)  # a name says which object
        for scene in clip.scenes():
            for i, o in enumerate(scene.objects):
                assert o.x - o.radius > 0 and o.x + o.radius < 1
                assert o.y - o.radius > 0 and o.y + o.radius < 1
                for p in scene.objects[:i]:
                    assert math.hypot(o.x - p.x, o.y - p.y) > o.radius + p.radius
                    assert abs(o.x - p.x) >= sw.MIN_DX  # left and right obvious


def test_the_description_and_questions_say_what_the_frames_show():
    for clip in clips("any", 200, seed=2):
        first, last = clip.scene(0), clip.scene(clip.frames - 1)
        where = {name: {o.name: o for o in s.objects} for name, s in (("first", first),
                                                                     ("last", last))}  # fmt: skip
        for sentence in describe_clip(clip).rstrip(".").split(". "):
            words = sentence.split()
            name, motion = " ".join(words[2:4]), " ".join(words[4:])
            before, after = where["first"].get(name), where["last"].get(name)
            if motion == "appears":
                assert before is None and after is not None
            elif motion == "disappears":
                assert before is not None and after is None
            elif motion == "stays":
                assert before == after
            else:
                dx, dy = after.x - before.x, after.y - before.y
                expected = {"left": dx < -0.2, "right": dx > 0.2, "up": dy < -0.2,
                            "down": dy > 0.2}[motion.split()[1]]  # fmt: skip
                assert expected, (motion, dx, dy)
        answers = dict(clip_questions(clip))
        assert (
            answers["how many shapes are there at the end?"] == sw.NUMBER_WORDS[len(last.objects)]
        )
        assert answers["what is there at the end?"] == (sw.describe(last) if last.objects
                                                       else "nothing")  # fmt: skip
        moved = [t.obj.name for t in clip.tracks if t.motion.startswith("moves")]
        assert set(answers["what moved?"].split(" and ")) == (set(moved) or {"nothing"})


def test_frames_render_at_the_clip_rate_and_change_where_something_happens():
    clip = clips("train", 1, seed=3)[0]
    frames = render_clip(clip, 64)
    assert len(frames) == clip.frames == 16 and frames[0].size == (64, 64)
    pixels = [np.asarray(f, dtype=np.int16) for f in frames]
    assert np.abs(pixels[0] - pixels[-1]).sum() > 0
    assert np.array_equal(pixels[0], np.asarray(sw.render(clip.scene(0), 64), dtype=np.int16))


def test_the_narrative_describes_each_second_then_the_tracks_then_what_happened():
    clip = clips("train", 1, seed=4)[0]
    lines = clip_narrative(clip, random.Random(0)).split("\n")
    assert [line.split(": ")[0] + ":" for line in lines[:4]] == [
        frame_prompt(s) for s in range(4)
    ]  # fmt: skip
    assert lines[0] == f"Frame at 0:00: {describe_frame(clip.scene(0))}"
    assert lines[0].startswith(f"Frame at 0:00: {clip.scene(0).objects[0].phrase} at x")
    assert lines[4] == f"{TRACKS_PROMPT} {clip_tracks(clip)}"
    assert lines[5] == f"{VIDEO_PROMPT} {describe_clip(clip)}"
    assert lines[6].startswith("Question: ") and " Answer: " in lines[6]
    assert frame_prompt(75.9) == "Frame at 1:15:"


def test_a_frame_a_second_shows_what_happened():
    """Sampled a frame a second, a clip shows each event: an appearance or disappearance
    falls on a whole second (so two of them are ordered as the frames show them), and a move
    changes the moving object's cell in its direction between the first and the last second;
    the frame line says each object's cell."""
    for clip in clips("any", 400, seed=7):
        sampled = [round(t * clip.fps) for t in range(int(clip.seconds))]
        for track in clip.tracks:
            if track.motion in ("appears", "disappears"):
                assert track.at in sampled[1:], (track, sampled)
            if track.motion in DIRECTIONS:
                first = track.where(sampled[0], clip.frames)
                last = track.where(sampled[-1], clip.frames)
                (c0, r0), (c1, r1) = ([int(v[1:]) for v in cell(o).split()] for o in (first, last))
                dx, dy = DIRECTIONS[track.motion]
                assert (c1 - c0) * dx > 0 or (r1 - r0) * dy > 0, (track, cell(first), cell(last))
        line = describe_frame(clip.scene(0))
        assert all(f"{o.phrase} at {cell(o)}" in line for o in clip.scene(0).objects)
    assert describe_frame(sw.Scene(())) == "nothing"


def test_the_tracks_follow_each_object_through_the_lines_in_the_order_they_show_it():
    """Each object once, in the order the lines first show it (the first frame left to right,
    then what appears), its cell in each line ("-" where it is not there) and what it does;
    what it does is read off its own cells (the first and last there, the way it went)."""
    mover = Track(Obj("circle", "red", "small", 0.7, 0.5), "moves left", travel=0.3)
    staying = Track(Obj("star", "blue", "large", 0.2, 0.2), "stays")
    coming = Track(Obj("square", "green", "small", 0.3, 0.8), "appears", at=8)
    clip = Clip((mover, staying, coming))
    assert clip_tracks(clip) == (
        "a large blue star x2 y2 x2 y2 x2 y2 x2 y2 stays; "
        "a small red circle x4 y3 x4 y3 x3 y3 x3 y3 moves left; "
        "a small green square - - x2 y5 x2 y5 appears"
    )
    for clip in clips("any", 200, seed=11):
        tracks = clip_tracks(clip).split("; ")
        assert len(tracks) == len(clip.tracks)
        for text in tracks:
            track = next(t for t in clip.tracks if text.startswith(t.obj.phrase + " "))
            assert text.endswith(" " + track.motion)
            middle = text[len(track.obj.phrase) + 1 : -len(track.motion) - 1]
            cells = [None if c == "-" else (int(c[1]), int(c[4])) for c in
                     re.findall(r"x\d y\d|-", middle)]  # fmt: skip
            assert len(cells) == int(clip.seconds)
            there = [c for c in cells if c is not None]
            if track.motion == "appears":
                assert cells[0] is None and cells[-1] is not None
            elif track.motion == "disappears":
                assert cells[0] is not None and cells[-1] is None
            elif track.motion == "stays":
                assert None not in cells and len(set(cells)) == 1
            else:
                dx, dy = DIRECTIONS[track.motion]
                moved = (there[-1][0] - there[0][0]) * dx + (there[-1][1] - there[0][1]) * dy
                assert None not in cells and moved > 0
