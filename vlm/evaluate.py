"""`python -m vlm eval …`: what a model learned.

`shapeworld`: on fresh scenes, captions (exact match with `describe`), zero-shot labels (train
and held-out combinations apart), VQA accuracy per question type, text-to-image recall, and the
encoder's binding (does the image prefer its caption to the same caption with one object's
shape, size or colour changed?), each also under JPEG quality 50 and a resize to 224 pixels
and back.

`captions`, `zeroshot`, `vqa`: on real data files (`vlm.data`), the standard scores
(`vlm.metrics`): COCO caption metrics and retrieval recall, top-1 on a labelled folder, VQA
accuracy.
"""

from __future__ import annotations

import dataclasses
import io
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import shapeworld as sw
from .data import BadRows, group_by_image
from .images import ImageError
from .metrics import caption_scores, normalize_answer, recall_at_k

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


BINDING_FIELDS = ("shape", "size", "color")


def one_change_captions(scene: sw.Scene, field: str) -> list[str]:
    """The scene's caption with one object's `field` (shape, size or colour) changed, every way."""
    values = {"shape": sw.SHAPES, "size": sw.SIZES, "color": tuple(sw.COLORS)}[field]
    captions = []
    for k, obj in enumerate(scene.objects):
        for value in values:
            if value != getattr(obj, field):
                objects = list(scene.objects)
                objects[k] = dataclasses.replace(obj, **{field: value})
                captions.append(sw.describe(sw.Scene(tuple(objects))))
    return captions


def binding_accuracy(encoder, images, scenes, text_cache: dict | None = None) -> dict[str, float]:
    """The CLIP side's binding on scenes of several objects: how often the image embedding
    ranks the true caption above every caption with one object's shape (size, colour) changed.
    `text_cache` keeps the caption embeddings between calls on the same scenes (they are the
    same for every perturbation of the images)."""
    text_cache = {} if text_cache is None else text_cache
    image_embeddings = encoder.encode_images(images, normalize=True)
    scores = {}
    for field in BINDING_FIELDS:
        hits = []
        for scene, image in zip(scenes, image_embeddings, strict=True):
            key = (sw.describe(scene), field)  # the caption fixes its one-change variants
            if key not in text_cache:
                texts = [key[0], *one_change_captions(scene, field)]
                text_cache[key] = encoder.encode_text(texts)
            similarity = text_cache[key] @ image
            hits.append(bool(similarity[0] > similarity[1:].max()))
        scores[f"binding_{field}"] = float(np.mean(hits))
    return scores


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
    text_cache: dict = {}  # binding: caption embeddings, shared by the perturbations
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

        crowded = [i for i, s in enumerate(scenes) if len(s.objects) > 1]
        binding = binding_accuracy(pipeline.encoder, [images[i] for i in crowded],
                                   [scenes[i] for i in crowded], text_cache)  # fmt: skip
        for measure, score in binding.items():
            results[measure][kind] = score
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


# ---------------------------------------------------------------------------- real data


def usable_batches(examples, batch_size: int, bad: BadRows):
    """(examples, their decoded images) in batches for evaluation: rows whose image is missing
    or unreadable go to `bad`, as training skips them (strict: `DataError`)."""
    chunk, images = [], []
    for example in bad.usable(examples):
        try:
            images.append(example.load())
        except (ImageError, OSError) as error:
            bad.skip(example.source or example.key, f"unreadable image: {error}")
            continue
        chunk.append(example)
        if len(chunk) == batch_size:
            yield chunk, images
            chunk, images = [], []
    if chunk:
        yield chunk, images


def hit_limit(pipeline, texts: list[str], max_new_tokens: int) -> int:
    """How many generated texts are as long as `max_new_tokens` (cut off, most likely)."""
    lengths = [len(pipeline.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return sum(n >= max_new_tokens for n in lengths)


def truncation_note(cut: int, total: int, max_new_tokens: int) -> str:
    return (f"{cut} of {total} outputs reached --max-new-tokens {max_new_tokens} and were "
            "probably cut off (scored as they are); raise --max-new-tokens")  # fmt: skip


def evaluate_captions(
    pipeline, examples, batch_size: int = 32, num_beams: int = 1, max_new_tokens: int = 60,
    strict: bool = False,
) -> dict:  # fmt: skip
    """Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE if available) of the
    pipeline's captions against each image's reference captions (all rows of an image), and
    text↔image recall@1/5/10
    over the same images (a caption's relevant image is its own; an image's relevant texts
    are its captions). Bad rows are skipped and listed (`strict`: raise); a note (and a
    warning on stderr) says how many captions reached `max_new_tokens`. Returns {"scores",
    "notes", "images", "skipped", "predictions"}."""
    bad = BadRows(strict)
    kept, predictions, image_features = [], {}, []
    examples = group_by_image(bad.usable(e for e in examples if e.captions))
    for chunk, images in usable_batches(examples, batch_size, bad):
        captions = pipeline.caption(images, batch_size=batch_size, num_beams=num_beams,
                                    max_new_tokens=max_new_tokens)  # fmt: skip
        predictions.update((str(i), c) for i, c in enumerate(captions, len(kept)))
        image_features.append(pipeline.encoder.encode_images(images, normalize=True))
        kept += chunk
    if bad:
        print(bad.report(), file=sys.stderr)
    examples = kept
    if not examples:
        raise ValueError("no readable image with captions to evaluate on")
    references = {str(i): e.captions for i, e in enumerate(examples)}
    scores, notes = caption_scores(references, predictions)
    cut = hit_limit(pipeline, list(predictions.values()), max_new_tokens)
    if cut:
        notes.append(truncation_note(cut, len(predictions), max_new_tokens))
        print("warning: " + notes[-1], file=sys.stderr)

    texts = [(i, c) for i, e in enumerate(examples) for c in e.captions]
    text_features = torch.cat([
        pipeline.encoder.encode_text([c for _, c in texts[s : s + 256]], normalize=True)
        for s in range(0, len(texts), 256)
    ]).cpu()  # fmt: skip
    images = torch.cat(image_features).cpu()
    similarity = text_features @ images.T  # [texts, images]
    for k, r in recall_at_k(similarity, [{i} for i, _ in texts]).items():
        scores[f"text→image R@{k}"] = r
    owners = [set() for _ in examples]
    for row, (i, _) in enumerate(texts):
        owners[i].add(row)
    for k, r in recall_at_k(similarity.T, owners).items():
        scores[f"image→text R@{k}"] = r
    rows = [{"key": e.key, "caption": predictions[str(i)], "references": e.captions}
            for i, e in enumerate(examples)]  # fmt: skip
    return {"scores": scores, "notes": notes, "images": len(examples),
            "skipped": [f"{w}: {r}" for w, r in bad.rows], "predictions": rows}  # fmt: skip


def evaluate_zeroshot(pipeline, folder, batch_size: int = 64) -> dict:
    """Zero-shot top-1 on a labelled image folder (one subfolder per class, named by its
    label; "_" reads as a space)."""
    from .images import list_images

    classes = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    labels = [c.name.replace("_", " ") for c in classes]
    items = [(path, label) for c, label in zip(classes, labels, strict=True)
             for path in list_images([c])]  # fmt: skip
    if len(labels) < 2 or not items:
        raise ValueError(f"{folder}: expected one subfolder of images per class (two or more)")
    per_class: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        for (_, label), probs in zip(chunk, pipeline.classify([p for p, _ in chunk], labels),
                                     strict=True):  # fmt: skip
            per_class[label].append(next(iter(probs)) == label)
    hits = [h for v in per_class.values() for h in v]
    scores = {"top-1": float(np.mean(hits))}
    scores.update({f"top-1 {label}": float(np.mean(v)) for label, v in per_class.items()})
    return {"scores": scores, "notes": [], "images": len(items)}


def evaluate_vqa(
    pipeline, examples, batch_size: int = 32, max_new_tokens: int = 10, strict: bool = False
) -> dict:
    """Free-form answer accuracy on Q/A examples after VQA normalisation; with several
    annotators' answers, VQA's min(#agreeing / 3, 1). Bad rows as in `evaluate_captions`."""
    bad = BadRows(strict)
    scores, rows = [], []
    questions = (e for e in examples if e.question is not None)
    for chunk, images in usable_batches(questions, batch_size, bad):
        answers = pipeline.answer(images, [e.question for e in chunk],
                                  max_new_tokens=max_new_tokens)  # fmt: skip
        for example, got in zip(chunk, answers, strict=True):
            truth = [normalize_answer(a) for a in example.answers or [example.answer]]
            agree = truth.count(normalize_answer(got))
            scores.append(min(agree / 3, 1.0) if len(truth) > 1 else float(agree > 0))
            rows.append({"key": example.key, "question": example.question, "answer": got,
                         "truth": example.answers or [example.answer]})  # fmt: skip
    if bad:
        print(bad.report(len(rows) + len(bad)), file=sys.stderr)
    if not rows:
        raise ValueError("no readable image with a question to evaluate on")
    notes = []
    cut = hit_limit(pipeline, [row["answer"] for row in rows], max_new_tokens)
    if cut:
        notes.append(truncation_note(cut, len(rows), max_new_tokens))
        print("warning: " + notes[-1], file=sys.stderr)
    return {"scores": {"accuracy": float(np.mean(scores))}, "notes": notes,
            "questions": len(rows), "skipped": [f"{w}: {r}" for w, r in bad.rows],
            "predictions": rows}  # fmt: skip


def format_scores(result: dict) -> str:
    """A two-column Markdown table of a real-data evaluation, with its notes."""
    lines = ["| metric | score |", "|---|---:|"]
    for name, value in result["scores"].items():
        lines.append(f"| {name} | {value:.4f} |")
    notes = result["notes"] + (
        [f"skipped {len(result['skipped'])} bad rows"] if result.get("skipped") else []
    )
    return "\n".join(lines + [f"\nnote: {n}" for n in notes])
