"""index: `Pipeline.build_index` over a folder of JPEGs vs the bare image encoder.

The reference is the encoder alone on tensors decoded and preprocessed beforehand, in the
same batches: the best build_index can do is hide decoding, preprocessing, hashing and the
FAISS adds behind the encoder (SearchIndex.add decodes in a few threads, ahead of the
encoder). The serial decode + preprocess time is reported too, for context: when it is not
much smaller than the encoder's time, no overlap can hide it. The two are timed in turns,
three times or more, and the fastest of each counts.
"""

from __future__ import annotations

from vlm.images import load_image

from .common import Context, ratio_metric, write_jpegs


def run(ctx: Context) -> dict:
    pipe, sizes = ctx.pipeline, ctx.sizes
    paths = write_jpegs(ctx.tmp / "jpegs", ctx.images(sizes.index_images, offset=2000))
    folder, batch = paths[0].parent, sizes.index_batch

    decode_s, pixels = ctx.time(lambda: pipe.encoder.pixels([load_image(p) for p in paths]), 1)
    batches = pixels.split(batch)
    pipe.encoder.encode_pixels(batches[0])  # warm-up

    def bare_encoder():
        return [pipe.encoder.encode_pixels(x, normalize=True) for x in batches]

    ours = bare = float("inf")
    for _ in range(max(3, sizes.repeats)):  # interleaved, so both see the same noise
        seconds, index = ctx.time(lambda: pipe.build_index(folder, batch_size=batch), 1)
        ours = min(ours, seconds)
        bare = min(bare, ctx.time(bare_encoder, 1)[0])
    if len(index) != len(paths):
        raise RuntimeError(f"indexed {len(index)} of {len(paths)} images: {index.skipped[:3]}")

    n = len(paths)
    return {
        "metrics": [
            ratio_metric(
                f"build_index {n} JPEGs (images/s)",
                n / ours,
                n / bare,
                "img/s",
                bare / ours,
                "ours img/s / bare encoder img/s",
                (">=", 0.90),
            )
        ],  # fmt: skip
        "details": {
            "images": n,
            "image_size": list(sizes.image_size),
            "batch_size": batch,
            "jpeg_kb_mean": round(sum(p.stat().st_size for p in paths) / n / 1024, 1),
            "serial_decode_preprocess_images_per_s": n / decode_s,
            "decoding": "SearchIndex default: threads ahead of the encoder",
        },
    }
