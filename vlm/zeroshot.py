"""Zero-shot labels: a label set's class weights (its labels' text embeddings in the prompt
templates, open_clip's prompt ensemble), kept for the label sets asked for most recently."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import open_clip
import torch

from .device import autocast
from .encoder import Encoder


class ClassWeights:
    """Normalised class text embeddings per (labels, templates), built once and kept for the
    `size` label sets used most recently; safe to share between request threads.

    With `pooling="mean"` (open_clip's prompt ensemble) one averaged embedding per label,
    [D, C]; with "sum" one per label and template, [D, C * T]."""

    def __init__(self, encoder: Encoder, device: torch.device, pooling: str = "mean",
                 size: int = 16):  # fmt: skip
        self.encoder, self.device, self.pooling, self.size = encoder, device, pooling, size
        self._kept: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def __call__(self, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        key = (tuple(labels), tuple(templates))
        with self._lock:
            if key not in self._kept:
                self._keep(key, self._build(*key))
            self._kept.move_to_end(key)
            return self._kept[key]

    def put(self, labels: Sequence[str], templates: Sequence[str], weights: torch.Tensor):
        """Keep `weights` as the label set's (a benchmark's stand-in for building them)."""
        with self._lock:
            self._keep((tuple(labels), tuple(templates)), weights)

    def _keep(self, key: tuple, weights: torch.Tensor) -> None:
        self._kept[key] = weights.float()
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def _build(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        with autocast(self.device):
            if self.pooling == "sum":
                texts = [t.format(label) for label in labels for t in templates]
                return torch.cat([self.encoder.encode_text(texts[i : i + 512])
                                  for i in range(0, len(texts), 512)]).T  # fmt: skip
            return open_clip.build_zero_shot_classifier(
                self.encoder.model, self.encoder.tokenizer, labels, templates,
                num_classes_per_batch=max(1, 512 // len(templates)), device=self.device,
            )  # fmt: skip
