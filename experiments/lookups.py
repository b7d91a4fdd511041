"""Diagnosis: does the frozen ShapeWorld LM bind attributes to their object, or guess by position?

On two-object scenes whose objects differ in colour, shape and size, as text (no image):

- `binding`: "Caption: <describe(scene)>\\nQuestion: what color is the <shape>? Answer:" (and
  "what shape is the <color> object?"), asked of the first and of the second object; right
  when the true answer's first-token logit beats the other object's. An LM that looks the
  answer up scores about 1.00 for both objects; one that picks a scene colour by position
  scores p and 1 - p (they add up to about 1);
- `copying`: the caption, then "Caption: there is a <size> <color>" (the next word is that
  object's shape) or "Caption: there is a <size>" (its colour): the plain induction copy a
  paraphrase after a caption asks for, right when the true word beats the other four
  shapes / nine colours.

    PYTHONPATH=. python experiments/lookups.py --lm assets/shapeworld/lm   # ~20 s

Measured 2026-12-01 (seed 7, 200 scenes) on the bundle's LM and on the LM-stage trainings of
the retired `lm_variants.py` (experiments/README.md; results: docs/shapeworld-lab.md, "Why
the lookups do not form"): the bundle's LM binds colour 0.73 / 0.28 and shape 0.73 / 0.28
(first / second object), that is by position, not by lookup, and copies neither (0.54,
0.54). Shape binding read 1.00 / 1.00 in exactly the two trainings that copied the shape
(0.99-1.00); no training bound colour. Only a document mask made copying the colour
dependable (1.00 in both GPT-2 trainings, 0.51-0.55 without it).
"""

from __future__ import annotations

import argparse
import collections
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlm import shapeworld as sw


def _distinct_pairs(rng: random.Random, n: int) -> list[sw.Scene]:
    scenes = []
    while len(scenes) < n:
        scene = sw.sample_scene(rng, n_objects=2)
        a, b = scene.objects
        if a.color != b.color and a.shape != b.shape and a.size != b.size:
            scenes.append(scene)
    return scenes


def lookups(lm, tokenizer, scenes: list[sw.Scene]) -> dict[str, float]:
    """{measure: accuracy} of binding (by question kind and object) and copying."""
    first = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
             for w in (*sw.COLORS, *sw.SHAPES)}  # fmt: skip

    def logits(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            return lm(input_ids=ids).logits[0, -1]

    hits = collections.defaultdict(list)
    for scene in scenes:
        caption = f"Caption: {sw.describe(scene)}"
        for i, (obj, other) in enumerate([scene.objects, scene.objects[::-1]]):
            for kind, question, right, wrong in [
                ("color", f"what color is the {obj.shape}?", obj.color, other.color),
                ("shape", f"what shape is the {obj.color} object?", obj.shape, other.shape),
            ]:
                out = logits(f"{caption}\nQuestion: {question} Answer:")
                hits[f"binding {kind} @ object {i + 1}"].append(
                    bool(out[first[right]] > out[first[wrong]])
                )
        obj = random.Random(sw.describe(scene)).choice(scene.objects)
        for kind, cue, right, pool in [
            ("shape", f"a {obj.size} {obj.color}", obj.shape, sw.SHAPES),
            ("colour", f"a {obj.size}", obj.color, sw.COLORS),
        ]:
            out = logits(f"{caption}\nCaption: there is {cue}")
            hits[f"copying {kind}"].append(max(pool, key=lambda w: out[first[w]]) == right)
    return {key: sum(rows) / len(rows) for key, rows in sorted(hits.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", default="assets/shapeworld/lm", help="an LM folder")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lm = AutoModelForCausalLM.from_pretrained(args.lm, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.lm)
    scenes = _distinct_pairs(random.Random(f"lookups-{args.seed}"), args.n)
    for key, accuracy in lookups(lm, tokenizer, scenes).items():
        print(f"{key:28s} {accuracy:.2f}")


if __name__ == "__main__":
    main()
