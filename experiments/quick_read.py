"""Experiment: a quick read of bundles on the targets that moved between prefix stages, on
scenes of seed `quick-99` (never the evaluation's 1234): held-out captions (300 scenes), one
seen-form question per seen scene and one never-paired phrasing (300 scenes), and described
2-shot lists in never-seen formats (`evaluate_few_shot`, 40 per attribute, seed 99).
About 3 minutes a bundle on one core; it put the shipped bundle within 0.4-4 points of its
`eval shapeworld --n 1000` figures.

    PYTHONPATH=. python experiments/quick_read.py assets/shapeworld runs/x/bundle

Results: docs/shapeworld.md, "Colourless views and k-shot lines in the prefix stage"."""

from __future__ import annotations

import random
import sys

from vlm import shapeworld as sw
from vlm.pipeline import Pipeline
from vlm.shapeworld.evaluation import answer_scores, evaluate_few_shot, exact_caption_scores


def main(bundles: list[str]) -> None:
    rng = random.Random("quick-99")
    held = [sw.sample_scene(rng, split="held_out") for _ in range(300)]
    seen = [sw.sample_scene(rng, split="train") for _ in range(300)]
    asked = [(i, *rng.choice(sw.questions(s, rng, forms="seen"))) for i, s in enumerate(seen)]
    phrased = [(i, *rng.choice(sw.questions(s, rng, forms="held_out")))
               for i, s in enumerate(seen) if sw.questions(s, rng, forms="held_out")]  # fmt: skip
    held_images, seen_images = [sw.render(s) for s in held], [sw.render(s) for s in seen]
    for bundle in bundles:
        pipeline = Pipeline.from_pretrained(bundle)
        scores = exact_caption_scores(pipeline, held_images, held, "held_out_", 64)
        scores |= answer_scores(pipeline, seen_images, asked, "", 64)
        scores |= answer_scores(pipeline, seen_images, phrased, "phrasing_", 64)
        few = evaluate_few_shot(pipeline, 40, 99, contexts=("described",), shots=(2,))
        scores |= {k: v for k, v in few.items() if "held_out" in k}
        shown = {k: v for k, v in scores.items() if not k.endswith(("2obj", "3obj"))}
        print(bundle, "  ".join(f"{k} {100 * v:.1f}" for k, v in shown.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
