"""zeroshot: `Pipeline.classify` against 1,000 ImageNet labels, class embeddings cached,
vs the bare image encoder (`encoder.encode_images`) on the same images.

Everything classify adds to the encoder (input checks, the cache look-up, the [N, 1000]
product and softmax, one {label: probability} dict per image) should cost under 10%.

Building the class embeddings is not timed. On a GPU the first `classify` builds them. On a
CPU, 1,000 prompts through ViT-B-32's text tower take minutes, so the cache is seeded with
random unit vectors of the right shape instead (`class_cache` in the JSON says which): the
timed call does exactly the same work either way.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

from .common import Context, ratio_metric


def run(ctx: Context) -> dict:
    pipe, sizes = ctx.pipeline, ctx.sizes
    labels = list(open_clip.IMAGENET_CLASSNAMES[: sizes.labels])
    if sizes.templates is None:
        templates = pipe.templates()  # the preset's, else OpenAI's 80
    else:
        simple = open_clip.SIMPLE_IMAGENET_TEMPLATES[: sizes.templates]  # functions of a label
        templates = [t("{}") for t in simple]  # as format strings: "itap of a {}."
    images = ctx.images(sizes.zeroshot_images, offset=1000)

    cache = "built"
    if ctx.device.type == "cpu" and sizes.model == "full":
        cache = "seeded"
        kept = list(dict.fromkeys(label.strip() for label in labels))  # as classify keeps them
        weights = F.normalize(torch.randn(pipe.encoder.embed_dim, len(kept)), dim=0)
        pipe.label_weights.put(kept, templates, weights.to(pipe.device))
    pipe.classify(images[:1], labels, templates)  # builds (or finds) the cache; warms up
    pipe.encoder.encode_images(images[:1])

    ours = bare = float("inf")
    for _ in range(max(3, sizes.repeats)):  # interleaved, so both see the same noise
        ours = min(ours, ctx.time(lambda: pipe.classify(images, labels, templates), 1)[0])
        bare = min(bare, ctx.time(lambda: pipe.encoder.encode_images(images), 1)[0])
    return {
        "metrics": [
            ratio_metric(
                f"classify {len(images)} imgs x {len(labels)} labels (s)",
                ours,
                bare,
                "s",
                ours / bare,
                "overhead: classify s / encode_images s",
                ("<=", 1.10),
            )
        ],  # fmt: skip
        "details": {
            "images": len(images),
            "labels": len(labels),
            "templates": len(templates),
            "class_cache": cache,
        },
    }
