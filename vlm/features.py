"""A disk cache of frozen-encoder features, keyed by the content hash of each image.

The prefix stage only ever reads the encoder's output, and the encoder is frozen, so every
image is encoded once and reused by every later epoch and run (ClipCap precomputes its
features the same way). A cache folder holds one subfolder per encoder *fingerprint* (its
weights, preprocessing and feature kind), each with safetensors shards and, next to each
shard, a JSON list of the image hashes of its rows. A shard's list is written last, after
the shard is complete, so an interrupted write leaves no half-shard behind, and several
processes can add shards at once without a shared index to fight over.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import Example
from .device import available_cores
from .images import DecodedImages, collate_decoded


def encode_in_memory(pipeline, images, batch_size: int = 256) -> torch.Tensor:
    """What the mapper reads (frozen-encoder features) for every (image, texts) item of an
    in-memory dataset, computed once and kept in fp16: the rendered datasets' counterpart of
    the disk cache below."""
    features = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", leave=False):
        batch = [images[i][0] for i in range(start, min(start + batch_size, len(images)))]
        features.append(pipeline.image_features(batch).half().cpu())
    return torch.cat(features)


def fingerprint(pipeline) -> str:
    """A short hash of everything that decides what `pipeline.image_features` returns."""
    digest = hashlib.sha256()
    encoder = pipeline.encoder
    kind = pipeline.mapper.input, pipeline.mapper.config.get("num_tokens")
    # not the encoder's name or path (the same weights may live anywhere): what it computes
    config = getattr(encoder.model, "model_cfg", None)
    digest.update(json.dumps([config, encoder.image_side, kind], default=str).encode())
    # the preprocessing as written out; a built encoder keeps its mean and std as tuples, the
    # same encoder loaded from its folder as lists: the same numbers, the same features
    digest.update(repr(encoder.preprocess).translate(str.maketrans("[]", "()")).encode())
    for name, tensor in sorted(encoder.model.visual.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


class FeatureCache:
    """Features of images under `root/<fingerprint>/`, read back by content hash; with
    `root=None` they are kept in memory instead (for one run)."""

    def __init__(self, root: str | os.PathLike | None, pipeline, shard_size: int = 4096):
        self.pipeline = pipeline
        self.dir = Path(root) / fingerprint(pipeline) if root is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.rows: dict[str, tuple[Path, int] | torch.Tensor] = {}
        self._shards: dict[Path, object] = {}  # open (memory-mapped) shards, read by row
        self.encoded = 0  # images this object encoded (not found in the cache)
        self.refresh()

    def refresh(self) -> None:
        """Read the lists of every complete shard (other processes' shards included)."""
        if self.dir is None:
            return
        for listing in sorted(self.dir.glob("shard-*.json")):
            shard = listing.with_suffix(".safetensors")
            for row, key in enumerate(json.loads(listing.read_text())):
                self.rows.setdefault(key, (shard, row))

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """The features of these hashes, stacked [len(keys), …] as stored (fp16)."""
        out = []
        for key in keys:
            found = self.rows[key]
            if isinstance(found, torch.Tensor):
                out.append(found[None])
                continue
            shard, row = found
            if shard not in self._shards:  # opened once, not at every training step
                self._shards[shard] = safe_open(str(shard), framework="pt").get_slice("features")
            out.append(self._shards[shard][row : row + 1])
        return torch.cat(out)

    def add(
        self,
        examples: Iterable[Example],
        batch_size: int = 64,
        num_workers: int | None = None,
        rank: int = 0,
        world: int = 1,
        chunk: int = 4096,
    ) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
        """Make sure every example's image is cached, streaming over `examples` in chunks.

        Returns `(records, failed)`: (content hash, texts) of every example, and (key,
        reason) of the images that could not be read. With several processes, each encodes
        the images of every `world`-th example from `rank` (call `refresh` after all are
        done to see the others' shards)."""
        records, failed, todo = [], [], {}
        for i, example in enumerate(tqdm(examples, desc="hashing", leave=False, mininterval=5)):
            key = example.content_hash()
            records.append((key, example.texts()))
            if i % world == rank and key not in self.rows and key not in todo:
                todo[key] = example
            if len(todo) >= chunk:
                failed += self._encode(todo, batch_size, num_workers)
                todo = {}
        failed += self._encode(todo, batch_size, num_workers)
        return records, failed

    def _encode(self, todo: dict[str, Example], batch_size: int, num_workers: int | None):
        if not todo:
            return []
        keys, pending = list(todo), list(todo.values())
        # decoding is the bottleneck in front of a GPU: a worker per core, one left for the rest
        workers = min(16, max(1, available_cores() - 1)) if num_workers is None else num_workers
        encoder = self.pipeline.encoder
        images = DecodedImages([e.image for e in pending], encoder.preprocess, encoder.image_side)
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=workers,
                                             collate_fn=collate_decoded)  # fmt: skip
        failed, done_keys, done_features = [], [], []
        for indices, pixels, errors in tqdm(loader, desc="features", leave=False, mininterval=5):
            failed += [(pending[i].source or pending[i].key, why) for i, why in errors]
            if indices:
                done_features.append(self.pipeline.features_from_pixels(pixels).half().cpu())
                done_keys += [keys[i] for i in indices]
        if done_keys:
            self._store(done_keys, torch.cat(done_features))
        return failed

    def _store(self, keys: list[str], features: torch.Tensor) -> None:
        self.encoded += len(keys)
        if self.dir is None:
            self.rows.update(zip(keys, features, strict=True))
            return
        for start in range(0, len(keys), self.shard_size):
            part = slice(start, start + self.shard_size)
            name = f"shard-{uuid.uuid4().hex[:12]}"
            shard, listing = self.dir / f"{name}.safetensors", self.dir / f"{name}.json"
            save_file({"features": features[part].contiguous()}, f"{shard}.tmp")
            os.replace(f"{shard}.tmp", shard)
            listing.with_suffix(".tmp").write_text(json.dumps(keys[part]))
            os.replace(listing.with_suffix(".tmp"), listing)  # the shard is complete now
            for row, key in enumerate(keys[part]):
                self.rows[key] = (shard, row)
