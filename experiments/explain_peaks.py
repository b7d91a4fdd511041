"""How often an explain map's peak falls on the object its text names (issue: Explain).

On fresh ShapeWorld scenes of two or three objects, each object gets up to three texts that
name it alone in its scene: its colour and shape ("red circle"), its shape ("the star") or its
colour ("something red"). A map "hits" when the object whose centre is nearest its peak cell is
the named one (chance: 1/2 or 1/3). Compares the patch–text cosine the demo showed before
(`patch_cosine` here: each ViT patch token against the text), the map of covered windows shown
next, and the map of each window alone it shows now (`Pipeline.explain`).

    PYTHONPATH=. python experiments/explain_peaks.py --n 200 --seed 7
"""

from __future__ import annotations

import argparse
import random
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.shapeworld.evaluation import peak_hits  # the measure `eval shapeworld` reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapeworld")
    parser.add_argument("--n", type=int, default=200, help="scenes")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipeline = Pipeline.from_pretrained(args.model, device="cpu")
    rng = random.Random(args.seed)
    scenes = [sw.sample_scene(rng, rng.choice([2, 3]), split="any") for _ in range(args.n)]
    methods = {
        "patch-text cosine (first)": partial(patch_cosine, pipeline.encoder),
        "windows covered (second)": partial(pipeline.explain, keep=False),
        "each window alone (now)": pipeline.explain,
    }
    for name, explain in methods.items():
        rates = peak_hits(explain, [sw.render(s, 128) for s in scenes], scenes)
        print(f"{name:30s}", "  ".join(f"{k} {v:.1%}" for k, v in rates.items()))
    alone = [sw.sample_scene(rng, 1, split="any") for _ in range(args.n)]
    print("one object, its shape picked from texts of every shape (what the map can show):")
    print(f"  'the <shape>' {shape_text_accuracy(pipeline, alone, 'the {}'):.1%}", end="  ")
    print(f"'<colour> <shape>', best colour {shape_text_accuracy(pipeline, alone, None):.1%}")


@torch.inference_mode()
def patch_cosine(encoder, image, text: str) -> np.ndarray:
    """The first map the demo showed: the cosine of each ViT patch token (projected into the
    joint space) with the text's embedding, as a [grid, grid] array."""
    _, tokens = encoder.pooled_and_patches(encoder.pixels([image]).to(encoder.device))
    similarity = F.normalize(tokens[0], dim=-1) @ encoder.encode_text([text])[0]
    grid = int(round(similarity.numel() ** 0.5))
    return similarity.reshape(grid, grid).cpu().numpy()


@torch.inference_mode()
def shape_text_accuracy(pipeline, scenes: list[sw.Scene], template: str | None) -> float:
    """How often the text of the object's shape is the most similar among all shapes' texts,
    each written with `template`, or (None) as the best of its colour-and-shape names."""
    encoder = pipeline.encoder
    pixels = encoder.pixels([sw.render(s, 128) for s in scenes])
    images = encoder.encode_pixels(pixels, normalize=True)
    if template is None:
        names = encoder.encode_text([f"{c} {s}" for s in sw.SHAPES for c in sw.COLORS])
        scores = (images @ names.T).reshape(len(scenes), len(sw.SHAPES), -1).amax(-1)
    else:
        scores = images @ encoder.encode_text([template.format(s) for s in sw.SHAPES]).T
    picked = [sw.SHAPES[i] for i in scores.argmax(1).tolist()]
    return float(np.mean([p == s.objects[0].shape for p, s in zip(picked, scenes, strict=True)]))


if __name__ == "__main__":
    main()
