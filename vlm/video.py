"""A video as the frames a task reads: sampled by time (`fps` frames a second, at most
`max_frames`, spread evenly over a longer clip), each with its time in seconds.

Files are read with PyAV (FFmpeg's libraries in-process: it seeks to each sampled time
instead of decoding every frame). What the container's header says (a video stream, its
duration and frame size) is checked against the limits before any frame is decoded; a file
that is not a video, has no video stream, or breaks while decoding is one `VideoError` line.
Frames already in memory (a list of PIL images at a given rate) are sampled the same way.
A decoded frame is kept at most `vlm.images.WORK_SIDE` pixels on its longer side.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import InputError
from .images import WORK_SIDE
from .limits import Limits, current

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".gif")
# The most tokens a video's description and an answer about it are given (the default
# max_new_tokens): the room left after the frames, which are left out to fit it
DESCRIPTION_TOKENS, ANSWER_TOKENS = 40, 10
FRAME_LINE_TOKENS = 40  # the most tokens of a frame's line (`PipelineConfig.video_frame_lines`)
TRACK_TOKENS = 72  # the most tokens of the tracks the LM writes from frame lines (three objects)


class VideoError(InputError):
    """A video that cannot be read, or one over a limit; the message says which and why."""


@dataclass(frozen=True)
class Video:
    """Sampled frames (RGB) and the time of each, in seconds from the start."""

    frames: list[Image.Image]
    times: list[float]
    duration: float  # of the whole clip, in seconds


@dataclass(frozen=True)
class VideoText:
    """What a model wrote about a video (`Pipeline.describe_video` / `answer_video`): the
    text, the times of the frames it read (all sampled ones, or fewer where the LM's
    positions ran short), each sampled frame's own caption (`timeline`, where the model
    captions) and each sampled frame's familiarity (`vlm.familiarity`), with its time.
    `guess`: the model was not trained on clips (no "video" task), so its text is a guess
    from frames it learned to read one at a time; its frames' captions are what it knows.
    `probability`: the LM's, of all it wrote for the text (from frame lines: the tracks and,
    before an answer, the description too); `confidence`: the chance the text is right,
    where the model's calibration has videos (`vlm.calibration`), else None."""

    text: str
    times: list[float]
    timeline: list[tuple[float, str]]
    familiarity: list[tuple[float, object]]
    guess: bool = True
    probability: float | None = None
    confidence: float | None = None


def is_video_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def sample_times(duration: float, fps: float = 1.0, max_frames: int = 16) -> list[float]:
    """When to take frames from a clip of `duration` seconds: every 1/`fps` seconds from the
    start, or, where that would be more than `max_frames`, `max_frames` evenly spread (each
    in the middle of its share of the clip)."""
    if fps <= 0 or max_frames < 1:
        raise VideoError(f"fps must be above 0 and max_frames at least 1 (got {fps}, {max_frames})")
    count = max(1, math.floor(duration * fps + 1e-9))
    if count <= max_frames:
        return [k / fps for k in range(count)]
    return [(k + 0.5) * duration / max_frames for k in range(max_frames)]


def frames_video(frames: list[Image.Image], fps: float, *, sample_fps: float = 1.0,
                 max_frames: int = 16) -> Video:  # fmt: skip
    """`read_video` of frames already in memory, `fps` of them a second."""
    if not frames:
        raise VideoError("a video needs at least one frame")
    if fps <= 0:
        raise VideoError(f"the frames' rate must be above 0 (got {fps})")
    duration = len(frames) / fps
    times = sample_times(duration, sample_fps, max_frames)
    picked = [frames[min(len(frames) - 1, int(t * fps + 1e-6))].convert("RGB") for t in times]
    return Video(picked, times, duration)


def read_video(source: str | os.PathLike | bytes, *, fps: float = 1.0, max_frames: int = 16,
               limits: Limits | None = None, name: str | None = None) -> Video:  # fmt: skip
    """The frames of a video file (a path or its bytes), sampled as `sample_times` says;
    VideoError for anything that is not a readable video within `limits`."""
    import av  # FFmpeg's libraries: loaded when a video is read, not at import

    limits = limits or current()
    name = name or (Path(source).name if not isinstance(source, bytes) else "video")
    if max_frames > limits.max_video_frames:
        raise VideoError(f"{name}: at most {limits.max_video_frames} frames a video")
    size = len(source) if isinstance(source, bytes) else _size(source, name)
    if size > limits.max_file_size:
        raise VideoError(f"{name}: the file is too large ({size / 2**20:.1f} MB; the limit is "
                         f"{limits.max_file_size / 2**20:.0f} MB)")  # fmt: skip
    if size == 0:
        raise VideoError(f"{name}: the file is empty")
    file = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with av.open(file, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoError(f"{name}: no video stream in it")
            stream = container.streams.video[0]
            duration = _duration(container, stream, name)
            width, height = stream.codec_context.width, stream.codec_context.height
            if duration > limits.max_video_seconds:
                raise VideoError(f"{name}: the video is too long ({duration:.0f} s; the "
                                 f"limit is {limits.max_video_seconds:.0f} s)")  # fmt: skip
            if width * height > limits.max_video_frame_pixels:
                raise VideoError(f"{name}: the frames are too large ({width}×{height}; the "
                                 f"limit is {limits.max_video_frame_pixels:,} pixels)")  # fmt: skip
            times = sample_times(duration, fps, max_frames)
            frames = _decode_at(container, stream, times)
    except av.FFmpegError as error:
        raise VideoError(f"{name}: not a video this server can read ({_reason(error)})") from None
    if not frames:
        raise VideoError(f"{name}: no frame could be decoded")
    kept = [(t, f) for t, f in zip(times, frames, strict=False) if f is not None]
    return Video([f for _, f in kept], [t for t, _ in kept], duration)


def _size(path: str | os.PathLike, name: str) -> int:
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{name}: no such file")
    return path.stat().st_size


def _reason(error: Exception) -> str:
    """FFmpeg's words for what went wrong ("Invalid data found when processing input"),
    without the server path it names."""
    return (getattr(error, "strerror", None) or type(error).__name__)[:120]


def _duration(container, stream, name: str) -> float:
    """The clip's length in seconds, from the stream's header, else the container's; a
    header that gives neither counts the frames it says there are at its rate."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    rate = float(stream.average_rate or 0)
    if stream.frames and rate:
        return stream.frames / rate
    raise VideoError(f"{name}: its length is not in its header (a still image? give it as "
                     "an image)")  # fmt: skip


def _decode_at(container, stream, times: list[float]) -> list[Image.Image | None]:
    """The first frame at or after each time (the last frame for a time past the end):
    one seek back to the keyframe before each time that is far from the previous one."""
    frames: list[Image.Image | None] = []
    decoder, current_frame, last = None, None, None
    for target in times:
        ahead = current_frame is not None and 0 <= target - current_frame.time < 2.0
        if not ahead:
            container.seek(int(target / stream.time_base), stream=stream, backward=True)
            decoder, current_frame = container.decode(stream), None
        found = None
        while True:
            if (
                current_frame is not None
                and current_frame.time is not None
                and (current_frame.time >= target - 1e-3)
            ):
                found = current_frame
                break
            try:
                current_frame = next(decoder)
                last = current_frame
            except StopIteration:
                found = last  # past the end: the last frame there is
                break
        frames.append(_picture(found) if found is not None else None)
    return frames


def _picture(frame) -> Image.Image:
    """A decoded frame as an RGB image whose longer side is at most WORK_SIDE (scaled by
    FFmpeg as it converts: 64 frames of 4K would otherwise hold 1.6 GB)."""
    width, height = frame.width, frame.height
    scale = min(1.0, WORK_SIDE / max(width, height))
    if scale == 1.0:
        return frame.to_image().convert("RGB")
    size = dict(width=max(1, round(width * scale)), height=max(1, round(height * scale)))
    return frame.to_image(**size).convert("RGB")
