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

import numpy as np
import torch

from vlm import Pipeline
from vlm import shapeworld as sw


def named_texts(scene: sw.Scene) -> list[tuple[str, str, int]]:
    """(kind, text, index of the object it names) for every text that names one object."""
    out = []
    for i, obj in enumerate(scene.objects):
        others = [o for j, o in enumerate(scene.objects) if j != i]
        if all(o.name != obj.name for o in others):
            out.append(("colour+shape", obj.name, i))
        if all(o.shape != obj.shape for o in others):
            out.append(("shape", f"the {obj.shape}", i))
        if all(o.color != obj.color for o in others):
            out.append(("colour", f"something {obj.color}", i))
    return out


def peak_object(grid: np.ndarray, scene: sw.Scene) -> int:
    """The index of the object whose centre is nearest the map's highest cell."""
    side = grid.shape[0]
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    y, x = (row + 0.5) / side, (col + 0.5) / side
    return int(np.argmin([np.hypot(o.x - x, o.y - y) for o in scene.objects]))


def peak_hits(explain, scenes: list[sw.Scene], size: int = 128) -> dict[str, float]:
    """Hit rate by kind of text (and over all) of `explain(image, text) -> grid`."""
    hits: dict[str, list[bool]] = {}
    for scene in scenes:
        image = sw.render(scene, size)
        for kind, text, index in named_texts(scene):
            hit = peak_object(explain(image, text), scene) == index
            hits.setdefault(kind, []).append(hit)
            hits.setdefault("all", []).append(hit)
    return {kind: float(np.mean(values)) for kind, values in hits.items()}


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
        rates = peak_hits(explain, scenes)
        print(f"{name:30s}", "  ".join(f"{k} {v:.1%}" for k, v in rates.items()))


if __name__ == "__main__":
    main()
