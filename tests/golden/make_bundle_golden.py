"""Write tests/golden/bundle_200.json: what the bundled ShapeWorld model does on 200 fixed scenes.

Run once before a change that must not change behaviour
(`PYTHONPATH=. python tests/golden/make_bundle_golden.py`); tests/test_golden.py then holds
every later version of the code to it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.presets import SHAPEWORLD_DIR

OUT = Path(__file__).with_name("bundle_200.json")
N = 200
SEED = "golden-200"


def scenes() -> list[sw.Scene]:
    rng = random.Random(SEED)
    return [sw.sample_scene(rng, split="any") for _ in range(N)]


def few_shot_lists() -> list[list]:
    """200 2-shot lists of one-object scenes, each asking for an attribute in turn."""
    rng = random.Random(f"{SEED}-few-shot")
    lists = []
    for i in range(N):
        attribute = ("shape", "color", "size")[i % 3]
        key = sw.FEW_SHOT_KEYS[attribute][0]
        parts: list = []
        for _ in range(2):
            scene = sw.sample_scene(rng, 1, split="any")
            parts += [sw.render(scene), f"{key}: {sw.attribute(scene, attribute)}\n"]
        lists.append([*parts, sw.render(sw.sample_scene(rng, 1, split="any")), f"{key}:"])
    return lists


def behaviour(pipeline: Pipeline) -> dict:
    """Captions, answers, few-shot continuations and zero-shot scores of the 200 scenes."""
    items = scenes()
    images = [sw.render(scene) for scene in items]
    rng = random.Random(SEED)
    questions = [rng.choice(sw.questions(scene))[0] for scene in items]
    scores = pipeline.classify(images, sw.labels())
    sure = pipeline.caption(images[:50], return_words=True)
    return {
        "captions": pipeline.caption(images),
        "beam_captions": pipeline.caption(images[:40], num_beams=3),
        "questions": questions,
        "answers": pipeline.answer(images, questions),
        "few_shot": pipeline.continue_sequences(few_shot_lists(), max_new_tokens=4),
        "caption_word_confidence": [[round(p, 3) for _, p in g.words] for g in sure],
        "zero_shot": [{label: round(p, 4) for label, p in list(row.items())[:3]} for row in scores],
    }


if __name__ == "__main__":
    result = behaviour(Pipeline.from_pretrained(SHAPEWORLD_DIR, device="cpu"))
    OUT.write_text(json.dumps(result, indent=0) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
