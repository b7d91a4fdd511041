"""video: reading a clip by time, describing it, and the live camera's cost per frame.

- decode: `vlm.video.read_video` of 16 frames spread over a two-minute, 30 fps clip with a
  keyframe every 2 s (as phones and streaming encoders make them; it seeks to each sampled
  time) against decoding all 3,600 frames in order and keeping the same 16 (the naive
  reader). Seeking must be at least 2× faster: why frames are read with PyAV's seek. (At a
  frame a second of a short clip the two decode the same frames: no seek is worth it.)
- describe: `Pipeline.describe_video` of 16 frames (no timeline: the LM reads all 16 prefixes
  and writes `new_tokens`) against captioning the same 16 frames one by one (what a per-frame
  pipeline would do), in frames a second. Reading them as one sequence must not be slower.
- live: a live-camera frame as `Service.live_caption` handles it (its short caption and the
  familiarity check) against the caption alone: the latency per frame, and what the check
  adds (within 25%; a model without a familiarity profile adds nothing).
Random weights never produce the stop token, so every text is `new_tokens` long: equal work.
"""

from __future__ import annotations

from .common import Context, ratio_metric

CLIP_SECONDS, CLIP_FPS, KEYFRAME_EVERY = 120, 30, 60  # 2 minutes, a keyframe every 2 s
SCENES = 16  # stills of the clip, each held for CLIP_SECONDS / SCENES


def _clip_file(ctx: Context):
    """A two-minute, 30 fps H.264 clip of the bench's photo-like images."""
    import av

    path = ctx.tmp / "clip.mp4"
    if path.exists():
        return path
    stills = ctx.images(SCENES, offset=3000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=CLIP_FPS)
        stream.width, stream.height = (side - side % 2 for side in stills[0].size)
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = KEYFRAME_EVERY
        for still in stills:
            frame = av.VideoFrame.from_image(still.crop((0, 0, stream.width, stream.height)))
            for _ in range(CLIP_SECONDS * CLIP_FPS // SCENES):
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _decode_all(path, count: int):
    """The naive reader: every frame decoded in order, the first at each sampled time kept."""
    import av

    from vlm.video import sample_times

    kept, times = [], sample_times(CLIP_SECONDS, 1.0, count)
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if len(kept) < count and frame.time >= times[len(kept)] - 1e-3:
                kept.append(frame.to_image())
    return kept


def run(ctx: Context) -> dict:
    from vlm.serve import LIVE_TOKENS
    from vlm.video import read_video

    pipe, n = ctx.pipeline, ctx.sizes.new_tokens
    path = _clip_file(ctx)
    repeats = max(3, ctx.sizes.repeats)

    seek = naive = float("inf")
    for _ in range(repeats):  # in turns, so both see the same machine
        seek = min(seek, ctx.time(lambda: read_video(path, fps=1.0, max_frames=16), 1)[0])
        naive = min(naive, ctx.time(lambda: _decode_all(path, 16), 1)[0])
    frames = read_video(path, fps=1.0, max_frames=16).frames

    options = dict(fps=1.0, frame_rate=1.0, max_frames=16, timeline=False, max_new_tokens=n)
    pipe.describe_video(frames[:2], **options)  # warm up
    described = one_by_one = float("inf")
    for _ in range(repeats):
        described = min(described, ctx.time(lambda: pipe.describe_video(frames, **options), 1)[0])
        one_by_one = min(one_by_one, ctx.time(
            lambda: [pipe.caption([f], max_new_tokens=n) for f in frames], 1)[0])  # fmt: skip
    used = len(pipe.describe_video(frames, **options).times)

    frame = frames[0]  # what Service.live_caption does with a camera frame (less the gate)
    live = bare = float("inf")
    for _ in range(repeats):
        live = min(live, ctx.time(lambda: (pipe.caption([frame], max_new_tokens=LIVE_TOKENS),
                                           pipe.familiarity([frame])), 1)[0])  # fmt: skip
        bare = min(bare, ctx.time(lambda: pipe.caption([frame], max_new_tokens=LIVE_TOKENS), 1)[0])
    return {
        "metrics": [
            ratio_metric(
                "read 16 frames of a 2-minute, 30 fps clip (s)",
                seek,
                naive,
                "s",
                naive / seek,
                "speed-up: decode-all s / seek s",
                (">=", 2.0),
            ),
            ratio_metric(
                f"describe 16 frames, {n} tokens (frames/s)",
                16 / described,
                16 / one_by_one,
                "frames/s",
                one_by_one / described,
                "speed-up: 16 captions s / describe s",
                (">=", 1.0),
                note=f"{used} of 16 frames fit the LM's positions",
            ),
            ratio_metric(
                "live camera frame (s)",
                live,
                bare,
                "s",
                live / bare,
                "overhead: live_caption s / caption s",
                ("<=", 1.25),
            ),
        ],  # fmt: skip
        "details": {
            "clip": f"{CLIP_SECONDS} s at {CLIP_FPS} fps, a keyframe every {KEYFRAME_EVERY} frames",
            "frames_read": used,
        },
    }
