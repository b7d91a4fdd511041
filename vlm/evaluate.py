"""`python -m vlm eval captions | zeroshot | vqa`: what a model learned, on real data files
(`vlm.data`), with the standard scores (`vlm.metrics`): COCO caption metrics and retrieval
recall, top-1 on a labelled folder, VQA accuracy. (`eval shapeworld` is
`vlm.shapeworld.evaluation`.)
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .data import BadRows, group_by_image
from .errors import InputError
from .images import ImageError
from .metrics import caption_scores, normalize_answer, recall_at_k

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
        raise InputError("no readable image with captions to evaluate on")
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
        raise InputError(f"{folder}: expected one subfolder of images per class (two or more)")
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
        raise InputError("no readable image with a question to evaluate on")
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
