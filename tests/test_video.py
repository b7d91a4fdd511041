"""vlm.video: a clip file sampled by time with PyAV, the frames in memory the same way, and
every bad video one clear VideoError before (or instead of) decoding."""

from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vlm.limits import Limits
from vlm.shapeworld.clips import render_clip, sample_clip
from vlm.video import VideoError, frames_video, read_video, sample_times


def write_video(path: Path, frames: list[Image.Image], fps: int, codec: str = "libx264") -> Path:
    """The frames as a video file (H.264 in MP4 by default), as a phone or an editor would."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    clip = sample_clip(random.Random("video-test"), "train", n_objects=2)
    frames = render_clip(clip, 128)
    path = write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, int(clip.fps))
    return clip, frames, path


def close(a: Image.Image, b: Image.Image) -> bool:
    """The same picture through a lossy codec: small mean difference."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return diff.mean() < 6


def test_sampling_is_by_time_and_spreads_a_long_clip():
    assert sample_times(4.0, fps=1.0) == [0.0, 1.0, 2.0, 3.0]
    assert sample_times(4.0, fps=2.0, max_frames=16) == [k / 2 for k in range(8)]
    spread = sample_times(100.0, fps=1.0, max_frames=4)
    assert spread == [12.5, 37.5, 62.5, 87.5]
    assert sample_times(0.2, fps=1.0) == [0.0]  # a clip shorter than a second: its first frame
    with pytest.raises(VideoError, match="fps"):
        sample_times(4.0, fps=0)


def test_a_file_gives_the_frames_at_each_second(clip_file):
    clip, frames, path = clip_file
    video = read_video(path, fps=1.0)
    assert video.times == [0.0, 1.0, 2.0, 3.0]
    assert video.duration == pytest.approx(clip.seconds, abs=0.3)
    for time, frame in zip(video.times, video.frames, strict=True):
        assert frame.mode == "RGB" and frame.size == (128, 128)
        assert close(frame, frames[int(time * clip.fps)]), time
    # the bytes of the file read the same way; more frames a second, at most max_frames
    assert [np.asarray(f).tolist() for f in read_video(path.read_bytes()).frames] == [
        np.asarray(f).tolist() for f in video.frames
    ]
    assert len(read_video(path, fps=4.0, max_frames=6).frames) == 6


def test_frames_in_memory_are_sampled_as_a_file_is(clip_file):
    clip, frames, _ = clip_file
    video = frames_video(frames, clip.fps, sample_fps=1.0)
    assert video.times == [0.0, 1.0, 2.0, 3.0] and video.duration == clip.seconds
    assert [np.asarray(f).tolist() for f in video.frames] == [
        np.asarray(frames[4 * k]).tolist() for k in range(4)
    ]
    with pytest.raises(VideoError, match="at least one frame"):
        frames_video([], 4)


def test_bad_videos_get_one_clear_message(clip_file, tmp_path):
    _, frames, path = clip_file
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 50)
    with pytest.raises(VideoError, match=r"notes.mp4: not a video this server can read \(Inv"):
        read_video(text)  # FFmpeg's reason, never the server's path
    with pytest.raises(VideoError) as error:
        read_video(text)
    assert str(tmp_path) not in str(error.value)
    with pytest.raises(VideoError, match="empty"):
        read_video(b"")
    with pytest.raises(VideoError, match="no such file"):
        read_video(tmp_path / "missing.mp4")
    image = tmp_path / "still.png"
    frames[0].save(image)
    with pytest.raises(VideoError, match=r"still.png: its length is not in its header"):
        read_video(image)  # FFmpeg opens a picture as a stream of unknown length
    audio = tmp_path / "sound.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoError, match="sound.m4a: no video stream"):
        read_video(audio)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    try:  # a truncated file: its frames up to the cut, or one clear message
        video = read_video(cut)
        assert video.frames and all(f.size == (128, 128) for f in video.frames)
    except VideoError as error:
        assert "cut.mp4" in str(error)


def test_the_limits_are_checked_from_the_header(clip_file):
    _, _, path = clip_file
    with pytest.raises(VideoError, match=r"too long \(4 s; the limit is 2 s\)"):
        read_video(path, limits=Limits(max_video_seconds=2))
    with pytest.raises(VideoError, match=r"too large \(128×128; the limit is 10,000 pixels\)"):
        read_video(path, limits=Limits(max_video_frame_pixels=10_000))
    with pytest.raises(VideoError, match="too large"):
        read_video(path, limits=Limits(max_file_size=1000))
    with pytest.raises(VideoError, match="at most 8 frames"):
        read_video(path, max_frames=9, limits=Limits(max_video_frames=8))


# ---------------------------------------------------------------------------- the tasks


def clip_frames(seed: str = "tasks", n_objects: int = 2):
    clip = sample_clip(random.Random(seed), "train", n_objects=n_objects)
    return clip, [frame.resize((64, 64)) for frame in render_clip(clip)]


def test_a_video_is_read_frame_by_frame_with_its_timestamps(trained, monkeypatch):
    """The frozen LM reads each sampled frame's prefix after its timestamp, then the prompt;
    the same video gives the same text, streamed or not, and the timeline is each frame's own
    caption."""
    from vlm.prompts import VIDEO_PROMPT, frame_prompt

    clip, frames = clip_frames()
    embedded = []
    original = trained.embed
    monkeypatch.setattr(trained, "embed", lambda parts: embedded.append(parts) or original(parts))
    result = trained.describe_video(frames, fps=1.0, frame_rate=clip.fps, max_new_tokens=6)
    video_calls = [p for p in embedded if any(isinstance(x, str) and VIDEO_PROMPT in x for x in p)]
    parts = video_calls[-1]  # the sequence it read (fewer frames after any that did not fit)
    texts = [p for p in parts if isinstance(p, str)]
    assert texts[0] == frame_prompt(result.times[0]) and texts[-1] == "\n" + VIDEO_PROMPT
    assert texts[1:-1] == ["\n" + frame_prompt(t) for t in result.times[1:]]
    assert sum(not isinstance(p, str) for p in parts) == len(result.times)
    monkeypatch.undo()
    again = trained.describe_video(frames, fps=1.0, frame_rate=clip.fps, max_new_tokens=6)
    assert again == result
    stream, times = trained.stream_video(frames, fps=1.0, frame_rate=clip.fps, max_new_tokens=6)
    assert stream.final().text == result.text and times == result.times
    assert result.timeline == list(zip([0.0, 1.0, 2.0, 3.0], trained.caption(
        [frames[4 * k] for k in range(4)]), strict=True))  # fmt: skip
    assert [t for t, _ in result.familiarity] == [0.0, 1.0, 2.0, 3.0]
    answer = trained.answer_video(frames, "what moved?", frame_rate=clip.fps, max_new_tokens=3)
    assert isinstance(answer.text, str) and answer.times == result.times and not answer.timeline
    # not trained on clips: its text is marked a guess; a model that declares it is not
    assert result.guess and answer.guess
    monkeypatch.setattr(trained, "tasks", trained.tasks | {"video"})
    trusted = trained.describe_video(frames, frame_rate=clip.fps, max_new_tokens=6)
    assert not trusted.guess and trusted.text == result.text


def test_a_model_that_reads_frame_lines_reads_its_own_lines_as_text(trained, monkeypatch):
    """With `video_frame_lines`, each sampled frame's line is written after its prefix and
    timestamp (the prefix made for that timestamp), then the LM reads the lines as one text,
    as in its narratives: it writes the tracks, then what happened after them; a question
    comes after what happened; the timeline is the lines."""
    from vlm.prompts import TRACKS_PROMPT, VIDEO_PROMPT, frame_prompt

    clip, frames = clip_frames()
    monkeypatch.setattr(trained.config, "video_frame_lines", True)
    for short in ("FRAME_LINE_TOKENS", "DESCRIPTION_TOKENS", "TRACK_TOKENS"):
        monkeypatch.setattr(f"vlm.pipeline.{short}", 3)  # the tiny LM reads 64 positions
    picked = [frames[4 * k] for k in range(4)]
    lines = trained.frame_lines(picked, [0.0, 1.0, 2.0, 3.0])
    prompts = []
    original_prefix = trained._prefix_from_pixels
    monkeypatch.setattr(
        trained,
        "_prefix_from_pixels",
        lambda pixels, p=None: prompts.append(p) or original_prefix(pixels, p),
    )
    embedded = []
    original = trained.embed
    monkeypatch.setattr(trained, "embed", lambda parts: embedded.append(parts) or original(parts))
    result = trained.describe_video(frames, fps=1.0, frame_rate=clip.fps, max_new_tokens=6)
    assert prompts == [[frame_prompt(t) for t in (0.0, 1.0, 2.0, 3.0)]]
    assert result.timeline == list(zip([0.0, 1.0, 2.0, 3.0], lines, strict=True))
    texts = [p[0] for p in embedded if len(p) == 1 and isinstance(p[0], str)]
    kept = [lines[int(t)] for t in result.times]
    text = "\n".join(
        f"{frame_prompt(t)} {line}" for t, line in zip(result.times, kept, strict=True)
    )
    tracks = trained.continue_sequence([f"{text}\n{TRACKS_PROMPT}"], max_new_tokens=3)
    assert texts[-1] == f"{text}\n{TRACKS_PROMPT} {tracks}\n{VIDEO_PROMPT}"
    assert result.text == trained.continue_sequence([texts[-1]], max_new_tokens=6)
    embedded.clear()
    answer = trained.answer_video(frames, "what moved?", frame_rate=clip.fps, max_new_tokens=3)
    asked = [p[0] for p in embedded if len(p) == 1 and isinstance(p[0], str)][-1]
    text = "\n".join(f"{frame_prompt(t)} {lines[int(t)]}" for t in answer.times)
    tracks = trained.continue_sequence([f"{text}\n{TRACKS_PROMPT}"], max_new_tokens=3)
    read = f"{text}\n{TRACKS_PROMPT} {tracks}\n{VIDEO_PROMPT}"
    happened = trained.continue_sequence([read], max_new_tokens=3)
    assert asked == f"{read} {happened}\nQuestion: what moved? Answer:"
    stream, times = trained.stream_video(frames, "what moved?", frame_rate=clip.fps,
                                         max_new_tokens=3)  # fmt: skip
    assert stream.final().text == answer.text and times == answer.times


def test_a_model_trained_on_videos_says_how_likely_its_text_is_right(trained, monkeypatch,
                                                                      tmp_path):  # fmt: skip
    """Its probability is the LM's for all it wrote; a calibration fitted on held-out clips
    turns it into the chance the text is right (Platt), kept with the model's folder; the
    page says a guess, no calibration, unsure or the chance, whichever holds."""
    import dataclasses
    import math

    from vlm.calibration import Calibration, CalibrationClip, Platt, fit_video_calibration
    from vlm.serve import video_notice

    clip, frames = clip_frames()
    result = trained.describe_video(frames, frame_rate=clip.fps, max_new_tokens=6)
    stream, _ = trained.stream_video(frames, frame_rate=clip.fps, max_new_tokens=6)
    assert result.probability == math.prod(p for _, p in stream.final().tokens)
    assert 0 < result.probability <= 1 and result.confidence is None
    assert "not trained on videos" in video_notice("tiny", result, True)
    held_out = [CalibrationClip([f.resize((64, 64)) for f in render_clip(c)[::4]], 1.0,
                                "a small red circle moves right.", [("what moved?", "nothing")])
                for c in (sample_clip(random.Random(k), "train") for k in range(6))]  # fmt: skip
    untouched = fit_video_calibration(trained, held_out, Calibration())
    assert untouched.descriptions is None  # a model not trained on videos is not calibrated
    monkeypatch.setattr(trained, "tasks", trained.tasks | {"video"})
    fitted = fit_video_calibration(trained, held_out, Calibration())
    assert isinstance(fitted.descriptions, Platt) and isinstance(fitted.video_answers, Platt)
    assert fitted.descriptions.slope <= 1  # never sharper than the LM (none of them right)
    assert Calibration.load(fitted.save(tmp_path).parent) == fitted
    monkeypatch.setattr(trained, "calibration", fitted)
    known = trained.describe_video(frames, frame_rate=clip.fps, max_new_tokens=6)
    assert known.text == result.text and not known.guess
    assert known.confidence == fitted.descriptions(known.probability)
    answer = trained.answer_video(frames, "what moved?", frame_rate=clip.fps, max_new_tokens=3)
    assert answer.confidence == fitted.video_answers(answer.probability)
    unknown = dataclasses.replace(known, confidence=None)
    assert "no calibration for videos" in video_notice("tiny", unknown, True)
    unsure = dataclasses.replace(known, confidence=0.3)
    assert "Unsure" in video_notice("tiny", unsure, True) and "30%" in video_notice(
        "tiny", unsure, True)  # fmt: skip
    sure = video_notice("tiny", dataclasses.replace(known, confidence=0.9), False)
    assert sure.startswith("Chance its answer is right: 90%")


def test_frames_beyond_the_lms_positions_are_left_out_evenly(trained):
    """16 frames of a tiny LM's 64 positions: as many as fit, the first and the last kept."""
    clip, frames = clip_frames("long")
    result = trained.describe_video(frames, fps=clip.fps, frame_rate=clip.fps, max_frames=16,
                                    timeline=False, max_new_tokens=4)  # fmt: skip
    assert 1 < len(result.times) < 16
    assert result.times[0] == 0.0 and result.times[-1] == 15 / clip.fps
    assert result.times == sorted(result.times)


def test_clipcap_and_blip2_run_the_same_video_path(trained, tmp_path):
    """The video path on the real presets' architectures (tiny random weights): ClipCap
    describes (it cannot answer), BLIP-2 describes and answers, both deterministically."""
    import test_blip2
    import test_clipcap

    from vlm import Pipeline
    from vlm.tasks import UnsupportedTaskError

    clip, frames = clip_frames("presets", 1)
    parts = test_clipcap.parts.__wrapped__(trained, _Factory(tmp_path / "clipcap"))
    test_clipcap.mlp_checkpoint(tmp_path / "coco.pt", parts["lm"], 32)
    clipcap = Pipeline.from_clipcap(tmp_path / "coco.pt", device="cpu", **parts)
    first = clipcap.describe_video(frames, frame_rate=clip.fps, max_new_tokens=4)
    assert first == clipcap.describe_video(frames, frame_rate=clip.fps, max_new_tokens=4)
    assert first.times == [0.0, 1.0, 2.0, 3.0] and len(first.timeline) == 4
    with pytest.raises(UnsupportedTaskError):
        clipcap.answer_video(frames, "what moved?", frame_rate=clip.fps)
    request = type("Request", (), {"param": "bos-first"})()
    folder = test_blip2.blip2_folder.__wrapped__(_Factory(tmp_path / "blip2"), request)
    blip2 = Pipeline.from_pretrained(folder, device="cpu")
    described = blip2.describe_video(frames, frame_rate=clip.fps, max_new_tokens=4)
    assert described == blip2.describe_video(frames, frame_rate=clip.fps, max_new_tokens=4)
    assert described.times and all(isinstance(c, str) for _, c in described.timeline)
    answered = blip2.answer_video(frames, "what moved?", frame_rate=clip.fps, max_new_tokens=3)
    assert isinstance(answered.text, str)


class _Factory:
    """tmp_path_factory's one method, for a module fixture's body called directly."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path


def test_the_command_line_describes_a_video_file(clip_file, tmp_path, capsys):
    """`vlm caption clip.mp4` (the bundled model): the description, the frames it read and
    each sampled frame's caption, which says what that frame shows; `vlm answer` answers;
    a file that is not a video is one line and exit status 2."""
    import json

    from vlm import shapeworld as sw
    from vlm.cli import main

    clip, _, path = clip_file
    main(["caption", str(path), "--json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["video"] == str(path) and isinstance(row["text"], str)
    assert row["frames"] and set(row["frames"]) <= {0.0, 1.0, 2.0, 3.0}
    times = [t["time"] for t in row["timeline"]]
    truth = [sw.describe(clip.scene(int(t * clip.fps))) for t in times]
    right = sum(t["caption"] == true for t, true in zip(row["timeline"], truth, strict=True))
    assert times == [0.0, 1.0, 2.0, 3.0] and right >= 3, (row["timeline"], truth)
    main(["answer", str(path), "--question", "what moved?"])
    out = capsys.readouterr().out
    assert out.startswith(f"{path}\t") and out.count("\n") == 1
    bad = tmp_path / "bad.mp4"
    bad.write_text("no video here")
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(bad)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: bad.mp4: not a video") and "\n" not in error


# ---------------------------------------------------------------------------- the Video tab


def test_the_video_tab_describes_a_clip_and_says_it_is_a_guess(clip_file, tmp_path):
    """The page's handlers (the /describe_video and /answer_video endpoints): the frames
    strip with each frame's time and caption, the notice that the bundled model was not
    trained on videos, and every bad request refused with its reason before the model runs."""
    import shutil

    import gradio as gr

    import app
    from vlm import shapeworld as sw
    from vlm.limits import Limits

    clip, _, path = clip_file
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    shutil.copy(path, allowed / "clip.mp4")
    shutil.copy(path, outside / "secret.mp4")
    models = app.Models("shapeworld")
    handlers = app.make_handlers(models, tmp_path / "indexes", [allowed],
                                 limits=Limits(max_video_seconds=60))  # fmt: skip
    notice, text, strip = handlers["describe_video"](str(allowed / "clip.mp4"), 1.0, 16)
    assert "was not trained on videos" in notice and "guess" in notice
    assert isinstance(text, str) and len(strip) == 4
    labels = [label for _, label in strip]
    assert [label.split(" · ")[0] for label in labels] == ["0:00", "0:01", "0:02", "0:03"]
    truth = [sw.describe(clip.scene(4 * k)) for k in range(4)]
    assert (
        sum(label.split(" · ")[1].startswith(t) for label, t in zip(labels, truth, strict=True))
        >= 3
    )
    assert all(frame.size == (128, 128) for frame, _ in strip)
    _, answer, _ = handlers["answer_video"](str(allowed / "clip.mp4"), "what moved?", 1.0, 4)
    assert isinstance(answer, str)

    def refused(call, *words):
        with pytest.raises(gr.Error) as error:
            call()
        assert all(w in error.value.message for w in words), error.value.message

    refused(lambda: handlers["describe_video"](None), "Please give a video")
    refused(lambda: handlers["describe_video"](str(outside / "secret.mp4")), "does not read")
    refused(lambda: handlers["describe_video"](str(allowed / "clip.mp4"), 9), "Frames a second")
    refused(lambda: handlers["describe_video"](str(allowed / "clip.mp4"), 1, 65), "Frames")
    (allowed / "notes.mp4").write_text("not a video")
    refused(lambda: handlers["describe_video"](str(allowed / "notes.mp4")), "notes.mp4",
            "not a video")  # fmt: skip
    short = app.make_handlers(models, tmp_path / "indexes2", [allowed],
                              limits=Limits(max_video_seconds=2))  # fmt: skip
    refused(lambda: short["describe_video"](str(allowed / "clip.mp4")), "too long")
    refused(lambda: handlers["answer_video"](str(allowed / "clip.mp4"), "x" * 600),
            "too long")  # fmt: skip


def test_large_frames_are_kept_at_the_work_size(tmp_path):
    """A 4K clip's sampled frames are held at most WORK_SIDE on their longer side (64 of them
    at full size would be 1.6 GB), their aspect kept."""
    from vlm.images import WORK_SIDE

    big = [Image.new("RGB", (3840, 2160), colour) for colour in ("red", "blue")]
    path = write_video(tmp_path / "big.mp4", big, fps=1)
    video = read_video(path, fps=1.0)
    assert [f.size for f in video.frames] == [(WORK_SIDE, 576)] * 2
    assert video.frames[0].getpixel((500, 300))[0] > 200  # still red


def test_the_video_evaluation_scores_descriptions_and_answers_exactly():
    """`vlm eval shapeworld --video`: a model that says each clip's truth scores 100%, one
    that says nothing 0% (and the answer "nothing" only where that is the answer)."""
    from vlm.shapeworld.clips import clip_questions, describe_clip, sample_clip
    from vlm.shapeworld.evaluation import VIDEO_SLICES, evaluate_video
    from vlm.video import VideoText

    rng = random.Random("eval-video-7")  # the evaluation's own draw, as it makes it
    truths = []
    for split in VIDEO_SLICES.values():
        clips = [sample_clip(rng, split) for _ in range(3)]
        truths += [(describe_clip(c), rng.choice(clip_questions(c))) for c in clips]

    class Oracle:
        def __init__(self, right: bool):
            self.right, self.said = right, iter(truths)

        def describe_video(self, frames, **options):
            self.current = next(self.said)
            return VideoText(self.current[0] if self.right else "", [], [], [])

        def answer_video(self, frames, question, **options):
            assert question == self.current[1][0]
            return VideoText(self.current[1][1] if self.right else "nothing", [], [], [])

    perfect = evaluate_video(Oracle(True), n=3, seed=7, perturbations=("clean",))
    assert all(scores == {"clean": 1.0} for scores in perfect.values()), perfect
    silent = evaluate_video(Oracle(False), n=3, seed=7, perturbations=("clean",))
    assert all(silent[f"{p}video_description_exact"]["clean"] == 0.0 for p in VIDEO_SLICES)
    nothing = [answer == "nothing" for _, (_, answer) in truths]
    assert sum(silent[f"{p}video_qa_overall"]["clean"] for p in VIDEO_SLICES) == pytest.approx(
        sum(nothing) / 3
    )
