"""Confidence that means what it says: a model's raw probabilities turned into calibrated ones.

A frozen LM's probability for a word it wrote is how sure the LM was, not how often such words
are right: the bundled model names a held-out "green star" a "green cross" at 0.84. A model
folder's `calibration.json` holds what turns the LM's numbers into the chance of being right,
fitted on held-out training-distribution data by the trainer (`fit_calibration`):

- **answers**: Platt scaling of the answer's probability (a slope and a bias on its logit);
- **choices** (`answer(..., choices)`): a temperature over the choices' probabilities;
- **caption words**: two experts vote over each word's alternatives (the LM's likeliest words
  at that place): the LM, and the image encoder's match of the caption with each alternative
  in the word's place to the image. A word's share among its alternatives is proportional to
  `p_lm * p_encoder ** b`, with the encoder's weight b fitted by conditional maximum
  likelihood on reference captions (the LM's own probabilities are what cross-entropy on
  this data made them). A word the LM wrote but the encoder does not see in the image loses
  most of its confidence; a word without alternatives keeps the LM's probability. The
  word's confidence is then the mean of that over the image and a few copies of it shifted
  by a few pixels (`views`; `vlm.reading.shifted_views`): a word the LM wrote at a near tie
  on the image (a shape copied from the object before, a held-out combination bound wrong)
  is rarely written on the shifted copies, where a right word stays sure;
- **videos** (a model trained on them): Platt scaling of the chance that a video's
  description, or an answer about it, is right, from the LM's probability of all it wrote
  for it (its tracks and the text), fitted on held-out clips (`CalibrationClip`); the whole
  text's chance, since one wrong word makes a description wrong;
- **search**: the image-text similarity of matching and of non-matching pairs (quantiles),
  so a search score reads as a percentile of true matches, and one below the 95th percentile
  of non-matching pairs or the 5th of true matches as "no good match".

Calibration softens the LM's numbers but never sharpens them (a Platt slope of at most 1, a
temperature of at least 1): fitted on the training distribution, sharpening overstated the
confidence on held-out combinations, a shift the familiarity profile rightly does not flag
(docs/calibration.md). The Platt fit is also pulled toward the identity (a weak prior), so
data where the LM is never wrong leaves its numbers about as they were. A model without a
calibration (the hub presets) reports the LM's raw probabilities, labelled as such.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

CALIBRATION_NAME = "calibration.json"
ALTERNATIVES = 5  # a word's alternatives: the LM's likeliest first tokens there, at most this many
ALTERNATIVE_FLOOR = 1e-3  # ... each at least this probable
# The alternative of ending the text before a word (the LM's stop tokens there): a clause the
# LM was unsure to add ("… left of a small green star" twice) is checked against the text
# without it
END = ""
VIEWS = 9  # caption words: read on the image and this many - 1 shifted copies (a new fit's)
NO_MATCH_QUANTILE = 0.95  # a search score below this quantile of non-matching pairs: no good match
UNSURE = 0.5  # below this the page shows a word as unsure
VIDEO_CLIPS = 200  # held-out clips a model trained on videos is calibrated on
_EPS = 1e-6


def _logit(p: float) -> float:
    p = min(max(float(p), _EPS), 1 - _EPS)
    return math.log(p) - math.log1p(-p)


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


@dataclasses.dataclass(frozen=True)
class Platt:
    """p -> sigmoid(slope * logit(p) + bias); the identity by default."""

    slope: float = 1.0
    bias: float = 0.0

    def __call__(self, p: float) -> float:
        return _sigmoid(self.slope * _logit(p) + self.bias)

    @classmethod
    def fit(
        cls, probabilities: Sequence[float], right: Sequence[bool], prior: float = 1.0,
        max_slope: float = 1.0,
    ) -> Platt:  # fmt: skip
        """Maximum likelihood of `right` given `probabilities`, with a Gaussian prior of
        weight `prior` pulling (slope, bias) toward (1, 0); a slope above `max_slope` (one
        that would make the LM's numbers more extreme) is held at it and the bias fitted
        alone."""
        x = np.array([_logit(p) for p in probabilities])
        y = np.asarray(right, dtype=float)
        slope, bias = _newton(x, y, prior, np.array([1.0, 0.0]))
        if slope > max_slope:
            _, bias = _newton(x, y, prior, np.array([max_slope, 0.0]), fixed_slope=True)
            slope = max_slope
        return cls(float(slope), float(bias))


def _newton(x, y, prior: float, w: np.ndarray, fixed_slope: bool = False) -> np.ndarray:
    """Newton's method on logistic regression of y on (x, 1) with a Gaussian prior toward
    (1, 0); with `fixed_slope`, only the bias moves."""
    free = [1] if fixed_slope else [0, 1]
    for _ in range(50):  # the objective is convex
        z = w[0] * x + w[1]
        p = 1 / (1 + np.exp(-z))
        features = np.stack([x, np.ones_like(x)], 1)[:, free]
        gradient = features.T @ (p - y) + prior * (w - [1.0, 0.0])[free]
        hessian = (features * (p * (1 - p))[:, None]).T @ features + prior * np.eye(len(free))
        step = np.linalg.solve(hessian, gradient)
        w[free] = w[free] - step
        if np.abs(step).max() < 1e-9:
            break
    return w


@dataclasses.dataclass(frozen=True)
class Alternative:
    """A word the LM could have written in a word's place (the word itself first)."""

    word: str
    lm: float  # the LM's probability of its first token there
    encoder: float  # the image encoder's share for the caption with it in that place


@dataclasses.dataclass(frozen=True)
class WordReading:
    """How a model reads one word of a text after an image's prefix (`Pipeline.read_text`)."""

    word: str
    probability: float  # the LM's, of the whole word (the product of its tokens')
    alternatives: tuple[Alternative, ...] = ()  # the word itself first; empty: none checked


def combined(reading: WordReading, experts: tuple[float, float]) -> float:
    """The word's probability with its first token's share taken from both experts (the LM
    and the encoder) over its alternatives; the LM's own without alternatives."""
    alternatives = reading.alternatives
    if len(alternatives) < 2:
        return reading.probability
    a, b = experts
    scores = np.array([a * math.log(max(x.lm, _EPS)) + b * math.log(max(x.encoder, _EPS))
                       for x in alternatives])  # fmt: skip
    share = float(np.exp(scores[0] - np.logaddexp.reduce(scores)))
    return share * reading.probability / max(alternatives[0].lm, _EPS)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What turns a model's raw probabilities into calibrated ones (see the module)."""

    answers: Platt = Platt()
    experts: tuple[float, float] | None = None  # (a, b) of caption words; None: not calibrated
    choice_temperature: float = 1.0
    matches: tuple[float, ...] = ()  # quantiles of matching pairs' cosine similarity
    mismatches: tuple[float, ...] = ()  # ... and of non-matching pairs'
    fitted_on: str = ""
    views: int = 1  # caption words: the mean over the image and views - 1 shifted copies
    descriptions: Platt | None = None  # videos' descriptions (None: not calibrated)
    video_answers: Platt | None = None  # answers about videos (None: not calibrated)

    @property
    def calibrates_words(self) -> bool:
        return self.experts is not None

    def word(self, reading: WordReading) -> float:
        """The chance that a word the model wrote is right (the LM's probability when the
        calibration has no word experts)."""
        return combined(reading, self.experts) if self.experts else reading.probability

    def words(self, readings: Sequence[WordReading]) -> list[float]:
        """`word` for each word of a text, where (with word experts) a word is right only
        when what it depends on is: a word the LM had no alternative for (it follows from
        the words before it: "of" after "left") takes at most the confidence of the last
        word before it that had alternatives, and no word is surer than the text's going on
        where it could have ended (an END alternative) before it: an object the image does
        not show is wrong in every word."""
        shown, called, going_on = [], None, 1.0
        for reading in readings:
            confidence = self.word(reading)
            if self.experts:
                if len(reading.alternatives) < 2 and called is not None:
                    confidence = min(confidence, called)
                elif len(reading.alternatives) >= 2:
                    called = confidence
                if any(a.word == END for a in reading.alternatives[1:]):
                    going_on = min(going_on, confidence)
                confidence = min(confidence, going_on)
            shown.append(confidence)
        return shown

    def words_over_views(self, views: Sequence[Sequence[WordReading]]) -> list[float]:
        """`words` of one text read on each view of its image (the image first, then its
        shifted copies), averaged over the views."""
        return np.mean([self.words(readings) for readings in views], axis=0).tolist()

    def answer(self, probability: float) -> float:
        """The chance that an answer the LM gave with this probability is right."""
        return self.answers(probability)

    def choices(self, probabilities: dict[str, float]) -> dict[str, float]:
        """Choice probabilities (summing to 1) sharpened or softened by the temperature."""
        logs = np.log(np.maximum(np.array(list(probabilities.values())), 1e-30))
        scaled = logs / self.choice_temperature
        shares = np.exp(scaled - np.logaddexp.reduce(scaled))
        return dict(zip(probabilities, shares.tolist(), strict=True))

    def match(self, similarity: float) -> tuple[float, bool] | None:
        """(the share of true image-text matches less similar than this, whether it is a good
        match) for a cosine similarity; None if unknown. A good match beats NO_MATCH_QUANTILE
        of the non-matching pairs and is not in the lowest 1 - NO_MATCH_QUANTILE of the
        true matches (text from outside the world, "a cat", scores above non-matching
        captions of the world, but far below its true matches)."""
        if not self.matches or not self.mismatches:
            return None
        share = float(np.interp(similarity, self.matches, np.linspace(0, 1, len(self.matches))))
        threshold = max(float(np.quantile(self.mismatches, NO_MATCH_QUANTILE)),
                        float(np.quantile(self.matches, 1 - NO_MATCH_QUANTILE)))  # fmt: skip
        return share, similarity >= threshold

    # ------------------------------------------------------------------ files

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_NAME
        data = dataclasses.asdict(self)
        path.write_text(json.dumps(data, indent=1) + "\n")
        path.chmod(0o644)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Calibration | None:
        """The calibration saved in `folder`, or None when it has none."""
        path = Path(folder) / CALIBRATION_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(
            answers=Platt(**data["answers"]),
            experts=tuple(data["experts"]) if data.get("experts") else None,
            choice_temperature=float(data.get("choice_temperature", 1.0)),
            matches=tuple(data.get("matches", ())),
            mismatches=tuple(data.get("mismatches", ())),
            fitted_on=data.get("fitted_on", ""),
            views=int(data.get("views", 1)),
            descriptions=Platt(**data["descriptions"]) if data.get("descriptions") else None,
            video_answers=Platt(**data["video_answers"]) if data.get("video_answers") else None,
        )


# ---------------------------------------------------------------------------- fitting


@dataclasses.dataclass
class CalibrationExample:
    """A held-out training-distribution image with its reference captions and Q/A pairs."""

    image: Image.Image
    captions: list[str]
    questions: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CalibrationClip:
    """A held-out training-distribution clip: its frames (`fps` a second), its description
    and Q/A pairs."""

    frames: list[Image.Image]
    fps: float
    description: str
    questions: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def normalize(text: str) -> str:
    """Lower case, no punctuation at the ends, single spaces: how answers are compared."""
    return " ".join(re.sub(r"[^\w\s'-]", " ", text.lower()).split())


def right_words(written: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Which written words the best-matching reference has in the same order (difflib's
    matching blocks over normalised words)."""
    words = [normalize(w) for w in written]
    best: list[bool] = [False] * len(words)
    for reference in references:
        matcher = difflib.SequenceMatcher(a=words, b=normalize(reference).split(), autojunk=False)
        hits = [False] * len(words)
        for block in matcher.get_matching_blocks():
            hits[block.a : block.a + block.size] = [True] * block.size
        if sum(hits) > sum(best):
            best = hits
    return best


def fit_experts(readings: Sequence[WordReading]) -> tuple[float, float]:
    """(1, b): the LM's probabilities as they are (trained by cross-entropy on this
    distribution) and the encoder's weight b that makes each reference word (its reading's
    first alternative) likeliest among its alternatives, over every word that has any. With
    both weights free the fit runs off to infinity: on training-distribution text the two
    experts together rank the reference first almost always."""
    sets = [r.alternatives for r in readings if len(r.alternatives) > 1]
    if not sets:
        return (1.0, 0.0)
    lm = [np.log(np.maximum([x.lm for x in s], _EPS)) for s in sets]
    encoder = [np.log(np.maximum([x.encoder for x in s], _EPS)) for s in sets]

    def loss(b: float) -> float:
        scores = [words + b * seen for words, seen in zip(lm, encoder, strict=True)]
        return float(sum(np.logaddexp.reduce(score) - score[0] for score in scores))

    low, high = 0.0, 10.0  # golden-section search: the loss is convex in b
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if loss(left) <= loss(right):
            high = right
        else:
            low = left
    return 1.0, round((low + high) / 2, 4)


def _quantiles(values: Sequence[float], n: int = 101) -> tuple[float, ...]:
    return tuple(float(v) for v in np.quantile(np.asarray(values, dtype=float),
                                               np.linspace(0, 1, n)))  # fmt: skip


def fit_calibration(
    pipeline, examples: Sequence[CalibrationExample], seed: int = 0, batch_size: int = 32,
    fitted_on: str = "",
) -> Calibration:  # fmt: skip
    """A calibration fitted on `examples` (held-out training-distribution data, never an
    evaluation set): see the module for what each part is fitted on."""
    examples = [e for e in examples if e.captions or e.questions]
    if not examples:
        raise InputError("a calibration needs held-out images with captions or questions")
    tasks = pipeline.tasks
    rng = random.Random(f"calibration-{seed}")
    calibration = Calibration(fitted_on=fitted_on)
    captioned = [e for e in examples if e.captions] if "caption" in tasks else []
    if captioned and pipeline.can_check_words:
        images, references = [e.image for e in captioned], [e.captions[0] for e in captioned]
        taught = pipeline.read_text(images, references, batch_size=batch_size)
        experts = fit_experts([r for words in taught for r in words])
        calibration = dataclasses.replace(calibration, experts=experts, views=VIEWS)
    asked = [(e.image, q, a) for e in examples for q, a in e.questions] if "answer" in tasks else []
    if asked:
        answers = []
        for start in range(0, len(asked), batch_size):
            chunk = asked[start : start + batch_size]
            answers += pipeline.answer([i for i, _, _ in chunk], [q for _, q, _ in chunk],
                                       return_words=True, calibration=None)  # fmt: skip
        raw = [math.prod(p for _, p in g.raw_words) if g.raw_words else _EPS for g in answers]
        references = [normalize(a) for _, _, a in asked]
        right = [normalize(g.text) == a for g, a in zip(answers, references, strict=True)]
        calibration = dataclasses.replace(calibration, answers=Platt.fit(raw, right))
        calibration = dataclasses.replace(
            calibration, choice_temperature=_fit_temperature(pipeline, asked, rng)
        )
    if "search" in tasks and captioned:
        calibration = dataclasses.replace(calibration, **_match_quantiles(pipeline, captioned))
    return calibration


def fit_video_calibration(pipeline, clips: Sequence[CalibrationClip],
                          calibration: Calibration) -> Calibration:  # fmt: skip
    """`calibration` with its video parts fitted on held-out `clips`: each clip described and
    each of its questions answered (`Pipeline.describe_video` / `answer_video`), the LM's
    probability of what it wrote (`VideoText.probability`) against exact rightness."""
    if not clips or "video" not in pipeline.tasks:
        return calibration
    written, right = [], []
    for clip in clips:
        text = pipeline.describe_video(clip.frames, frame_rate=clip.fps, timeline=False)
        written.append(text.probability)
        right.append(normalize(text.text) == normalize(clip.description))
    fitted = dataclasses.replace(calibration, descriptions=Platt.fit(written, right))
    asked = [(clip, q, a) for clip in clips for q, a in clip.questions]
    if asked and "answer" in pipeline.tasks:
        answers = [pipeline.answer_video(c.frames, q, frame_rate=c.fps) for c, q, _ in asked]
        right = [normalize(g.text) == normalize(a)
                 for g, (_, _, a) in zip(answers, asked, strict=True)]  # fmt: skip
        platt = Platt.fit([g.probability for g in answers], right)
        fitted = dataclasses.replace(fitted, video_answers=platt)
    return fitted


def calibration_from_data(pipeline, dataset, n: int = 2000, seed: int = 0) -> Calibration | None:
    """The calibration of `pipeline` fitted on `dataset`'s held-out examples for it
    (`calibration_examples`: ShapeWorld draws fresh scenes of seen combinations from a seed of
    their own; files give their held-out part), or None when it has none."""
    examples = dataset.calibration_examples(n, seed)
    if not examples:
        return None
    clips = dataset.calibration_clips(VIDEO_CLIPS, seed) if "video" in pipeline.tasks else []
    what = f"{len(examples)} held-out {type(dataset).__name__} examples (seed {seed})"
    if clips:
        what += f" and {len(clips)} held-out clips"
    calibration = fit_calibration(pipeline, examples, seed=seed, fitted_on=what)
    return fit_video_calibration(pipeline, clips, calibration)


def _fit_temperature(pipeline, asked, rng: random.Random, most: int = 200) -> float:
    """The temperature (at least 1) that makes choice probabilities most likely on held-out
    questions, each with its reference answer among up to 4 other reference answers."""
    vocabulary = sorted({normalize(a) for _, _, a in asked})
    if len(vocabulary) < 2:
        return 1.0
    picked = rng.sample(asked, min(most, len(asked)))
    logs = []
    for image, question, answer in picked:
        others = [v for v in vocabulary if v != normalize(answer)]
        choices = [normalize(answer), *rng.sample(others, min(4, len(others)))]
        _, scores = pipeline.answer([image], [question], choices, return_scores=True,
                                    calibration=None)[0]  # fmt: skip
        logs.append(np.log(np.maximum(np.array([scores[c] for c in choices]), 1e-30)))
    best, best_nll = 1.0, math.inf
    for temperature in np.exp(np.linspace(0, math.log(50), 121)):
        nll = 0.0
        for values in logs:
            scaled = values / temperature
            nll -= scaled[0] - np.logaddexp.reduce(scaled)
        if nll < best_nll:
            best, best_nll = float(temperature), nll
    return best


def _match_quantiles(pipeline, examples: Sequence[CalibrationExample]) -> dict:
    """Quantiles of the cosine similarity of each image with its own caption and with
    another image's (the next one's, so every pair differs)."""
    images = pipeline.encoder.encode_images([e.image for e in examples], normalize=True)
    texts = pipeline.encoder.encode_text([e.captions[0] for e in examples])
    similarity = (images @ texts.T).cpu().numpy()
    n = len(examples)
    captions = [normalize(e.captions[0]) for e in examples]
    matching = [similarity[i, i] for i in range(n)]
    others = [similarity[i, (i + 1) % n] for i in range(n) if captions[i] != captions[(i + 1) % n]]
    if not others:
        return {}
    return {"matches": _quantiles(matching), "mismatches": _quantiles(others)}


def expected_calibration_error(
    probabilities: Sequence[float], right: Sequence[bool], bins: int = 10
) -> float:
    """ECE: the gap between mean confidence and accuracy in equal-width bins, weighted by
    each bin's share of the predictions."""
    p, y = np.asarray(probabilities, dtype=float), np.asarray(right, dtype=float)
    if not len(p):
        return float("nan")
    index = np.clip((p * bins).astype(int), 0, bins - 1)
    return float(sum(abs(p[index == b].mean() - y[index == b].mean()) * (index == b).mean()
                     for b in range(bins) if (index == b).any()))  # fmt: skip
