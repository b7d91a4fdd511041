"""What the trainer reads of a dataset: `TrainingData`, declared once.

Two kinds implement it: data rendered on demand (ShapeWorld: each stage draws as many fresh
examples as it asks for, from its own seed) and files on disk (`vlm.data.FileDataset`: the
same examples whatever the seed, with a held-out part). Every capability that only one kind
has is declared here with the value that means "none", so the trainer asks, never probes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from PIL import Image


class TrainingData:
    """The trainer's view of a dataset. Subclasses give the four required methods; the rest
    have defaults that mean the dataset does not offer them."""

    # whether the examples are files with a held-out part (`examples`, `val_examples`,
    # `bad`, `val_bad`), encoded through a feature cache; else rendered (`prefix_data`)
    from_files: bool = False
    # the recipe's defaults for a run that does not choose (TrainConfig's None): the text
    # teacher's weight with a frozen LM, and the share of prefix batches in rows of two
    prefix_text_teacher: float = 0.0
    prefix_context: float = 0.0
    # the share of prefix batches that are clips (`video_data`), where the data has them
    clip_batch_share: float = 0.0

    # ------------------------------------------------------------------ required

    def clip_data(self, n: int, seed: int) -> Sequence[tuple[Image.Image, list[str]]]:
        """(image, captions) pairs for the CLIP stage (and a familiarity profile). `n` and
        `seed`, here and below, say what rendered data draws; files give what they hold
        (the LM stage's texts: at most `n`)."""
        raise NotImplementedError

    def texts(self, n: int, seed: int) -> list[str]:
        """The LM stage's documents: `n` of them (files: all they hold, if fewer)."""
        raise NotImplementedError

    def calibration_examples(self, n: int, seed: int) -> list:
        """Held-out `vlm.calibration.CalibrationExample`s, to calibrate the trained model."""
        raise NotImplementedError

    def pipeline_config(self) -> dict:
        """What the trained pipeline's config takes from the data (prompts, stop strings,
        zero-shot templates, label sets, what its images show)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional

    def prefix_data(self, n: int, seed: int):
        """Rendered data: the prefix stage's pool (images, texts and teacher lines)."""
        raise NotImplementedError(f"{type(self).__name__} renders no prefix data")

    def video_data(self, n: int, seed: int):
        """Clips paired with what the frozen LM should read after their frames (a
        `vlm.shapeworld.recipe.ClipPool`), for a prefix stage of `n` images; None: the data
        has none."""
        return None

    def calibration_clips(self, n: int, seed: int) -> list:
        """Held-out `vlm.calibration.CalibrationClip`s, to calibrate what a model trained on
        videos says of them (none: [])."""
        return []

    def examples(self) -> Iterator:
        """Files: the training examples (`vlm.data.Example`)."""
        raise NotImplementedError(f"{type(self).__name__} has no example files")

    def val_examples(self) -> Iterator:
        """Files: the held-out examples."""
        raise NotImplementedError(f"{type(self).__name__} has no example files")

    def val_texts(self) -> list[str]:
        """Held-out text whose LM loss is logged while the LM stage trains (none: [])."""
        return []

    def selection_texts(self) -> list[str]:
        """Held-out documents to choose among LM candidates by, where `val_texts` has none."""
        return []

    def answer_cues(self) -> list[str]:
        """Exact text after which the LM stage weights the answer (k-shot keys), besides the
        question template's cue."""
        return []
