"""Diagnosis: how much of each caption do the encoder's patch tokens hold?

The CLIP stage trains CoCa's captioning decoder beside the encoder (`vlm.caption_head.CaptionHead`),
then drops it. Kept in the stage's checkpoint, it reads the patch tokens the prefix mapper
reads (before the linear projection into the joint space that the mapper reads them through),
trained with the encoder instead of after it: its greedy captions, exact-matched
with `describe` on fresh scenes, say roughly how much a mapper could get out of that encoder.
Given a bundle too, its captions of the same scenes are scored beside.

    PYTHONPATH=. python experiments/coca_ceiling.py --run runs/shapeworld \\
        --bundle assets/shapeworld                        # ~2 min on 2 CPU cores

Measured 2026-11-29 (600 scenes, seed 4321; one-layer decoder). With the captioning loss at
weight 1 (the bundle shipped before): the decoder writes 71.8% of captions exactly (one object
95.5%, two 75.2%, three 47.0%), that bundle 61.5% (99.5 / 58.9 / 24.5%); on 600 scenes it
trained on, the decoder 75.7%, so it hardly overfits. At weight 2: 85.3% (93.8 / 88.1 /
74.7%). At weight 4 (the shipped recipe): 94.3% (98.9 / 97.3 / 86.9%), and the shipped bundle
93.3% (100 / 98.7 / 81.3%): the mapper now passes on nearly all the encoder holds.
"""

from __future__ import annotations

import argparse
import collections
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.caption_head import CaptionHead, caption_vocabulary
from vlm.factory import build_encoder
from vlm.shapeworld.evaluation import normalize_caption
from vlm.training.config import CAPTION_LAYERS, MODEL_SIZES


def load_caption_head(run: Path, size: str = "small", layers: int = CAPTION_LAYERS):
    """(encoder, head) as the CLIP stage's checkpoint in `run` left them."""
    encoder = build_encoder(MODEL_SIZES[size]["clip"])
    state = load_file(run / "checkpoints" / "clip" / "model.safetensors")
    if "caption.vocabulary" in state:
        vocabulary = state["caption.vocabulary"].tolist()
    else:  # checkpoints before 2026-11-29: every word of ShapeWorld's captions
        rng = random.Random(0)
        captions = [sw.describe(sw.sample_scene(rng)) for _ in range(5000)]
        vocabulary = caption_vocabulary(encoder.tokenizer, captions)
        state["caption.vocabulary"] = torch.tensor(vocabulary)
    width = encoder.model.visual.transformer.width
    head = CaptionHead(vocabulary, width, layers, encoder.tokenizer.context_length)
    torch.nn.ModuleDict({"clip": encoder.model, "caption": head}).load_state_dict(state)
    return encoder, head.eval()


def head_captions(encoder, head, images, batch_size: int = 100) -> list[str]:
    """The decoder's greedy caption of each image."""
    tokenizer, visual = encoder.tokenizer, encoder.model.visual
    texts = []
    for start in range(0, len(images), batch_size):
        pixels = encoder.pixels(images[start : start + batch_size])
        visual.output_tokens = True
        with torch.no_grad():
            _, patches = visual(pixels)
        visual.output_tokens = False
        for ids in head.generate(patches, tokenizer.sot_token_id, tokenizer.eot_token_id):
            texts.append(tokenizer.decode(ids).strip())
    return texts


def exact_by_count(captions: list[str], scenes: list[sw.Scene]) -> dict[str, float]:
    """Exact-match rate overall and by object count."""
    hits = collections.defaultdict(list)
    for caption, scene in zip(captions, scenes, strict=True):
        hit = normalize_caption(caption) == sw.describe(scene)
        hits[str(len(scene.objects))].append(hit)
        hits["all"].append(hit)
    return {key: sum(v) / len(v) for key, v in sorted(hits.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a training run folder")
    parser.add_argument("--bundle", help="a pipeline to score on the same scenes")
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args()
    torch.set_num_threads(2)
    encoder, head = load_caption_head(args.run)
    rng = random.Random(args.seed)
    scenes = [sw.sample_scene(rng) for _ in range(args.n)]
    images = [sw.render(scene) for scene in scenes]
    rows = {"CoCa decoder": exact_by_count(head_captions(encoder, head, images), scenes)}
    if args.bundle:
        pipeline = Pipeline.from_pretrained(args.bundle)
        rows["bundle"] = exact_by_count(pipeline.caption(images, batch_size=100), scenes)
    print(f"{'caption exact':14s} {'all':>6s} {'1':>6s} {'2':>6s} {'3':>6s}")
    for name, row in rows.items():
        print(f"{name:14s} " + " ".join(f"{row[k]:6.1%}" for k in ("all", "1", "2", "3")))


if __name__ == "__main__":
    main()
