"""caption: `Pipeline.caption` against ClipCap's own inference (see clipcap_reference.py).

(a) beam search, 5 beams, one image: ours (HF `generate`, KV cache) vs `generate_beam`.
(b) greedy throughput: ours in batches of 16 vs `generate2` one image at a time.
(c) the greedy token ids of (b) must be identical, image by image.

Random weights never produce the stop token in practice, so both sides generate exactly
`new_tokens` tokens per caption: equal work (the token counts are reported).
"""

from __future__ import annotations

import contextlib
import os

from . import clipcap_reference as reference
from .common import Context, Metric, ratio_metric


@contextlib.contextmanager
def recorded_generate(lm):
    """Record what `lm.generate` returns while `Pipeline.caption` runs (a timing-neutral hook:
    `_generate` decodes to text, the comparison needs the token ids)."""
    outputs = []
    original = lm.generate

    def generate(*args, **kwargs):
        tokens = original(*args, **kwargs)
        outputs.append(tokens.cpu())
        return tokens

    lm.generate = generate
    try:
        yield outputs
    finally:
        del lm.generate


@contextlib.contextmanager
def _precision(value: str):
    previous = os.environ.get("VLM_PRECISION")
    os.environ["VLM_PRECISION"] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ["VLM_PRECISION"]
        else:
            os.environ["VLM_PRECISION"] = previous


def _until_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """Ids up to and including the first stop token (what follows is padding)."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[: i + 1]
    return ids


def run(ctx: Context) -> dict:
    pipe, sizes = ctx.pipeline, ctx.sizes
    n = sizes.new_tokens
    # ClipCap stops at '.'; the pipeline also stops at EOS, so the reference does too
    stop_ids = set(pipe._stop_ids)
    images = ctx.images(sizes.caption_images)

    # warm-up: first calls allocate and pick kernels
    pipe.caption(images[:1], max_new_tokens=2)
    pipe.caption(images[:1], max_new_tokens=2, num_beams=5)
    reference.caption_ids(pipe, images[0], stop_ids, 2)
    reference.caption_ids(pipe, images[0], stop_ids, 2, beams=5)

    # (a) beam 5, batch 1
    with recorded_generate(pipe.lm) as beam_out:
        ours_beam, _ = ctx.time(lambda: pipe.caption(images[:1], max_new_tokens=n, num_beams=5))
    ours_beam_ids = _until_stop(beam_out[-1][0].tolist(), stop_ids)
    ref_beam, ref_beam_ids = ctx.time(
        lambda: reference.caption_ids(pipe, images[0], stop_ids, n, beams=5)
    )

    # (b) greedy: ours batched by 16, the reference one image at a time (on a subset: each
    # image costs it the same, as every caption runs to `new_tokens`)
    with recorded_generate(pipe.lm) as greedy_out:
        ours_greedy, _ = ctx.time(lambda: pipe.caption(images, max_new_tokens=n, batch_size=16))
    last_call = greedy_out[-((len(images) + 15) // 16) :]  # the batches of the last repeat
    ours_ids = [_until_stop(row.tolist(), stop_ids) for batch in last_call for row in batch]
    subset = images[: sizes.reference_images]
    ref_greedy, ref_ids = ctx.time(
        lambda: [reference.caption_ids(pipe, image, stop_ids, n) for image in subset]
    )
    ours_rate = len(images) / ours_greedy
    ref_rate = len(subset) / ref_greedy

    # (c) identical greedy tokens on the images both captioned. On a GPU both sides run in
    # bf16, where the near-ties of random weights flip with the order of additions (a KV cache
    # vs a full re-forward), so there both are compared from fp32 runs (VLM_PRECISION=fp32),
    # untimed
    if ctx.device.type == "cuda":
        with recorded_generate(pipe.lm) as fp32_out, _precision("fp32"):
            pipe.caption(subset, max_new_tokens=n, batch_size=16)
            ref_ids = [reference.caption_ids(pipe, image, stop_ids, n) for image in subset]
        ours_ids = [_until_stop(row.tolist(), stop_ids) for batch in fp32_out for row in batch]
    mismatches = [i for i, (a, b) in enumerate(zip(ours_ids, ref_ids, strict=False)) if a != b]
    identical = not mismatches and len(ref_ids) == len(subset)

    metrics = [
        ratio_metric(
            "beam5 batch1 (s/caption)", ours_beam, ref_beam, "s", ref_beam / ours_beam,
            "speed-up: reference s / ours s", (">=", 2.0),
        ),
        ratio_metric(
            "greedy bs16 (images/s)", ours_rate, ref_rate, "img/s", ours_rate / ref_rate,
            "speed-up: ours img/s / reference img/s (batch 1)", (">=", 5.0),
            note=f"reference timed on {len(subset)} of the {len(images)} images",
        ),
        Metric(
            "greedy tokens identical", identical, True, "bool", met=identical,
            target="== reference", note=f"{len(ref_ids)} images, {n} new tokens each"
            + (", fp32" if ctx.device.type == "cuda" else ""),
        ),
    ]  # fmt: skip
    return {
        "metrics": metrics,
        "details": {
            "new_tokens": n,
            "images": len(images),
            "reference_images": len(subset),
            "ours_greedy_tokens": sum(len(ids) for ids in ours_ids),
            "reference_greedy_tokens": sum(len(ids) for ids in ref_ids),
            "ours_beam_tokens": len(ours_beam_ids),
            "reference_beam_tokens": len(ref_beam_ids),
            # informative only: equal while no beam finishes (ClipCap ranks candidates by
            # mean log-prob at every step, HF by the sum, normalising finished beams only)
            "beam_top_tokens_identical": ours_beam_ids == ref_beam_ids,
            "greedy_mismatched_images": mismatches,
            "stop_ids": sorted(stop_ids),
        },
    }
