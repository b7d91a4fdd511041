"""How a task is said to the frozen LM after the visual prefix: the one place of the template."""

from __future__ import annotations

import re

# A question and its answer, Frozen/BLIP-2 style; the answer follows the cue ("Answer:").
QUESTION_TEMPLATE = "Question: {question} Answer:"


def question_prompt(question: str, template: str = QUESTION_TEMPLATE) -> str:
    """The text the LM reads before writing an answer."""
    return template.format(question=question)


def qa_text(question: str, answer: str, template: str = QUESTION_TEMPLATE) -> str:
    """A question and its answer as one training text: "Question: … Answer: yes"."""
    return f"{question_prompt(question, template)} {answer}"


def answer_cue(template: str = QUESTION_TEMPLATE) -> str:
    """The words a question template ends with, after which the answer comes ("Answer:")."""
    return template.split("{question}")[-1].strip()


# A video as the frozen LM reads it (SmolVLM2's layout): each sampled frame's prefix after its
# timestamp, then the task's prompt; clip narratives in the LM's text use the same lines.
VIDEO_PROMPT = "What happened:"
# Where a model reads frames as lines (`PipelineConfig.video_frame_lines`), the LM first writes
# each object's track after this (its cell in every line, then what it does), then what happened
TRACKS_PROMPT = "Tracks:"


# what a frame's prompt looks like at the start of a text ("Frame at 0:03:")
FRAME_PROMPT = re.compile(r"Frame at \d+:\d\d:")


def frame_prompt(seconds: float) -> str:
    """The text before a frame's prefix: "Frame at 0:03:" (minutes:seconds, rounded down)."""
    whole = int(seconds)
    return f"Frame at {whole // 60}:{whole % 60:02d}:"
