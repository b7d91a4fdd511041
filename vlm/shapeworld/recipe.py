"""ShapeWorld's training data for the three stages (`ShapeWorld`, a `TrainingData`).

A dataset gives: image-caption pairs for the contrastive CLIP stage (`clip_data`), text
documents for the LM stage (`texts`: scenes, k-shot lists and clip narratives), and images
with the texts the frozen LM must read after their prefix (`prefix_data`: a caption or
"Question: … Answer: …"), clips with what it must read after their frames (`video_data`),
held-out images for the model's calibration (`calibration_examples`), plus what a pipeline
trained on it should know (`pipeline_config`: prompts, label sets, tasks).
"""

from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..calibration import CalibrationClip, CalibrationExample
from ..prompts import QUESTION_TEMPLATE, TRACKS_PROMPT, VIDEO_PROMPT, frame_prompt, qa_text
from ..tasks import ALL_TASKS, IMAGE_TASKS
from ..training.data import TrainingData
from . import clips as moving
from . import world as sw

# The task is said in text, as for questions: after the prefix, "Caption:" asks for a caption
# and "Question: … Answer:" for an answer, so one frozen LM and one mapper do both.
CAPTION_PROMPT = "Caption:"


def _valid(scene: sw.Scene) -> bool:
    """Objects inside the image, clear of each other, left/right obvious (as sample_scene)."""
    placed: list[tuple[float, float, float]] = []
    for o in scene.objects:
        r = o.radius * sw.BOUND
        if not (r + sw.PAD <= o.x <= 1 - r - sw.PAD and r + sw.PAD <= o.y <= 1 - r - sw.PAD):
            return False
        if not sw.fits(o.x, o.y, r, placed):
            return False
        placed.append((o.x, o.y, r))
    return True


def _twin(scene: sw.Scene, rng: random.Random, colour: bool = True) -> sw.Scene:
    """A hard negative for `scene`: the same objects rearranged, recoloured or resized, so
    that the contrastive loss must learn binding and order, not just a bag of attributes.
    `colour=False`: for a colourless view, so the twin's colourless caption differs."""
    objects = list(scene.objects)
    for _ in range(20):
        kind = rng.random()
        new = [dataclasses.replace(o) for o in objects]
        if len(new) > 1 and kind < 0.4:  # swap positions of two objects (order changes)
            i, j = rng.sample(range(len(new)), 2)
            a, b = new[i], new[j]
            new[i] = dataclasses.replace(a, x=b.x, y=b.y)
            new[j] = dataclasses.replace(b, x=a.x, y=a.y)
        elif len(new) > 1 and kind < 0.6:  # swap colours of two objects (binding changes)
            i, j = rng.sample(range(len(new)), 2)
            new[i] = dataclasses.replace(objects[i], color=objects[j].color)
            new[j] = dataclasses.replace(objects[j], color=objects[i].color)
        else:  # change one attribute of one object
            i = rng.randrange(len(new))
            field = rng.choice(["color", "shape", "size"])
            values = {"color": list(sw.COLORS), "shape": list(sw.SHAPES), "size": list(sw.SIZES)}
            value = rng.choice([v for v in values[field] if v != getattr(new[i], field)])
            if field == "size" and value == "large":
                continue  # growing an object could make it overlap; pick another change
            new[i] = dataclasses.replace(new[i], **{field: value})
        twin = sw.Scene(tuple(new))
        names = {(o.color, o.shape) for o in twin.objects}
        if (
            _valid(twin)
            and sw.describe(twin, colour) != sw.describe(scene, colour)
            and not names & set(sw.HELD_OUT)
        ):
            return twin
    return sw.sample_scene(rng)


def prefix_texts(scene: sw.Scene, rng: random.Random) -> list[str]:
    """What the frozen LM may read after a scene's prefix, one picked at random each time: the
    canonical caption (as often as all the questions together) or one of its Q/A pairs, each
    asked in a random one of the *seen* forms (never a HELD_OUT_FORMS one)."""
    qa = [qa_text(q, a) for q, a in sw.questions(scene, rng, forms="seen")]
    return [f"{CAPTION_PROMPT} {sw.describe(scene)}"] * len(qa) + qa


# Empty frames ("nothing") added to the prefix stage's images where it trains frame lines, per
# image: a clip shows them before its only object appears or after it disappears (13% of
# training clips' frames a second), and without them the model wrote an object into every
# empty frame. 2% of the images is a tenth of the frame lines at a frame_line_share of 0.2.
EMPTY_FRAMES = 0.02


def with_frame_lines(texts: list[str], scene: sw.Scene, rng: random.Random,
                     share: float) -> list[str]:  # fmt: skip
    """A scene's texts and its frame line (`clips.describe_frame`: the caption with where each
    object is), each copy after a random second's timestamp, as many copies as make the
    frame line `share` of the texts picked (at least one; one where `share` is 1)."""
    copies = max(1, round(len(texts) * share / (1 - share))) if share < 1 else 1
    seconds = int(moving.SECONDS)
    line = moving.describe_frame(scene)
    return texts + [f"{frame_prompt(rng.randrange(seconds))} {line}" for _ in range(copies)]


def teacher_lines(scene: sw.Scene, texts: list[str]) -> dict[str, str]:
    """For each question among a scene's texts that is about one object (`sw.referents`), the
    line the text teacher reads before it: that object's caption alone, keyed by the question's
    prompt ("Question: … Answer:"). The frozen LM answers about a one-object caption without
    having to find the object among others, so the mapper is taught to show the LM the object
    the question names (other questions keep the scene's caption)."""
    head, _, cue = QUESTION_TEMPLATE.partition("{question}")
    lines = {}
    for text in texts:
        if not text.startswith(head) or cue not in text:
            continue  # a caption
        prompt = text[: text.rindex(cue) + len(cue)]
        objects = sw.referents(scene, prompt[len(head) : -len(cue)])
        if len(objects) == 1:
            lines[prompt] = f"{CAPTION_PROMPT} {sw.describe(sw.Scene(objects))}"
    return lines


class ImagePool(torch.utils.data.Dataset):
    """Rendered images kept in memory as uint8 tensors, each with its candidate texts.

    The trainer picks one of an item's texts at random each time it sees the item."""

    def __init__(
        self, images: torch.Tensor, texts: list[list[str]],
        teacher_lines: list[dict[str, str]] | None = None,
    ):  # fmt: skip
        self.images = images  # [N, H, W, 3] uint8
        self.texts = texts
        # per item, a question's prompt -> the line the text teacher reads before it
        self.teacher_lines = teacher_lines

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[Image.Image, list[str]]:
        return Image.fromarray(self.images[i].numpy()), self.texts[i]


class ClipPool:
    """Clips for the prefix stage: each clip's frames a second apart (uint8 [N, F, H, W, 3],
    at `times` seconds), with the (prompt, text) pairs the frozen LM may read after them
    ("What happened:" and its description, or a question and its answer), one picked at
    random each time."""

    def __init__(self, frames: torch.Tensor, times: tuple[float, ...],
                 texts: list[list[tuple[str, str]]]):  # fmt: skip
        self.frames, self.times, self.texts = frames, times, texts

    def __len__(self) -> int:
        return len(self.texts)

    def images(self) -> ImagePool:
        """Every frame of every clip, clip by clip, as an ImagePool (to encode them)."""
        flat = self.frames.flatten(0, 1)
        return ImagePool(flat, [[] for _ in range(len(flat))])


def clip_texts(clip: moving.Clip) -> list[tuple[str, str]]:
    """What the frozen LM may read after a clip's frames: its description (as often as all
    its questions together) or a question and its answer, each as (prompt, text)."""
    head, _, cue = QUESTION_TEMPLATE.partition("{question}")
    questions = [(f"{head}{q}{cue}", f" {a}") for q, a in moving.clip_questions(clip)]
    return [(VIDEO_PROMPT, f" {moving.describe_clip(clip)}")] * len(questions) + questions


def _augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """Light photometric noise (JPEG re-encoding, rescaling) so the model is robust to it."""
    roll = rng.random()
    if roll < 0.15:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(40, 90))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if roll < 0.25:
        side = rng.choice([32, 48, 96, 224])
        return image.resize((side, side), Image.BICUBIC).resize(image.size, Image.BICUBIC)
    return image


@dataclasses.dataclass
class ShapeWorld(TrainingData):
    """ShapeWorld training data in the real setting's regimes: the LM's text covers the whole
    language (every colour-shape combination, every question form, k-shot lists), while no
    image of the CLIP or prefix stage shows a HELD_OUT combination, and the prefix stage asks
    its questions only in the seen forms."""

    image_size: int = 64
    few_shot_share: float = 0.3  # of the LM's documents: k-shot lists (Frozen's few-shot)
    # Of the CLIP stage's scenes: colourless views (sw.GREYS) captioned without colour words,
    # so the encoder learns shapes apart from colours. Without them it read the shape of a
    # held-out combination as the seen shape of the same colour (experiments/held_out_probe.py).
    colourless_share: float = 0.4
    # Of the prefix stage's batches: two (image, text) items a row, so the frozen LM reads a
    # prefix after other text, as in a k-shot list (TrainConfig.prefix_context).
    prefix_context: float = 0.5
    # Weight of the prefix stage's text teacher (`TrainConfig.prefix_text_teacher`, where the
    # run does not set it): before a question about one object the teacher reads that object's
    # caption alone (`teacher_lines`), so the mapper, which reads the question, learns to show
    # the frozen LM the object asked about ("Questions about one object" in docs/shapeworld.md).
    prefix_text_teacher: float = 1.0
    # Video (off in the bundle's recipe until it reads clips well: docs/video-lab.md). Of the
    # LM's documents: clip narratives (`clips.clip_narrative`: each second's frame line, where
    # the objects are, each object's track, then what happened), any combination and any
    # motion, so the LM reads motion from frame lines (HELD_OUT_MOTIONS in text only, as
    # questions' HELD_OUT_FORMS).
    narrative_share: float = 0.0
    # Clips paired with their descriptions and questions in the prefix stage, per image of it
    # (1/15: 4,000 clips beside 60,000 images; 0: none), no HELD_OUT combination and no
    # HELD_OUT_MOTIONS; and the share of its batches that are clips.
    clips_per_image: float = 0.0
    clip_batch_share: float = 0.2
    # Of the texts the prefix stage picks for an image: its frame line after a second's
    # timestamp ("Frame at 0:02: a small red circle at x2 y3"), so the model writes each
    # sampled frame's line and reads what happened from the lines, as the LM learnt to from
    # narratives (`PipelineConfig.video_frame_lines`; 0: none).
    frame_line_share: float = 0.0

    def _pool(
        self, scenes: list[sw.Scene], texts: list[list[str]], rng, greys: list[int | None],
        teacher: list[dict[str, str]] | None = None,
    ) -> ImagePool:  # fmt: skip
        images = torch.stack([
            torch.from_numpy(np.array(_augment(sw.render(s, self.image_size, grey), rng)))
            for s, grey in tqdm(list(zip(scenes, greys, strict=True)), desc="rendering",
                                leave=False, mininterval=5)
        ])  # fmt: skip
        return ImagePool(images, texts, teacher)

    def clip_data(self, n: int, seed: int) -> ImagePool:
        """Image-caption pairs for contrastive training, in twins: each scene is followed by a
        hard negative of it, and the trainer keeps twins in the same batch. A share of the
        pairs are colourless views, captioned without colour words. Each pair's texts (one
        picked each time) are the canonical caption (3 of 5), a paraphrase and a partial
        caption that leaves attributes out (sw.partial_description): without it, a text that
        named less than colour and size ("the star") was off what the encoder learned."""
        rng = random.Random(f"clip-{seed}")
        scenes, greys = [], []
        while len(scenes) < n:
            scene = sw.sample_scene(rng)
            grey = rng.randint(*sw.GREYS) if rng.random() < self.colourless_share else None
            scenes += [scene, _twin(scene, rng, colour=grey is None)]
            greys += [grey, grey]
        texts = [
            [sw.describe(s, grey is None)] * 3
            + [sw.paraphrase(s, rng, grey is None), sw.partial_description(s, rng, grey is None)]
            for s, grey in zip(scenes, greys, strict=True)
        ]
        return self._pool(scenes[:n], texts[:n], rng, greys[:n])

    def texts(self, n: int, seed: int) -> list[str]:
        """Documents for the language model. Most describe one scene: its caption, a
        paraphrase and some Q/A lines in random order; lines of a document depend on each
        other, so the LM learns to use its context, which is where the visual prefix will be.
        The rest (`few_shot_share`) are k-shot lists (`sw.few_shot_document`). Scenes may hold
        any combination and questions come in every form: text is the whole language."""
        rng = random.Random(f"lm-{seed}")
        documents = []
        for _ in range(n):
            if self.narrative_share and rng.random() < self.narrative_share:
                clip = moving.sample_clip(rng, split="any")
                documents.append(moving.clip_narrative(clip, rng if rng.random() < 0.5 else None))
                continue
            if rng.random() < self.few_shot_share:
                documents.append(sw.few_shot_document(rng, CAPTION_PROMPT, split="any"))
                continue
            scene = sw.sample_scene(rng, split="any")
            pairs = sw.questions(scene, rng, forms="all", held_out_no=True)
            qa = [qa_text(q, a) for q, a in pairs]
            lines = [f"{CAPTION_PROMPT} {sw.describe(scene)}"]
            lines.append(f"{CAPTION_PROMPT} {sw.paraphrase(scene, rng)}")
            lines += rng.sample(qa, min(len(qa), rng.randint(1, 4)))
            rng.shuffle(lines)
            documents.append("\n".join(lines))
        return documents

    def selection_texts(self) -> list[str]:
        """Held-out documents for the LM stage's choice among candidates (`lm_candidates`):
        drawn as `texts` draws, from seed -1, which runs do not train on."""
        return self.texts(1000, seed=-1)

    def answer_cues(self) -> list[str]:
        """What comes before a k-shot list's values ("Colour:", "Tag ->") and a clip
        narrative's description ("What happened:"): the LM weighs the text after them as an
        answer (only the context predicts it)."""
        keys = [k for keys in sw.FEW_SHOT_KEYS.values() for k in keys]
        keys += [*sw.GENERIC_KEYS, *sw.MADE_UP_KEYS]
        separators = sw.SEPARATORS + sw.MADE_UP_SEPARATORS
        cues = [f"{key}{separator.rstrip()}" for key in keys for separator in separators]
        # a clip's tracks and description: what its frame lines tell
        return [*cues, TRACKS_PROMPT, VIDEO_PROMPT]

    def prefix_data(self, n: int, seed: int) -> ImagePool:
        """Images with what the frozen LM should read after their prefix: the canonical
        caption half of the time, else one of the scene's Q/A pairs (seen forms only), with
        the text teacher's line for each question about one object (`teacher_lines`); with
        `frame_line_share`, frame lines too (`with_frame_lines`), and empty frames."""
        rng = random.Random(f"prefix-{seed}")
        scenes = [sw.sample_scene(rng) for _ in range(n)]
        texts = [prefix_texts(scene, rng) for scene in scenes]
        teacher = [teacher_lines(s, t) for s, t in zip(scenes, texts, strict=True)]
        if self.frame_line_share:
            texts = [with_frame_lines(t, s, rng, self.frame_line_share)
                     for s, t in zip(scenes, texts, strict=True)]  # fmt: skip
            # and empty frames (an object yet to appear, or gone), whose line is "nothing"
            empty = sw.Scene(())
            count = round(n * EMPTY_FRAMES)
            scenes += [empty] * count
            texts += [with_frame_lines([], empty, rng, 1.0) for _ in range(count)]
            teacher += [{} for _ in range(count)]
        return self._pool(scenes, texts, rng, [None] * len(scenes), teacher)

    def _seconds(self, clip: moving.Clip, rng: random.Random) -> list[Image.Image]:
        """A clip's frames a second (as a video is sampled), rendered and noised as the prefix
        stage's images are."""
        return [_augment(sw.render(clip.scene(round(t * clip.fps)), self.image_size), rng)
                for t in range(int(clip.seconds))]  # fmt: skip

    def video_data(self, n: int, seed: int) -> ClipPool | None:
        """Clips of the training split (no HELD_OUT combination or motion), `clips_per_image`
        for each of the prefix stage's `n` images, a frame a second rendered and noised as
        its images are, with their texts."""
        count = round(n * self.clips_per_image)
        if not count:
            return None
        rng = random.Random(f"video-{seed}")
        clips = [moving.sample_clip(rng, split="train") for _ in range(count)]
        seconds = int(moving.SECONDS)
        frames = torch.stack([
            torch.stack([torch.from_numpy(np.array(f)) for f in self._seconds(clip, rng)])
            for clip in tqdm(clips, desc="rendering clips", leave=False, mininterval=5)
        ])  # fmt: skip
        return ClipPool(frames, tuple(float(t) for t in range(seconds)),
                        [clip_texts(clip) for clip in clips])  # fmt: skip

    def calibration_examples(self, n: int, seed: int) -> list[CalibrationExample]:
        """Held-out training-distribution scenes for a model's calibration (`vlm.calibration`):
        seen combinations only, rendered and noised as the prefix stage's images are, each
        with its caption and one question in a seen form, from a seed of their own (`seed` +
        7003: never an evaluation seed)."""
        rng = random.Random(f"calibration-{seed + 7003}")
        examples = []
        for _ in range(n):
            scene = sw.sample_scene(rng)
            image = _augment(sw.render(scene, self.image_size), rng)
            questions = sw.questions(scene, rng, forms="seen")
            asked = [rng.choice(questions)] if questions else []
            examples.append(CalibrationExample(image, [sw.describe(scene)], asked))
        return examples

    def calibration_clips(self, n: int, seed: int) -> list[CalibrationClip]:
        """Held-out clips of the training split for a model trained on videos: a frame a
        second, rendered and noised as the prefix stage's images are, with the clip's
        description and one of its questions, from a seed of their own (`seed` + 7013)."""
        rng = random.Random(f"calibration-clips-{seed + 7013}")
        clips = []
        for _ in range(n):
            clip = moving.sample_clip(rng, split="train")
            frames = self._seconds(clip, rng)
            asked = [rng.choice(moving.clip_questions(clip))]
            clips.append(CalibrationClip(frames, 1.0, moving.describe_clip(clip), asked))
        return clips

    @property
    def reads_video(self) -> bool:
        """Whether the prefix stage trains for clips (paired clips or frame lines)."""
        return bool(self.clips_per_image or self.frame_line_share)

    def pipeline_config(self) -> dict:
        """What a pipeline trained on this data should know (prompts, label sets)."""
        return dict(
            name="shapeworld",
            trained_on="synthetic coloured shapes on black",
            caption_prompt=CAPTION_PROMPT,
            tasks=sorted(ALL_TASKS if self.reads_video else IMAGE_TASKS),
            video_frame_lines=bool(self.frame_line_share),
            stop=["\n"],
            templates=["a small {}", "a large {}"],
            template_pooling="sum",
            label_sets={
                "ShapeWorld colour + shape": sw.labels(),
                "ShapeWorld shapes": list(sw.SHAPES),
                "ShapeWorld colours": list(sw.COLORS),
            },
        )


DATASETS = {"shapeworld": ShapeWorld}
