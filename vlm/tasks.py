"""What a model was trained to do, and the error for asking it something else.

A pipeline declares its tasks (`Pipeline.tasks`, saved in config.json): the ones its weights
were trained for. ClipCap's COCO GPT-2 was fine-tuned to write captions, so it cannot answer
questions or continue interleaved text, however plausible its output looks; BLIP-2 has no
contrastive text tower, so it cannot rank labels or texts against an image.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from .errors import ConfigError, InputError


class Case(NamedTuple):
    """One example of a task, as a tab shows it: its inputs (a row of gr.Examples), what its
    label says it shows, and the output the model should give (None: no single right one)."""

    row: list
    label: str
    expected: str | None


# task -> what it means, in the words an error message uses
TASKS: dict[str, str] = {
    "caption": "write captions",
    "answer": "answer questions about an image",
    "few_shot": "continue interleaved images and text (few-shot)",
    "classify": "rank labels against an image (zero-shot, CLIP's text tower)",
    "search": "search images by text or image (CLIP embeddings)",
    "explain": "show where a text matches an image (CLIP embeddings)",
    # what happens across a video's frames: a model trained on clip narratives; any model that
    # captions runs the video path, and without this task its text is marked a guess
    "video": "describe what happens in a video and answer questions about it (trained on clips)",
}
ALL_TASKS = frozenset(TASKS)
IMAGE_TASKS = ALL_TASKS - {"video"}  # what a model declares by default
CONTRASTIVE_TASKS = frozenset({"classify", "search", "explain"})
# a captioner with a CLIP encoder (ClipCap): captions, and its CLIP does the rest
CAPTION_TASKS = frozenset({"caption"}) | CONTRASTIVE_TASKS
# a frozen LM that reads a visual prefix but has no contrastive text tower (BLIP-2)
PREFIX_LM_TASKS = frozenset({"caption", "answer", "few_shot"})


def task_set(tasks: Iterable[str] | None) -> frozenset[str]:
    """A checked frozenset of task names; None means every image task (folders saved before
    tasks were declared)."""
    if tasks is None:
        return IMAGE_TASKS
    tasks = frozenset(tasks)
    if unknown := tasks - ALL_TASKS:
        raise ConfigError(f"unknown tasks {sorted(unknown)}; the tasks are {sorted(TASKS)}")
    return tasks


class UnsupportedTaskError(InputError):
    """A task the model was not trained for, e.g. questions to a captioning-only model."""

    def __init__(self, task: str, model: str, capable: Iterable[str] = ()):
        self.task, self.model, self.capable = task, model, list(capable)
        message = f"{model or 'this model'} was not trained to {TASKS.get(task, task)}"
        if self.capable:
            message += f"; models that can: {', '.join(self.capable)}"
        super().__init__(message)
