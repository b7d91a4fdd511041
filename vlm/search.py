"""Text-image search: normalised CLIP image embeddings in a FAISS inner-product index.

An index folder holds `manifest.json`, which names the FAISS file and the items file of the
current version. Saving writes new versions of both (fsynced), then atomically replaces the
manifest, so a crash at any moment leaves the previous index loadable.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from .device import available_cores
from .encoder import Encoder
from .errors import InputError
from .images import (
    DecodedImages,
    ImageInput,
    PixelBudget,
    collate_decoded,
    list_images,
    load_image,
)
from .uploads import safe_name

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class IndexLoadError(InputError):
    """An index folder that cannot be read (missing, damaged or from another model)."""


@dataclasses.dataclass
class Hit:
    """One search result: which item, its position in the index and its cosine score."""

    item: str
    position: int
    score: float


def original_name(item: str) -> str:
    """The name an item was added under: a copy's file name less the content hash that
    `add_copies` put in front of it (`<16 hex digits>-<name>`)."""
    name = Path(item).name
    return name[17:] if re.fullmatch(r"[0-9a-f]{16}-.+", name) else name


def _content_hash(source: ImageInput) -> str:
    if isinstance(source, Image.Image):
        data = source.tobytes() + repr((source.mode, source.size)).encode()
    elif isinstance(source, bytes):
        data = source
    else:
        data = Path(source).read_bytes()
    return hashlib.sha256(data).hexdigest()


def _decode_threads() -> int:
    """Decode threads beside a CPU encoder: decoding is ~5% of its work, a couple keep ahead."""
    return min(4, available_cores())


def _one_torch_thread() -> None:
    """Decode-thread initializer: this thread's torch ops (the preprocess's tensor ops) run
    on one OpenMP thread, as in a DataLoader worker, instead of starting a second OpenMP team
    beside the encoder's on the same cores. Only this thread's setting changes (OpenMP's
    nthreads is per thread; torch.set_num_threads would change the whole process's)."""
    torch.get_num_threads()  # torch sets each thread's OpenMP threads lazily: first
    with contextlib.suppress(AttributeError, OSError, TypeError):  # no OpenMP loaded globally
        ctypes.CDLL(None).omp_set_num_threads(1)


def _threaded_batches(
    images: DecodedImages, batch_size: int, threads: int
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Batches of `images` in order, decoded ahead by a thread pool while the caller encodes.

    Threads, not DataLoader worker processes: Pillow's decoding and resizing and torch's ops
    release the GIL, and a thread costs nothing to start, whereas each worker process is a
    fork of the whole model-holding process, paid again on every call (a visible share of a
    small folder's time) and its first batch keeps the encoder waiting. Images are decoded
    one per task, first batch first, so the first batch is ready after 1/threads of its
    decoding time; at most two batches are decoded ahead of the one being encoded."""
    n = len(images)
    with ThreadPoolExecutor(threads, "vlm-decode", _one_torch_thread) as pool:
        pending: collections.deque = collections.deque()
        submitted = 0

        def fill(limit: int) -> None:
            nonlocal submitted
            while submitted < min(n, limit):
                pending.append(pool.submit(images.__getitem__, submitted))
                submitted += 1

        try:
            for start in range(0, n, batch_size):
                fill(start + 3 * batch_size)
                count = min(batch_size, n - start)
                yield collate_decoded([pending.popleft().result() for _ in range(count)])
        finally:  # the caller stopped early (or failed): drop what has not started
            for future in pending:
                future.cancel()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SearchIndex:
    """Images embedded by `encoder`, searchable by text or by image.

    `factory` is a FAISS index_factory string: "Flat" (exact) by default. For large
    collections an approximate one, with its search parameter in `search_params` (recall
    rises with it; FAISS's defaults, nprobe=1 and efSearch=16, are often too low): e.g.
    "IVF1024,Flat" (about sqrt(N) lists) with "nprobe=16", or "HNSW32" with "efSearch=128".
    Over 1M vectors on 2 CPU cores, "IVF512,Flat" answers in 0.3 ms at nprobe=1 and 16 ms
    at nprobe=64; a flat scan takes 150 ms (bench/search.py).

    Images are decoded and preprocessed ahead of the encoder: by default in a few threads of
    this process beside a CPU encoder, and in DataLoader worker processes for a folder's
    worth of files beside a GPU one; `num_workers=0` decodes in line, `num_workers > 0` uses
    that many worker processes."""

    def __init__(
        self,
        encoder: Encoder,
        factory: str = "Flat",
        search_params: str = "",
        num_workers: int | None = None,
    ):
        self.encoder = encoder
        self.factory = factory
        self.search_params = search_params  # e.g. "nprobe=64" (IVF) or "efSearch=128" (HNSW)
        self.num_workers = num_workers
        self.index = faiss.index_factory(encoder.embed_dim, factory, faiss.METRIC_INNER_PRODUCT)
        self._apply_search_params()
        self.items: list[str] = []  # what each vector is: a file path or a given name
        self.hashes: list[str] = []  # content hashes, to skip duplicates
        self.skipped: list[tuple[str, str]] = []  # (item, reason) from the last add()

    def __len__(self) -> int:
        return len(self.items)

    def copy(self) -> SearchIndex:
        """An independent copy (its own FAISS index, items and hashes): what is added to it
        afterwards stays out of this one."""
        clone = type(self)(self.encoder, self.factory, self.search_params, self.num_workers)
        clone.index = faiss.clone_index(self.index)
        clone.items, clone.hashes = list(self.items), list(self.hashes)
        clone._apply_search_params()
        return clone

    def add(
        self,
        images_or_paths: Iterable[ImageInput] | str | os.PathLike,
        batch_size: int = 32,
        names: Sequence[str] | None = None,
        progress=None,
        budget: PixelBudget | None = None,
    ) -> int:
        """Embed and add images (PIL images, paths, folders). Unreadable files, duplicates and
        files past the `budget` of decoded pixels are skipped and listed in `self.skipped`.
        Returns how many were added."""
        if isinstance(images_or_paths, (str, os.PathLike)):
            images_or_paths = [images_or_paths]
        sources = list(images_or_paths)
        if all(isinstance(s, (str, os.PathLike)) for s in sources):
            sources = list_images(sources)
        labels = list(names) if names is not None else [
            str(s) if isinstance(s, (str, os.PathLike)) else f"image-{len(self) + i}"
            for i, s in enumerate(sources)
        ]  # fmt: skip
        self.skipped = []
        seen = set(self.hashes)
        unique, unique_labels, unique_hashes = [], [], []
        for source, label in zip(sources, labels, strict=True):
            try:
                digest = _content_hash(source)
            except OSError as error:
                self.skipped.append((label, str(error)))
                continue
            if digest in seen:
                self.skipped.append((label, "duplicate of an image already in the index"))
                continue
            seen.add(digest)
            unique.append(source)
            unique_labels.append(label)
            unique_hashes.append(digest)
        images = DecodedImages(unique, self.encoder.preprocess, self.encoder.image_side, budget)
        workers = self.num_workers
        files = all(isinstance(s, (str, os.PathLike)) for s in unique)
        if workers is None and self.encoder.device.type != "cpu" and files and budget is None:
            # a GPU encoder outruns any decoder: there worker processes, which the GIL does
            # not hold back, decode faster than threads (H200, 16 cores: 538 vs 357 img/s);
            # a budget is shared by threads only
            workers = min(4, max(1, available_cores() - 1)) if len(unique) > batch_size else None
        if workers is None:
            batches = _threaded_batches(images, batch_size, _decode_threads())
        else:
            batches = torch.utils.data.DataLoader(
                images, batch_size=batch_size, num_workers=workers, collate_fn=collate_decoded,
            )  # fmt: skip
        added, pending = 0, []  # an untrained index waits for all vectors before training
        try:
            for positions, pixels, errors in batches:
                for i, error in errors:
                    self.skipped.append((unique_labels[i], error))
                if pixels is None:
                    continue
                vectors = self.encoder.encode_pixels(pixels, normalize=True).cpu().numpy()
                if self.index.is_trained:
                    self._add_vectors(vectors)
                else:
                    pending.append(vectors)
                self.items += [unique_labels[i] for i in positions]
                self.hashes += [unique_hashes[i] for i in positions]
                added += len(positions)
                if progress is not None:
                    progress(added, len(unique))
        finally:  # stop the decode threads now if the encoder failed
            getattr(batches, "close", lambda: None)()
        if pending:
            self._add_vectors(np.concatenate(pending))
        return added

    def add_copies(
        self,
        paths: Iterable[str | os.PathLike],
        folder: str | os.PathLike,
        progress=None,
        budget: PixelBudget | None = None,
    ) -> int:
        """Add image files as copies kept in `folder` (uploads, whose originals are
        temporary), under content-addressed names, `<sha256 prefix>-<safe name>`: an upload
        never overwrites another, whatever its name. Afterwards `folder` holds exactly the
        files the index holds: a copy it did not take (not an image, a duplicate) and any
        other stray file are removed, so what the folder serves is only what was indexed.
        Returns how many were added; `self.skipped` lists the others."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        copies = []
        try:
            for path in map(Path, paths):
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                target = folder / f"{digest[:16]}-{safe_name(path.name, set())}"
                if not target.exists():
                    _write_atomic(target, data)
                copies.append(target)
            return self.add(copies, progress=progress, budget=budget)
        finally:
            self.prune(folder)

    def prune(self, folder: str | os.PathLike) -> list[Path]:
        """Remove the files directly in `folder` that are not items of this index (what a
        rejected or failed upload left there); returns them."""
        kept = {str(Path(item)) for item in self.items}
        removed = []
        for path in Path(folder).iterdir():
            if path.is_file() and str(path) not in kept:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def _apply_search_params(self) -> None:
        if self.search_params:
            faiss.ParameterSpace().set_index_parameters(self.index, self.search_params)

    def _add_vectors(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.index.is_trained:  # IVF and the like: train once, on everything added now
            self.index.train(vectors)
        self.index.add(vectors)

    def embed_query(self, query: str | ImageInput) -> np.ndarray:
        """The normalised embedding of a query, [1, D]: a `str` is always text (never read as
        a file path, so typed text can't reach the server's files); an image is a PIL image,
        an array, bytes or a `Path`."""
        if isinstance(query, str):
            if not query.strip():
                raise InputError("the query is empty")
            vector = self.encoder.encode_text([query.strip()])
        else:
            image = load_image(query, min_side=self.encoder.image_side)
            vector = self.encoder.encode_images([image], normalize=True)
        return vector.cpu().numpy().astype(np.float32)

    def combined_query(self, text: str, image: ImageInput, text_weight: float = 0.5) -> np.ndarray:
        """One query from a text and an image: their normalised embeddings weighted
        (`text_weight` for the text, the rest for the image), normalised again, [1, D]."""
        if not 0 <= text_weight <= 1:
            raise InputError(f"the text's weight must be between 0 and 1, not {text_weight}")
        vector = text_weight * self.embed_query(text) + (1 - text_weight) * self.embed_query(image)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def search(self, query: str | ImageInput, k: int = 5) -> list[Hit]:
        """The k items most similar to a text or image query, best first."""
        return self.search_vector(self.embed_query(query), k)

    def search_vector(self, vector: np.ndarray, k: int = 5) -> list[Hit]:
        """The k items most similar to a query's normalised embedding [1, D] (as
        `embed_query` or `combined_query` give it), best first."""
        if len(self) == 0:
            return []
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        scores, positions = self.index.search(vector, min(k, len(self)))
        return [
            Hit(self.items[p], int(p), float(s))
            for s, p in zip(scores[0], positions[0], strict=True)
            if p >= 0
        ]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike) -> None:
        """Save atomically: a crash mid-save leaves the previous version loadable."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        version = uuid.uuid4().hex[:12]
        index_name, items_name = f"index-{version}.faiss", f"items-{version}.json"
        _write_atomic(directory / index_name, faiss.serialize_index(self.index).tobytes())
        items = {"items": self.items, "hashes": self.hashes}
        _write_atomic(directory / items_name, json.dumps(items).encode())
        manifest = {
            "format": FORMAT_VERSION, "index": index_name, "items": items_name,
            "factory": self.factory, "search_params": self.search_params,
            "dim": self.encoder.embed_dim, "count": len(self),
            "encoder": self.encoder.spec,
        }  # fmt: skip
        previous = _read_manifest(directory) if (directory / MANIFEST).exists() else None
        _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(directory)
        if previous:  # the old version is unreachable now; remove its files
            for key in ("index", "items"):
                (directory / previous[key]).unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | os.PathLike, encoder: Encoder) -> SearchIndex:
        """Load an index saved by `save`; raises a clear error if it is damaged."""
        directory = Path(directory)
        manifest = _read_manifest(directory)
        if manifest.get("dim") != encoder.embed_dim:
            raise IndexLoadError(
                f"{directory}: the index holds {manifest.get('dim')}-d vectors but this model "
                f"makes {encoder.embed_dim}-d ones; it was built with another model"
            )
        try:
            raw = np.frombuffer((directory / manifest["index"]).read_bytes(), dtype=np.uint8)
            index = faiss.deserialize_index(raw)
            items = json.loads((directory / manifest["items"]).read_text())
            names, hashes = list(items["items"]), list(items["hashes"])
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
            raise IndexLoadError(f"{directory}: the index files are damaged ({error!r})") from None
        if not index.ntotal == len(names) == len(hashes) or index.d != encoder.embed_dim:
            raise IndexLoadError(f"{directory}: the index files do not match each other")
        loaded = cls(encoder, manifest.get("factory", "Flat"), manifest.get("search_params", ""))
        loaded.index, loaded.items, loaded.hashes = index, names, hashes
        loaded._apply_search_params()
        return loaded


def _read_manifest(directory: Path) -> dict:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise IndexLoadError(f"{directory}: no search index here ({MANIFEST} is missing)") from None
    except (OSError, ValueError) as error:
        raise IndexLoadError(f"{directory}: {MANIFEST} is damaged ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise IndexLoadError(f"{directory}: {MANIFEST} is not a vlm search index manifest")
    return manifest


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
