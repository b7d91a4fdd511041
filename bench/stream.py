"""stream: `Pipeline.stream_caption` against `Pipeline.caption`, one image (batch 1).

Time to the first text a user sees (streamed: the first word; not streamed: the whole
caption) and time to the full caption, greedy and with 5 beams (beams cannot stream: they
show the winner when done, so only their overhead is measured). Streaming must not slow the
full caption by more than 5%. Both sides run in turns, `max(3, repeats)` times each, and the
fastest of each counts, so the two see the same machine. Random weights never produce the
stop token, so every caption is `new_tokens` tokens long: equal work.

words: a caption with its words' calibrated confidence (`caption(..., return_words=True)`,
what the page's last snapshot waits for), read on the image and its VIEWS - 1 shifted copies
(`Calibration.views`, docs/calibration.md) against read on the image alone: what the copies
cost, reported (a calibration with the bundle's encoder weight, on the bench's model).
"""

from __future__ import annotations

import dataclasses
import time

from vlm.calibration import VIEWS, Calibration

from .common import Context, Metric, ratio_metric


def _streamed(ctx: Context, pipe, image, options) -> tuple[float, float, str]:
    """(seconds to the first snapshot, seconds to the last, the last text)."""
    ctx.sync()
    start = time.perf_counter()
    first, text = None, None
    for written in pipe.stream_caption(image, **options):
        first = first or time.perf_counter() - start
        text = written.text
    ctx.sync()
    return first, time.perf_counter() - start, text


def _unstreamed(ctx: Context, pipe, image, options) -> tuple[float, str]:
    ctx.sync()
    start = time.perf_counter()
    text = pipe.caption([image], **options)[0]
    ctx.sync()
    return time.perf_counter() - start, text


def run(ctx: Context) -> dict:
    pipe, n = ctx.pipeline, ctx.sizes.new_tokens
    image = ctx.images(1)[0]
    repeats = max(3, ctx.sizes.repeats)
    metrics, details = [], {"new_tokens": n, "repeats": repeats}
    for name, options in (("greedy", {}), ("beam5", {"num_beams": 5})):
        options = {"max_new_tokens": n, **options}
        _unstreamed(ctx, pipe, image, {**options, "max_new_tokens": 2})  # warm-up
        _streamed(ctx, pipe, image, {**options, "max_new_tokens": 2})
        plain, first, full = [], [], []
        for _ in range(repeats):  # in turns: both sides see the same machine
            seconds, text = _unstreamed(ctx, pipe, image, options)
            plain.append(seconds)
            to_first, to_last, streamed_text = _streamed(ctx, pipe, image, options)
            first.append(to_first)
            full.append(to_last)
        plain_s, first_s, full_s = min(plain), min(first), min(full)
        same = streamed_text == text
        metrics += [
            ratio_metric(
                f"{name} batch1: time to first text (s)", first_s, plain_s, "s",
                plain_s / first_s, "speed-up: unstreamed caption s / first streamed text s",
                (">=", 2.0) if name == "greedy" else None,
                note="not streamed, the first text is the whole caption"
                + ("" if name == "greedy" else "; beams show the winner when done"),
            ),
            ratio_metric(
                f"{name} batch1: full caption (s)", full_s, plain_s, "s", full_s / plain_s,
                "slow-down: streamed s / unstreamed s", ("<=", 1.05),
            ),
            Metric(
                f"{name} batch1: same text streamed", same, True, "bool", met=same,
                target="== caption()",
            ),
        ]  # fmt: skip
        details[name] = {"unstreamed_s": plain, "first_text_s": first, "streamed_s": full}
    if pipe.can_check_words:
        metrics.append(_words(ctx, pipe, image, repeats, details))
    return {"metrics": metrics, "details": details}


def _words(ctx: Context, pipe, image, repeats: int, details: dict) -> Metric:
    views = Calibration(experts=(1.0, 1.53), views=VIEWS)
    alone = dataclasses.replace(views, views=1)
    options = {"max_new_tokens": ctx.sizes.new_tokens, "return_words": True}
    times = {"alone": [], "views": []}
    for _ in range(repeats):  # in turns
        for name, calibration in (("alone", alone), ("views", views)):
            caption = lambda c=calibration: pipe.caption([image], calibration=c, **options)  # noqa: E731
            times[name].append(ctx.time(caption, repeats=1)[0])
    details["words_s"] = times
    alone_s, views_s = min(times["alone"]), min(times["views"])
    return ratio_metric(
        f"caption with words, read on {VIEWS} views (s)", views_s, alone_s, "s",
        views_s / alone_s, f"slow-down: {VIEWS} views s / the image alone s",
        note="reported: the page's last snapshot waits this much longer",
    )  # fmt: skip
