"""How familiar an image is to a model: a profile of its encoder's features of training images.

The profile is a probabilistic PCA of the image embeddings of training-distribution images
(the mean, the top `components` directions and their variances, one variance for the rest),
so an image's typicality is its Gaussian log-density there. Its `score` is the share of
held-out training-distribution images (the reference) that are less typical than it: about
uniform in [0, 1] on the training distribution, near 0 far from it. An image is `familiar`
when its score is at least `false_alarms` (1%: chosen on the reference, never on evaluation
scenes), so about that share of training-like images is flagged.

Measured for the bundled model in docs/familiarity.md (photos, other backgrounds, noise,
shapes outside the world; false alarms on seen and held-out combinations).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import InputError

PROFILE_NAME = "familiarity.safetensors"


@dataclasses.dataclass(frozen=True)
class Familiarity:
    """Whether an image looks like what the model was trained on. Both fields are None for a
    model without a profile (a hub preset): unknown, never guessed."""

    score: float | None  # in [0, 1]; higher = more like the training images
    familiar: bool | None  # score >= the profile's threshold

    @property
    def unfamiliar(self) -> bool:
        """Known to be unlike the training images (False when unknown)."""
        return self.familiar is False


UNKNOWN = Familiarity(None, None)


class FamiliarityProfile:
    """The profile: see the module docstring. `fit` builds one from embeddings; `scores` and
    `familiarity` read embeddings (`Encoder.encode_pixels`, not normalised)."""

    def __init__(self, mean, components, variances, residual, reference, false_alarms: float):
        self.mean, self.components = np.asarray(mean), np.asarray(components)
        self.variances, self.residual = np.asarray(variances), float(residual)
        self.reference = np.sort(np.asarray(reference))  # log-densities of the reference
        self.false_alarms = float(false_alarms)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        reference: np.ndarray,
        components: int = 16,
        false_alarms: float = 0.01,
    ) -> FamiliarityProfile:
        """A profile of `features` [N, D] (training images), its threshold placed on
        `reference` [M, D] (other training-distribution images)."""
        features = np.asarray(features, dtype=np.float64)
        mean = features.mean(0)
        centred = features - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        k = min(components, len(vt) - 1)
        variances = singular[:k] ** 2 / (len(features) - 1)
        rest = centred - centred @ vt[:k].T @ vt[:k]
        residual = max(float(rest.var(0).sum() / max(1, features.shape[1] - k)), 1e-12)
        profile = cls(mean, vt[:k], variances, residual, np.zeros(1), false_alarms)
        profile.reference = np.sort(profile.log_density(reference))
        return profile

    def log_density(self, features: np.ndarray) -> np.ndarray:
        """Each embedding's Gaussian log-density under the profile, up to a constant."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        inside = centred @ self.components.T
        rest = centred - inside @ self.components
        return -0.5 * ((inside**2 / self.variances).sum(1) + (rest**2).sum(1) / self.residual)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The share of the reference less typical than each embedding, in [0, 1]."""
        density = self.log_density(features)
        return np.searchsorted(self.reference, density, side="right") / len(self.reference)

    def familiarity(self, features: np.ndarray) -> list[Familiarity]:
        return [Familiarity(float(s), bool(s >= self.false_alarms)) for s in self.scores(features)]

    # ------------------------------------------------------------------ files

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / PROFILE_NAME
        tensors = {
            name: torch.from_numpy(np.ascontiguousarray(getattr(self, name), dtype=np.float32))
            for name in ("mean", "components", "variances", "reference")
        }
        meta = {"residual": repr(self.residual), "false_alarms": repr(self.false_alarms)}
        save_file(tensors, path, metadata={"familiarity": json.dumps(meta)})
        path.chmod(0o644)  # as every other file of the folder (package data, other users)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> FamiliarityProfile | None:
        """The profile saved in `folder`, or None when it has none."""
        path = Path(folder) / PROFILE_NAME
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["familiarity"])
        tensors = {k: v.double().numpy() for k, v in load_file(path).items()}
        return cls(**tensors, residual=float(meta["residual"]),
                   false_alarms=float(meta["false_alarms"]))  # fmt: skip


def _embed(encoder, images, batch_size: int = 128) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        pixels = encoder.pixels(images[start : start + batch_size]).to(encoder.device)
        out.append(encoder.encode_pixels(pixels).cpu().numpy())
    return np.concatenate(out)


def profile_from_data(encoder, dataset, n: int = 3000, seed: int = 0) -> FamiliarityProfile:
    """The profile of `encoder`'s features of the images `dataset` teaches the mapper from
    (its `prefix_data`: what the model learned to describe; not the CLIP stage's colourless
    views, which made an empty frame look familiar): `n` images to fit, a third as many
    others as the reference. ShapeWorld draws both from their own seeds (`seed` + 7001,
    + 7002: never an evaluation seed); files take the reference from their held-out part
    when they have one, else from the last quarter of their training images, which are then
    not fitted."""
    if dataset.from_files:  # the same images whatever the seed
        fit_items = dataset.clip_data(n, seed=seed + 7001)
        held = [e.load() for e in itertools.islice(dataset.val_examples(), n // 3)]
        images = [fit_items[i][0] for i in range(min(n, len(fit_items)))]
        if len(held) < 20:
            cut = max(1, len(images) * 3 // 4)
            images, held = images[:cut], images[cut:]
    else:
        fit_items = dataset.prefix_data(n, seed=seed + 7001)
        images = [fit_items[i][0] for i in range(len(fit_items))]
        reference = dataset.prefix_data(max(n // 3, 1), seed=seed + 7002)
        held = [reference[i][0] for i in range(len(reference))]
    if len(images) < 2 or not held:
        raise InputError("a familiarity profile needs at least 3 training images")
    return FamiliarityProfile.fit(_embed(encoder, images), _embed(encoder, held))
