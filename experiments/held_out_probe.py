"""Where held-out combinations get lost: do the frozen encoder's features name the shape of an
object whose colour-shape combination no training image showed?

A linear probe (one per attribute) is trained on the features the mapper reads (the pooled
embedding and the 8×8 patch tokens, flattened) of one-object scenes of *seen* combinations,
then tested on fresh seen scenes and on scenes of HELD_OUT combinations. If the probe reads
held-out shapes and colours about as well as seen ones, the encoder's features are factorised
and what fails to carry them over is the mapper (trained on seen combinations only); if not,
the encoder itself entangles them.

`--prefix` probes the visual prefix instead (the mapper's output, what the frozen LM reads): if
it names held-out shapes while the captions do not, what fails is the LM's reading of it.

    PYTHONPATH=. python experiments/held_out_probe.py --model runs/shapeworld/pipeline
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

import torch
import torch.nn.functional as F

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.shapeworld.evaluation import normalize_caption


@torch.no_grad()
def features(pipeline, scenes, batch_size: int = 256, prefix: bool = False) -> torch.Tensor:
    read = pipeline.prefix if prefix else pipeline.image_features
    chunks = []
    for start in range(0, len(scenes), batch_size):
        images = [sw.render(s) for s in scenes[start : start + batch_size]]
        chunks.append(read(images).float().flatten(1).cpu())
    return torch.cat(chunks)


def probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression (full batch, Adam, a little weight decay)."""
    torch.manual_seed(0)
    mean, std = x.mean(0), x.std(0) + 1e-6
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(layer((x - mean) / std), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer.normalise = (mean, std)
    return layer


def accuracy(layer, x, y) -> float:
    mean, std = layer.normalise
    return float((layer((x - mean) / std).argmax(-1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapeworld")
    parser.add_argument("--n", type=int, default=3000, help="training scenes")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--prefix", action="store_true", help="probe the visual prefix")
    args = parser.parse_args()
    pipeline = Pipeline.from_pretrained(args.model, device="cpu")
    rng = random.Random(args.seed)
    groups = {
        "train": [sw.sample_scene(rng, 1, split="train") for _ in range(args.n)],
        "seen": [sw.sample_scene(rng, 1, split="train") for _ in range(500)],
        "held_out": [sw.sample_scene(rng, 1, split="held_out") for _ in range(500)],
    }
    x = {name: features(pipeline, scenes, prefix=args.prefix) for name, scenes in groups.items()}
    for attribute, values in (("shape", sw.SHAPES), ("color", tuple(sw.COLORS))):
        y = {name: torch.tensor([values.index(getattr(s.objects[0], attribute)) for s in scenes])
             for name, scenes in groups.items()}  # fmt: skip
        layer = probe(x["train"], y["train"], len(values))
        with torch.no_grad():
            seen, held = (
                accuracy(layer, x["seen"], y["seen"]),
                accuracy(layer, x["held_out"], y["held_out"]),
            )
        print(
            f"{attribute:6s} probe: seen combinations {seen:.1%}, held-out combinations {held:.1%}"
        )
    if args.prefix:  # what the LM makes of those prefixes: the same held-out scenes captioned
        scenes = groups["held_out"]
        captions = pipeline.caption([sw.render(s) for s in scenes], batch_size=64)
        missed = Counter(
            f"{s.objects[0].color} {s.objects[0].shape}"
            for c, s in zip(captions, scenes, strict=True)
            if normalize_caption(c) != sw.describe(s)
        )
        print(f"held-out captions: {1 - missed.total() / len(scenes):.1%}, misses {dict(missed)}")


if __name__ == "__main__":
    main()
