"""A Hugging Face hub cache on disk, laid out as huggingface_hub writes it, for offline tests
of "is this model cached?" and of loading a hub id from the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants

COMMIT = "0" * 40


def use_cache(monkeypatch, root: Path) -> Path:
    """Point HF_HOME / HF_HUB_CACHE (the environment and huggingface_hub's constants, which
    transformers and open_clip read at call time) at an empty cache under `root`."""
    cache = root / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def add_files(cache: Path, repo_id: str, files: dict[str, bytes | Path]) -> Path:
    """Put files in `repo_id`'s snapshot (refs/main -> snapshots/<commit>/<file>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    return snapshot


def add_folder(cache: Path, repo_id: str, folder: Path) -> Path:
    """A saved model folder, as the hub repo `repo_id` in the cache."""
    return add_files(cache, repo_id, {p.name: p for p in folder.iterdir() if p.is_file()})
