"""A stand-in for a new user's own data: ShapeWorld-like scenes of one to three shapes, each
captioned twice in "their own words" (not ShapeWorld's canonical sentence), written as a folder
of PNGs with sidecar .txt files. docs/training.md's offline quick start was measured on it:

    python docs/experiments/own_data.py /tmp/own 300
    vlm train --data /tmp/own --out runs/own --encoder local-dir:assets/shapeworld/encoder …
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from vlm import shapeworld as sw

COUNT = {1: "one shape", 2: "two shapes", 3: "three shapes"}
SIZE = {"small": "little", "large": "big"}


def own_words(scene: sw.Scene, rng: random.Random) -> list[str]:
    """Two captions as someone might write them, true of the scene, left to right."""
    things = [f"a {SIZE[o.size]} {o.color} {o.shape}" for o in scene.objects]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    styles = [
        f"The picture has {COUNT[len(things)]}: {listed}.",
        f"From left to right: {listed}.",
        f"I drew {listed} on black.",
        f"{listed[0].upper()}{listed[1:]}, nothing else.",
    ]
    return rng.sample(styles, 2)


def write(folder: Path, n: int, seed: int = 0, size: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        scene = sw.sample_scene(rng)
        sw.render(scene, size).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text("\n".join(own_words(scene, rng)) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300)
