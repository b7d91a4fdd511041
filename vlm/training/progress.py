"""How a run reports what it does (events) and learns it should stop."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class TrainEvent:
    """What a training run reports as it goes (`Progress.on_event`), in this order: "stage"
    (a stage starts: its `steps`), then "step" (every 10 steps: `loss`), "validation"
    (`val_loss`), "samples" (held-out images captioned by the prefix stage's current mapper:
    `samples`, reference -> caption) and "checkpoint" (`path`) as they come; at the end "done"
    (`path`: the saved model folder) or "stopped" (stopped when asked; the stage's checkpoint
    saved, from which `resume` goes on)."""

    kind: str
    stage: str = ""
    step: int = 0  # steps done in this stage
    steps: int = 0  # the stage's steps
    loss: float | None = None
    val_loss: float | None = None
    samples: dict[str, str] | None = None
    path: str | None = None
    scores: dict | None = None  # "done": the held-out evaluation's (file data)
    seconds: float = 0.0  # since the run started


class TrainingStopped(Exception):
    """Raised inside a run when its `Progress.stop` is set; `train` returns None."""


@dataclasses.dataclass
class Progress:
    """Where a run reports (`on_event`, called in the training thread) and how it is told to
    stop (`stop`, checked before every step). `sample_every`: the prefix stage captions a few
    held-out images this often (0: never). The CLI shows tqdm bars; the page follows a job."""

    on_event: Callable[[TrainEvent], None] | None = None
    stop: threading.Event | None = None
    sample_every: int = 0
    samples: Callable[[], dict[str, str]] | None = None  # set by the prefix stage
    started: float = dataclasses.field(default_factory=time.time)

    def emit(self, kind: str, **fields) -> None:
        if self.on_event is not None:
            self.on_event(TrainEvent(kind, seconds=time.time() - self.started, **fields))

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


# ---------------------------------------------------------------------------- the stage loop
