"""`python -m vlm eval shapeworld`: what the model learned, measured on fresh scenes.

Captions (exact match with `describe`), zero-shot labels (train and held-out combinations
apart), VQA accuracy per question type, text-to-image recall, each also under JPEG quality 50
and a resize to 224 pixels and back.
"""

from __future__ import annotations

import io
import random
from collections import defaultdict

import numpy as np
from PIL import Image

from . import shapeworld as sw

PERTURBATIONS = ("clean", "jpeg50", "resize224")
TARGETS = {
    "caption_exact": 0.90, "zeroshot_train": 0.95, "zeroshot_held_out": 0.80,
    "vqa_overall": 0.85, "retrieval_r5": 0.90,
}  # fmt: skip


def perturb(image: Image.Image, kind: str) -> Image.Image:
    """The image as it comes out of JPEG at quality 50, or of a resize to 224 and back."""
    if kind == "jpeg50":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=50)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "resize224":
        return image.resize((224, 224), Image.BICUBIC).resize(image.size, Image.BICUBIC)
    return image


def normalize_caption(text: str) -> str:
    return text.strip().lower().removesuffix(".").strip()


def evaluate_shapeworld(
    pipeline, n: int = 1000, seed: int = 1234, split: str = "train",
    perturbations: tuple[str, ...] = PERTURBATIONS, batch_size: int = 64,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """{measure: {perturbation: score}} on n freshly sampled scenes of `split`."""
    rng = random.Random(f"eval-{seed}-{split}")
    scenes = [sw.sample_scene(rng, split=split) for _ in range(n)]
    singles = [sw.sample_scene(rng, 1, split="train") for _ in range(max(1, n // 2))]
    held_out = [sw.sample_scene(rng, 1, split="held_out") for _ in range(max(1, n // 2))]
    qa = [(i, q, a) for i, s in enumerate(scenes) for q, a in [rng.choice(sw.questions(s))]]
    labels = sw.labels()
    clean = {  # rendered once; each perturbation starts from these
        name: [sw.render(s) for s in group]
        for name, group in (("scenes", scenes), ("zeroshot_train", singles),
                            ("zeroshot_held_out", held_out))
    }  # fmt: skip
    results: dict[str, dict[str, float]] = defaultdict(dict)
    for kind in perturbations:
        images = [perturb(image, kind) for image in clean["scenes"]]
        captions = pipeline.caption(images, batch_size=batch_size)
        exact = [
            normalize_caption(c) == sw.describe(s) for c, s in zip(captions, scenes, strict=True)
        ]
        results["caption_exact"][kind] = float(np.mean(exact))

        for name, group in (("zeroshot_train", singles), ("zeroshot_held_out", held_out)):
            probs = pipeline.classify([perturb(image, kind) for image in clean[name]], labels)
            top = [next(iter(p)) == s.objects[0].name for p, s in zip(probs, group, strict=True)]
            results[name][kind] = float(np.mean(top))

        answers = []
        for start in range(0, len(qa), batch_size):
            chunk = qa[start : start + batch_size]
            answers += pipeline.answer([images[i] for i, _, _ in chunk], [q for _, q, _ in chunk])
        per_type = defaultdict(list)
        for (_, q, a), got in zip(qa, answers, strict=True):
            per_type[sw.question_type(q)].append(normalize_caption(got) == a)
        for qtype, hits in sorted(per_type.items()):
            results[f"vqa_{qtype}"][kind] = float(np.mean(hits))
        results["vqa_overall"][kind] = float(np.mean([h for v in per_type.values() for h in v]))

        index = pipeline.build_index(images, batch_size=batch_size)
        r1, r5 = [], []
        for query in sorted({sw.describe(s) for s in scenes}):
            hits = [sw.describe(scenes[h.position]) == query for h in index.search(query, k=5)]
            r1.append(hits[0])
            r5.append(any(hits))
        results["retrieval_r1"][kind] = float(np.mean(r1))
        results["retrieval_r5"][kind] = float(np.mean(r5))
    return dict(results)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per measure, one column per perturbation, plus the target."""
    kinds = list(next(iter(results.values())))
    lines = [
        "| measure | " + " | ".join(kinds) + " | target |",
        "|---|" + "---:|" * (len(kinds) + 1),
    ]
    for measure, scores in results.items():
        target = f"≥ {TARGETS[measure]:.0%}" if measure in TARGETS else ""
        cells = " | ".join(f"{scores[k]:.1%}" for k in kinds)
        lines.append(f"| {measure} | {cells} | {target} |")
    return "\n".join(lines)
