"""`vlm eval shapeworld`: what the bundled model learned, on fresh scenes.

Captions (exact match with `describe`), zero-shot labels (train and held-out combinations
apart), VQA accuracy per question type, text-to-image recall, the encoder's binding (does the
image prefer its caption to the same caption with one object's shape, size or colour
changed?), few-shot lists against an image-blind guesser, explain's peaks, familiarity and
calibration, each also under JPEG quality 50 and a resize to 224 pixels and back; and the
targets they are held to.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
from collections import defaultdict

import numpy as np
from PIL import Image, ImageDraw

from ..calibration import expected_calibration_error, right_words
from ..errors import SequenceTooLong
from ..visualize import peak_centre
from . import world as sw

log = logging.getLogger("vlm.shapeworld.evaluation")

PERTURBATIONS = ("clean", "jpeg50", "resize224")
# the generalisation issue's targets (fresh scenes, --n 1000)
TARGETS = {
    "caption_exact": 0.95, "vqa_overall": 0.92, "zeroshot_train": 0.97,
    "zeroshot_held_out": 0.90, "held_out_caption_exact": 0.85,
    "held_out_caption_exact_1obj": 0.97, "held_out_vqa_overall": 0.85,
    "phrasing_vqa_overall": 0.85, "retrieval_r5": 0.90, "explain_peak_all": 0.90,
    "few_shot_seen_2shot": 0.80, "few_shot_held_out_2shot": 0.70,
    "familiarity_auroc_photos": 0.99, "familiarity_auroc_white_background": 0.95,
    "familiarity_auroc_noise": 0.95,
    # videos (`evaluate_video`, fresh clips): the held-out motion form is reported, no target
    "video_description_exact": 0.85, "held_out_video_description_exact": 0.75,
    "video_qa_overall": 0.85,
}  # fmt: skip
# targets that are ceilings: the share of in-world scenes called unfamiliar
CEILINGS = {"familiarity_false_alarms": 0.02, "familiarity_false_alarms_held_out": 0.02}
# skimage's photos that ship in its wheel (no download): the photos outside ShapeWorld
PHOTOS = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon",
          "retina", "rocket")  # fmt: skip


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


def exact_caption_scores(
    pipeline, images, scenes, prefix: str, batch_size: int
) -> dict[str, float]:
    """Exact captions, overall and by object count (`<prefix>caption_exact[_<k>obj]`), and how
    sure the model says it is of their words (`word_confidence`)."""
    written = pipeline.caption(images, batch_size=batch_size, return_words=True)
    captions = [g.text for g in written]
    exact = [normalize_caption(c) == sw.describe(s) for c, s in zip(captions, scenes, strict=True)]
    scores = {f"{prefix}caption_exact": float(np.mean(exact))}
    for count in (1, 2, 3):
        hits = [e for e, s in zip(exact, scenes, strict=True) if len(s.objects) == count]
        if hits:
            scores[f"{prefix}caption_exact_{count}obj"] = float(np.mean(hits))
    return scores | word_confidence(written, [[sw.describe(s)] for s in scenes], prefix)


def word_confidence(written, references, prefix: str) -> dict[str, float]:
    """For the words of written captions (`Generated`, with their references): the mean
    confidence the model shows for the wrong words and for the right ones, the same for the
    LM's raw probabilities, and the shown confidence's ECE (`<prefix>caption_words_*`)."""
    shown, raw, right = [], [], []
    for generated, refs in zip(written, references, strict=True):
        right += right_words([w for w, _ in generated.words], refs)
        shown += [p for _, p in generated.words]
        raw += [p for _, p in generated.raw_words]
    shown, raw, right = np.array(shown), np.array(raw), np.array(right, dtype=bool)
    mean = lambda values: float(values.mean()) if len(values) else float("nan")  # noqa: E731
    return {
        f"{prefix}caption_words_wrong_shown": mean(shown[~right]),
        f"{prefix}caption_words_wrong_raw": mean(raw[~right]),
        f"{prefix}caption_words_right_shown": mean(shown[right]),
        f"{prefix}caption_words_right_raw": mean(raw[right]),
        f"{prefix}caption_words_wrong_share": mean(~right),
        f"{prefix}caption_words_ece": expected_calibration_error(shown, right),
    }


def chat_scores(pipeline, n: int, seed: int) -> dict[str, float]:
    """Second turns of conversations (`Pipeline.chat`): an image and a question in seen form,
    the model's own answer, then a follow-up with no image; its accuracy against the same
    question asked alone (`chat_second_turn`, `chat_single_turn`), on seen scenes, on scenes
    with a held-out combination (`held_out_`) and with the follow-up in a held-out form
    (`phrasing_`)."""
    rng = random.Random(f"chat-{seed}")
    scores = {}
    for prefix, split, forms in (("", "train", "seen"), ("held_out_", "held_out", "seen"),
                                 ("phrasing_", "train", "held_out")):  # fmt: skip
        alone, second = [], []
        while len(alone) < n:
            scene = sw.sample_scene(rng, split=split)
            first, follow = sw.questions(scene, rng, forms="seen"), sw.questions(scene, rng, forms)
            if not first or not follow:
                continue
            (q1, _), (q2, a2) = rng.choice(first), rng.choice(follow)
            image = sw.render(scene)
            reply = pipeline.answer([image], [q1])[0]
            shown = [{"type": "image", "image": image}, {"type": "text", "text": q1}]
            talk = [{"role": "user", "content": shown}, {"role": "assistant", "content": reply},
                    {"role": "user", "content": q2}]  # fmt: skip
            alone.append(normalize_caption(pipeline.answer([image], [q2])[0]) == a2)
            second.append(normalize_caption(pipeline.chat(talk, max_new_tokens=6)) == a2)
        scores[f"{prefix}chat_single_turn"] = float(np.mean(alone))
        scores[f"{prefix}chat_second_turn"] = float(np.mean(second))
    return scores


def answer_scores(pipeline, images, qa, prefix: str, batch_size: int) -> dict[str, float]:
    """Answer accuracy by question type and overall (`<prefix>vqa_<type>`), and the ECE of
    the confidence shown for the answers (`<prefix>vqa_ece`; of the LM's raw probability:
    `_raw`); `qa` holds (image index, question, answer)."""
    answers = []
    for start in range(0, len(qa), batch_size):
        chunk = qa[start : start + batch_size]
        answers += pipeline.answer([images[i] for i, _, _ in chunk], [q for _, q, _ in chunk],
                                   return_words=True)  # fmt: skip
    per_type, shown, raw, right = defaultdict(list), [], [], []
    for (_, q, a), got in zip(qa, answers, strict=True):
        hit = normalize_caption(got.text) == a
        per_type[sw.question_type(q)].append(hit)
        right.append(hit)
        shown.append(float(np.prod([p for _, p in got.words])) if got.words else 0.0)
        raw.append(float(np.prod([p for _, p in got.raw_words])) if got.raw_words else 0.0)
    scores = {f"{prefix}vqa_{t}": float(np.mean(h)) for t, h in sorted(per_type.items())}
    scores[f"{prefix}vqa_overall"] = float(np.mean([h for v in per_type.values() for h in v]))
    scores[f"{prefix}vqa_ece"] = expected_calibration_error(shown, right)
    scores[f"{prefix}vqa_ece_raw"] = expected_calibration_error(raw, right)
    return scores | choice_confidence(pipeline, images, qa, prefix)


def choice_confidence(pipeline, images, qa, prefix: str, most: int = 500) -> dict[str, float]:
    """The ECE of the best choice's probability when each question (at most `most`) comes
    with its answer and up to 4 other answers of its kind (`<prefix>vqa_choice_ece`; of the
    LM's raw choice probabilities: `_raw`)."""
    kinds = defaultdict(set)
    for _, q, a in qa:
        kinds[sw.question_type(q)].add(a)
    rng = random.Random(f"choices-{prefix}")
    shown, raw, right = [], [], []
    for i, q, a in qa[:most]:
        others = sorted(kinds[sw.question_type(q)] - {a})
        choices = sorted([a, *rng.sample(others, min(4, len(others)))])
        if len(choices) < 2:
            continue
        best, probs = pipeline.answer([images[i]], [q], choices, return_scores=True,
                                      calibration=None)[0]  # fmt: skip
        calibration = getattr(pipeline, "calibration", None)
        raw.append(probs[best])
        shown.append(calibration.choices(probs)[best] if calibration else probs[best])
        right.append(best == a)
    return {
        f"{prefix}vqa_choice_ece": expected_calibration_error(shown, right),
        f"{prefix}vqa_choice_ece_raw": expected_calibration_error(raw, right),
    }


def evaluate_shapeworld(
    pipeline, n: int = 1000, seed: int = 1234,
    perturbations: tuple[str, ...] = PERTURBATIONS, batch_size: int = 64, extras: bool = True,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """{measure: {perturbation: score}} on freshly sampled scenes, in slices (`extras=False`:
    only the captions and answers of the first three):

    - seen (no measure prefix): n scenes of seen colour-shape combinations, questions in
      the seen forms;
    - `held_out_`: n scenes with at least one HELD_OUT combination (never in a training image);
    - `phrasing_`: questions in HELD_OUT_FORMS (never asked of a training image) on the seen
      scenes;
    - zero-shot labels on one-object scenes of seen and held-out combinations, text-to-image
      recall, the encoder's binding, explain's peak on the named object (`explain_peak_*`, on
      n / 10 scenes of two or three objects) and k-shot lists (`few_shot_*`, see
      `evaluate_few_shot`)."""
    rng = random.Random(f"eval-{seed}")
    scenes = [sw.sample_scene(rng, split="train") for _ in range(n)]
    held_scenes = [sw.sample_scene(rng, split="held_out") for _ in range(n)]
    singles = [sw.sample_scene(rng, 1, split="train") for _ in range(max(1, n // 2))]
    held_singles = [sw.sample_scene(rng, 1, split="held_out") for _ in range(max(1, n // 2))]
    pick = lambda group, forms: [  # noqa: E731  one question per scene
        (i, *rng.choice(sw.questions(s, rng, forms=forms)))
        for i, s in enumerate(group)
        if sw.questions(s, rng, forms=forms)
    ]
    qa, held_qa, phrasing_qa = (
        pick(scenes, "seen"),
        pick(held_scenes, "seen"),
        pick(scenes, "held_out"),
    )
    crowded = [
        sw.sample_scene(rng, rng.choice([2, 3]), split="any") for _ in range(max(1, n // 10))
    ]
    groups = {"scenes": scenes, "held_out": held_scenes, "zeroshot_train": singles,
              "zeroshot_held_out": held_singles, "explain": crowded}  # fmt: skip
    clean = {name: [sw.render(s) for s in group] for name, group in groups.items()}
    unfamiliar = outside_world(max(1, n // 5), seed)
    results: dict[str, dict[str, float]] = defaultdict(dict)
    text_cache: dict = {}  # binding: caption embeddings, shared by the perturbations
    few_shot: dict[str, float] = {}
    for kind in perturbations:
        images = {name: [perturb(image, kind) for image in group]
                  for name, group in clean.items()}  # fmt: skip
        scores = exact_caption_scores(pipeline, images["scenes"], scenes, "", batch_size)
        scores |= exact_caption_scores(
            pipeline, images["held_out"], held_scenes, "held_out_", batch_size
        )
        scores |= answer_scores(pipeline, images["scenes"], qa, "", batch_size)
        scores |= answer_scores(pipeline, images["held_out"], held_qa, "held_out_", batch_size)
        scores |= answer_scores(pipeline, images["scenes"], phrasing_qa, "phrasing_", batch_size)
        if extras:
            scores |= _extras(pipeline, images, groups, kind, seed, batch_size, text_cache)
            if pipeline.familiarity_profile is not None:
                outside = {name: [perturb(image, kind) for image in group]
                           for name, group in unfamiliar.items()}  # fmt: skip
                scores |= familiarity_scores(pipeline, images, outside)
            if kind == perturbations[0] and "answer" in getattr(pipeline, "tasks", ()):
                scores |= chat_scores(pipeline, max(1, n // 4), seed)
            if "few_shot" in getattr(pipeline, "tasks", ()):
                contexts = ("image", "described", "text")[: 3 if kind == perturbations[0] else 2]
                few_shot |= evaluate_few_shot(pipeline, max(1, n // 10), seed, kind,
                                              batch_size, contexts=contexts)  # fmt: skip
                scores |= few_shot  # the text rows (images replaced by words) are the same
        for measure, score in scores.items():
            results[measure][kind] = score
    return dict(results)


VIDEO_SLICES = {"": "train", "held_out_": "held_out", "held_out_motion_": "held_out_motion"}


def evaluate_video(
    pipeline, n: int = 200, seed: int = 1234, perturbations: tuple[str, ...] = ("clean", "jpeg50")
) -> dict[str, dict[str, float]]:  # fmt: skip
    """{measure: {perturbation: score}} on fresh clips (`vlm.shapeworld.clips`), `n` a slice:
    seen combinations and motions (no prefix), clips with a HELD_OUT combination that does
    something (`held_out_`) and clips with a HELD_OUT_MOTIONS (`held_out_motion_`). Each clip
    is read a frame a second (`Pipeline.describe_video`): its description exactly the
    canonical one (`video_description_exact`), and one of its questions answered exactly
    (`video_qa_overall`). A model not trained on clips (no "video" task) is measured all the
    same: its scores say how far its guesses are from the truth."""
    from .clips import clip_questions, describe_clip, render_clip, sample_clip

    rng = random.Random(f"eval-video-{seed}")
    slices = {}
    for prefix, split in VIDEO_SLICES.items():
        clips = [sample_clip(rng, split) for _ in range(n)]
        slices[prefix] = [(clip, rng.choice(clip_questions(clip))) for clip in clips]
    results: dict[str, dict[str, float]] = defaultdict(dict)
    for kind in perturbations:
        for prefix, cases in slices.items():
            # {task: (whether each text is right, its calibrated chance of it)}
            scored: dict[str, tuple[list, list]] = {"description": ([], []), "qa": ([], [])}
            for clip, (question, answer) in cases:
                frames = [perturb(frame, kind) for frame in render_clip(clip)]
                options = dict(fps=1.0, frame_rate=clip.fps, timeline=False)
                text = pipeline.describe_video(frames, **options)
                truth = normalize_caption(describe_clip(clip))
                reply = pipeline.answer_video(frames, question, **options)
                for task, result, right in (("description", text, truth), ("qa", reply, answer)):
                    scored[task][0].append(normalize_caption(result.text) == right)
                    scored[task][1].append(result.confidence)
            for task, (right, sure) in scored.items():
                score = "description_exact" if task == "description" else "qa_overall"
                results[f"{prefix}video_{score}"][kind] = float(np.mean(right))
                if None not in sure:  # a model calibrated for videos: does its chance hold?
                    results[f"{prefix}video_{task}_confidence"][kind] = float(np.mean(sure))
                    results[f"{prefix}video_{task}_ece"][kind] = expected_calibration_error(
                        sure, right)  # fmt: skip
    return dict(results)


def outside_world(n: int, seed: int, size: int = 128) -> dict[str, list[Image.Image]]:
    """Images the bundled model never saw, `n` of each: square crops of photos, seen scenes on
    a white background, uniform noise, a hexagon or an ellipse (shapes outside the world) in a
    world colour on black, and empty frames (no shape: a dark grey level with a little sensor
    noise, as a covered camera gives)."""
    from skimage import data as photos

    rng, noise = random.Random(f"outside-{seed}"), np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(photos, name)()).convert("RGB") for name in PHOTOS]
    crops = []
    for i in range(n):
        photo = sources[i % len(sources)]
        side = int(min(photo.size) * rng.uniform(0.4, 1.0))
        x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crops.append(photo.crop((x, y, x + side, y + side)).resize((size, size)))
    white = []
    for _ in range(n):
        pixels = np.asarray(sw.render(sw.sample_scene(rng), size)).copy()
        pixels[pixels.sum(2) < 30] = 255
        white.append(Image.fromarray(pixels))

    def outside_shape(kind: str) -> Image.Image:
        image = Image.new("RGB", (4 * size, 4 * size))
        draw, colour = ImageDraw.Draw(image), rng.choice(list(sw.COLORS.values()))
        cx, cy = (rng.uniform(0.3, 0.7) * 4 * size for _ in range(2))
        r = rng.uniform(0.12, 0.22) * 4 * size
        if kind == "hexagon":
            draw.polygon([(cx + r * np.cos(np.pi / 3 * k), cy + r * np.sin(np.pi / 3 * k))
                          for k in range(6)], fill=colour)  # fmt: skip
        else:
            draw.ellipse([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=colour)
        return image.resize((size, size), Image.Resampling.LANCZOS)

    return {
        "photos": crops, "white_background": white,
        "noise": [Image.fromarray(noise.integers(0, 256, (size, size, 3), dtype=np.uint8))
                  for _ in range(n)],
        "hexagon": [outside_shape("hexagon") for _ in range(n)],
        "ellipse": [outside_shape("ellipse") for _ in range(n)],
        "empty": [Image.fromarray(np.clip(rng.uniform(0, 40) + noise.normal(
            0, rng.uniform(0, 6), (size, size, 3)), 0, 255).astype(np.uint8))
            for _ in range(n)],
    }  # fmt: skip


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The chance that an inside image scores above an outside one (ties count half)."""
    inside, outside = np.asarray(inside)[:, None], np.asarray(outside)[None, :]
    return float((inside > outside).mean() + 0.5 * (inside == outside).mean())


def familiarity_scores(pipeline, images, outside) -> dict[str, float]:
    """False alarms on seen and held-out scenes, and AUROC against each outside slice."""
    groups = {"scenes": images["scenes"], "held_out": images["held_out"], **outside}
    scored = {name: pipeline.familiarity(group) for name, group in groups.items()}
    inside = [f.score for f in scored["scenes"] + scored["held_out"]]
    results = {
        "familiarity_false_alarms": float(np.mean([not f.familiar for f in scored["scenes"]])),
        "familiarity_false_alarms_held_out":
            float(np.mean([not f.familiar for f in scored["held_out"]])),
    }  # fmt: skip
    for name in outside:
        results[f"familiarity_auroc_{name}"] = auroc(inside, [f.score for f in scored[name]])
    return results


def _extras(pipeline, images, groups, kind, seed, batch_size, text_cache) -> dict[str, float]:
    """Zero-shot labels, retrieval, binding and explain's peaks (see above)."""
    scenes, labels, scores = groups["scenes"], sw.labels(), {}
    for name in ("zeroshot_train", "zeroshot_held_out"):
        group = groups[name]
        probs = pipeline.classify(images[name], labels)
        top = [next(iter(p)) == s.objects[0].name for p, s in zip(probs, group, strict=True)]
        scores[name] = float(np.mean(top))

    index = pipeline.build_index(images["scenes"], batch_size=batch_size)
    r1, r5 = [], []
    for query in sorted({sw.describe(s) for s in scenes}):
        hits = [sw.describe(scenes[h.position]) == query for h in index.search(query, k=5)]
        r1.append(hits[0])
        r5.append(any(hits))
    scores["retrieval_r1"], scores["retrieval_r5"] = float(np.mean(r1)), float(np.mean(r5))

    several = [i for i, s in enumerate(scenes) if len(s.objects) > 1]
    scores |= binding_accuracy(pipeline.encoder, [images["scenes"][i] for i in several],
                               [scenes[i] for i in several], text_cache)  # fmt: skip
    peaks = peak_hits(pipeline.explain, images["explain"], groups["explain"])
    scores |= {f"explain_peak_{k}": v for k, v in peaks.items()}
    return scores


# ---------------------------------------------------------------------------- explain


def named_texts(scene: sw.Scene) -> list[tuple[str, str, int]]:
    """(kind, text, index of the object it names) for every text that names one object of a
    scene alone: its colour and shape ("red circle"), its shape ("the star") or its colour
    ("something red")."""
    out = []
    for i, obj in enumerate(scene.objects):
        others = [o for j, o in enumerate(scene.objects) if j != i]
        if all(o.name != obj.name for o in others):
            out.append(("name", obj.name, i))
        if all(o.shape != obj.shape for o in others):
            out.append(("shape", f"the {obj.shape}", i))
        if all(o.color != obj.color for o in others):
            out.append(("color", f"something {obj.color}", i))
    return out


def peak_object(grid: np.ndarray, scene: sw.Scene) -> int:
    """The index of the object whose centre is nearest the map's highest cell."""
    x, y = peak_centre(grid, (1, 1))  # in image units, as the objects' centres
    return int(np.argmin([np.hypot(o.x - x, o.y - y) for o in scene.objects]))


def peak_hits(explain, images, scenes: list[sw.Scene]) -> dict[str, float]:
    """How often the peak of `explain(image, text) -> grid` falls on (is nearest to) the
    object the text names, by kind of text and over `all` (chance: 1/2 or 1/3)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, scene in zip(images, scenes, strict=True):
        for kind, text, index in named_texts(scene):
            hit = peak_object(np.asarray(explain(image, text)), scene) == index
            hits[kind].append(hit)
            hits["all"].append(hit)
    return {kind: float(np.mean(values)) for kind, values in sorted(hits.items())}


# ---------------------------------------------------------------------------- few-shot

FEW_SHOT_EVAL = ("color", "shape", "size")
ATTRIBUTE_VALUES = {"color": set(sw.COLORS), "shape": set(sw.SHAPES), "size": set(sw.SIZES)}
# the formats measured: a seen key with ": ", and a key never read in training (with a
# separator also never read, half of the time)
HELD_OUT_FORMAT_KEYS = {"color": "Hue", "shape": "Form", "size": "Scale"}


def few_shot_tasks(n: int, seed: int, shots: tuple[int, ...] = (0, 1, 2, 3)):
    """k-shot lists on fresh one-object scenes of seen combinations: for each attribute of
    FEW_SHOT_EVAL, format (`seen`, `held_out`) and k, n lists whose query's value is missing
    from all k examples. Yields (attribute, format, k, example scenes, query scene, key,
    separator)."""
    rng = random.Random(f"few-shot-{seed}")
    for attribute in FEW_SHOT_EVAL:
        for fmt in ("seen", "held_out"):
            for k in shots:
                for _ in range(n):
                    if fmt == "seen":
                        key, separator = sw.FEW_SHOT_KEYS[attribute][0], ": "
                    else:
                        key = HELD_OUT_FORMAT_KEYS[attribute]
                        separator = rng.choice([": ", *sw.HELD_OUT_SEPARATORS])
                    query = sw.sample_scene(rng, 1)
                    value = sw.attribute(query, attribute)
                    examples = []
                    while len(examples) < k:
                        scene = sw.sample_scene(rng, 1)
                        if sw.attribute(scene, attribute) != value:
                            examples.append(scene)
                    yield attribute, fmt, k, examples, query, key, separator


def evaluate_few_shot(
    pipeline, n: int = 100, seed: int = 1234, perturbation: str = "clean", batch_size: int = 64,
    contexts: tuple[str, ...] = ("image", "described", "text"), caption_prompt: str = "Caption:",
    shots: tuple[int, ...] = (0, 1, 2, 3),
) -> dict[str, float]:  # fmt: skip
    """First-word accuracy of k-shot lists (`few_shot_tasks`), Frozen-style: each example an
    image and its "<key><separator><value>" line, then the query image and "<key><separator>".
    `few_shot_<format>_<k>shot` (mean over attributes), `few_shot_<attribute>_<format>_2shot`;
    `few_shot_described_*`: the same lists with each image followed by the model's own caption
    (`describe=True`); `few_shot_text_*`: each scene written as its true caption line instead
    of its image — the gaps to it are how well the prefix stands in for words.
    `few_shot_blind_<format>_<k>shot`: what a guesser that never looks at an image scores on
    the same lists, picking at random among the values the examples don't show (the query's
    value is never among them): the floor any of the above must beat to have read the image.
    `contexts`: which of the three to run (the text lists do not change with `perturbation`);
    `shots`: which k."""
    if "caption" not in getattr(pipeline, "tasks", {"caption"}):  # nothing to describe with
        contexts = tuple(c for c in contexts if c != "described")
    tasks = list(few_shot_tasks(n, seed, shots))
    by_k = defaultdict(list)  # lists of one k at a time: too long for the LM is per k
    for i, task in enumerate(tasks):
        by_k[task[2]].append(i)
    batches = [group[s : s + batch_size] for group in by_k.values()
               for s in range(0, len(group), batch_size)]  # fmt: skip
    hits: dict[str, list[float]] = defaultdict(list)
    for attribute, fmt, k, examples, _, _, _ in tasks:
        unshown = ATTRIBUTE_VALUES[attribute] - {sw.attribute(e, attribute) for e in examples}
        hits[f"few_shot_blind_{fmt}_{k}shot"].append(1 / len(unshown))
    for context in contexts:
        lists = []
        for attribute, _, _, examples, query, key, separator in tasks:
            parts = []
            for scene in [*examples, query]:
                if context != "text":
                    parts.append(perturb(sw.render(scene), perturbation))
                else:
                    parts.append(f"{caption_prompt} {sw.describe(scene)}\n")
                value = sw.attribute(scene, attribute) if scene is not query else ""
                parts.append(f"{key}{separator}{value}".rstrip() + ("\n" if value else ""))
            lists.append(parts)
        name = "few_shot" if context == "image" else f"few_shot_{context}"
        for chunk in batches:
            try:
                outputs = pipeline.continue_sequences(
                    [lists[i] for i in chunk], max_new_tokens=4, describe=context == "described"
                )
            except SequenceTooLong:  # longer than the LM reads (k too large for it): not measured
                log.warning("few-shot %s lists of %d shots are too long for this LM: not measured",
                            context, tasks[chunk[0]][2])  # fmt: skip
                continue
            for i, output in zip(chunk, outputs, strict=True):
                attribute, fmt, k, _, query, _, _ = tasks[i]
                words = output.strip().lower().split()
                hit = bool(words) and words[0] == sw.attribute(query, attribute)
                hits[f"{name}_{fmt}_{k}shot"].append(hit)
                if context != "text" and k == 2:
                    hits[f"{name}_{attribute}_{fmt}_2shot"].append(hit)
    return {measure: float(np.mean(values)) for measure, values in sorted(hits.items())}


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per measure, one column per perturbation, plus the target.

    A measure taken on some perturbations only shows "–" under the others.
    """
    kinds = list(dict.fromkeys(kind for scores in results.values() for kind in scores))
    lines = [
        "| measure | " + " | ".join(kinds) + " | target |",
        "|---|" + "---:|" * (len(kinds) + 1),
    ]
    for measure, scores in results.items():
        target = f"≥ {TARGETS[measure]:.0%}" if measure in TARGETS else ""
        target = f"≤ {CEILINGS[measure]:.0%}" if measure in CEILINGS else target
        cells = " | ".join(f"{scores[k]:.1%}" if k in scores else "–" for k in kinds)
        lines.append(f"| {measure} | {cells} | {target} |")
    return "\n".join(lines)
