"""The trainer: the method of the project in three stages, on any dataset.

1. `clip`   — a CLIP-style encoder trained contrastively on image-caption pairs (open_clip);
2. `lm`     — a GPT-2-architecture LM trained on text, with its own BPE tokenizer;
3. `prefix` — the mapper trained to make the *frozen* LM read its prefix as the image: encoder
              and LM get no gradient (checked at every step).

`accelerate` runs the same code on a CPU, a GPU or several; each stage shows progress, logs its
loss to `<out>/log.jsonl`, checkpoints every `--checkpoint-every` steps and resumes from there.
The result is a `save_pretrained` folder (`--bundle`) that `Pipeline.from_pretrained` loads.
"""

import importlib

# where each public name lives; loaded when first asked for (PEP 562), so that a dataset
# module can declare itself `vlm.training.data.TrainingData` without importing the trainer
_PUBLIC = {
    "MODEL_SIZES": "config", "STAGES": "config", "TrainConfig": "config",
    "Progress": "progress", "TrainEvent": "progress", "TrainingStopped": "progress",
    "TrainingData": "data", "check_parts": "run", "train": "run",
    "Stage": "loop", "run_stage": "loop",
}  # fmt: skip
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
