"""How often an explain map's peak falls on the object its text names (issue: Explain).

On fresh ShapeWorld scenes of two or three objects, each object gets up to three texts that
name it alone in its scene: its colour and shape ("red circle"), its shape ("the star") or its
colour ("something red"). A map "hits" when the object whose centre is nearest its peak cell is
the named one (chance: 1/2 or 1/3). Compares the patch–text cosine the demo showed before
(`Encoder.patch_similarity`) with the occlusion map it shows now (`Pipeline.explain`).

    PYTHONPATH=. python docs/experiments/explain_peaks.py --n 200 --seed 7
"""

from __future__ import annotations

import argparse
import random

import torch

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.evaluate import peak_hits  # the measure `eval shapeworld` reports


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
        "patch-text cosine (before)": pipeline.encoder.patch_similarity,
        "occlusion, contrasted (now)": pipeline.explain,
    }
    for name, explain in methods.items():
        rates = peak_hits(explain, [sw.render(s, 128) for s in scenes], scenes)
        print(f"{name:30s}", "  ".join(f"{k} {v:.1%}" for k, v in rates.items()))


if __name__ == "__main__":
    main()
